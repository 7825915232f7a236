"""One SQLite file behind a SQLAlchemy engine: pragmas, transactions and error translation.

Writes run in ``BEGIN IMMEDIATE`` transactions, so the write lock is taken *before* anything is
read: a check-then-insert in one write transaction cannot race another process. Reads run in
plain deferred transactions (a consistent WAL snapshot). SQLite errors are translated here into
:mod:`torus_core.errors` types, and nowhere else.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from torus_core.errors import Closed, CompareFailed, MetadataOutOfSpace, MetadataUnavailable
from torus_sqlite.backend import DEFAULT_BUSY_TIMEOUT
from torus_sqlite.schema import create_schema, metadata


class Database:
    """A WAL-mode, ``synchronous=FULL`` SQLite database shared safely by threads and processes."""

    def __init__(self, path: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._closed = False
        self._close_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None  # raw_write's dedicated connection
        self._writer_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []  # raw_read's idle connections
        self._readers_lock = threading.Lock()
        self.engine: Engine = create_engine(
            f"sqlite:///{path}",
            connect_args={"timeout": busy_timeout, "check_same_thread": False},
            isolation_level="AUTOCOMMIT",  # we issue BEGIN/COMMIT ourselves
            pool_pre_ping=False,
        )
        event.listen(self.engine, "connect", self._on_connect)
        with self.write() as conn:
            create_schema(conn)

    def _on_connect(self, dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"sqlite metadata backend {self.path!r} is closed")

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except IntegrityError as exc:
            raise CompareFailed(f"append conflicts with a stored event: {exc.orig}") from exc
        except (OperationalError, DBAPIError) as exc:
            raise self._unavailable(exc.orig) from exc
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException | None) -> MetadataUnavailable:
        """MetadataUnavailable for a SQLite error; MetadataOutOfSpace when its disk is full."""
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return MetadataOutOfSpace(f"sqlite {self.path!r}: {exc} (its disk is full)", backend="sqlite")
        return MetadataUnavailable(f"sqlite {self.path!r}: {exc}", backend="sqlite")

    @contextmanager
    def _tx(self, begin: str) -> Iterator[Connection]:
        self._check_open()
        with self._translate(), self.engine.connect() as conn:
            conn.exec_driver_sql(begin)
            try:
                yield conn
            except BaseException:
                _rollback(conn)
                raise
            conn.exec_driver_sql("COMMIT")

    def write(self) -> AbstractContextManager[Connection]:
        """Context manager: a ``BEGIN IMMEDIATE`` transaction (holds the write lock)."""
        return self._tx("BEGIN IMMEDIATE")

    @contextmanager
    def raw_write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction on a dedicated DB-API connection (the append hot path).

        Skips SQLAlchemy's pool and statement layer. One caller at a time uses the connection
        (the others wait); errors are translated like :meth:`write`'s (a constraint violation is
        :class:`CompareFailed`, anything else :class:`MetadataUnavailable`), and an exception
        rolls the transaction back.
        """
        self._check_open()
        with self._writer_lock, self._translate():
            conn = self._writer
            if conn is None:
                conn = self._connect_raw()
                self._writer = conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    _raw_rollback(conn)
                    raise
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                _raw_rollback(conn)
                raise CompareFailed(f"append conflicts with a stored event: {exc}") from exc
            except sqlite3.Error:
                _raw_rollback(conn)
                raise
            finally:
                if self._closed:  # closed meanwhile: close() left the connection to us
                    self._writer = None
                    conn.close()

    def read(self) -> AbstractContextManager[Connection]:
        """Context manager: a deferred read transaction (one consistent snapshot)."""
        return self._tx("BEGIN")

    def _connect_raw(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, check_same_thread=False, isolation_level=None
        )
        self._on_connect(conn, None)
        return conn

    @contextmanager
    def raw_read(self) -> Iterator[sqlite3.Connection]:
        """A plain DB-API connection for reads (the hot read paths), in autocommit mode.

        Each statement is its own consistent WAL snapshot; callers needing several statements to
        agree must not use this. Connections are pooled (one per concurrent reader, created on
        demand, statements cached by :mod:`sqlite3`); SQLite errors become
        :class:`MetadataUnavailable` as in :meth:`read`.
        """
        self._check_open()
        with self._translate():
            with self._readers_lock:
                conn = self._readers.pop() if self._readers else None
            if conn is None:
                conn = self._connect_raw()
            try:
                yield conn
            finally:
                with self._readers_lock:
                    if self._closed:
                        conn.close()
                    else:
                        self._readers.append(conn)

    def wipe(self) -> None:
        """Delete every row of every table except the schema facts."""
        with self.write() as conn:
            for table in metadata.sorted_tables:
                if table.name != "torus_meta":
                    conn.execute(table.delete())

    def close(self) -> None:
        """Dispose of the engine's connections. Idempotent."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self.engine.dispose()
                with self._readers_lock:
                    idle, self._readers = self._readers, []
                for conn in idle:
                    conn.close()
                if self._writer_lock.acquire(timeout=1.0):  # else the writer closes it when done
                    try:
                        if self._writer is not None:
                            self._writer.close()
                            self._writer = None
                    finally:
                        self._writer_lock.release()


def _raw_rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the connection is gone: SQLite rolls back on its own


def _rollback(conn: Connection) -> None:
    try:
        conn.exec_driver_sql("ROLLBACK")
    except (OperationalError, DBAPIError):
        pass  # SQLite already rolled back (or the connection is gone): nothing to undo
