"""The lease store on SQLite: wall-clock expiry, expired rows treated as absent and purged lazily."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, or_, select, update

from torus_core.errors import InvalidArgument, LeaseNotFound
from torus_core.eventlog import Lease, LeaseStore
from torus_sqlite.db import Database
from torus_sqlite.schema import lease_keys, leases


def _live_key_clause(now: float) -> ColumnElement[bool]:
    """SQL condition: the key has no lease, or its lease has not expired."""
    alive = (
        select(leases.c.id).where(leases.c.id == lease_keys.c.lease_id, leases.c.expires_at > now).exists()
    )
    return or_(lease_keys.c.lease_id.is_(None), alive)


#: :meth:`SQLiteLeaseStore.get` in plain SQL (same condition as :func:`_live_key_clause`).
_GET_LIVE_SQL = (
    "SELECT value FROM lease_keys WHERE key = ? AND (lease_id IS NULL OR EXISTS "
    "(SELECT 1 FROM leases WHERE leases.id = lease_keys.lease_id AND leases.expires_at > ?))"
)


def _purge_expired(conn: Connection, now: float) -> None:
    expired = select(leases.c.id).where(leases.c.expires_at <= now)
    conn.execute(delete(lease_keys).where(lease_keys.c.lease_id.in_(expired)))
    conn.execute(delete(leases).where(leases.c.expires_at <= now))


def _require_live(conn: Connection, lease: Lease, now: float) -> None:
    row = conn.execute(select(leases.c.id).where(leases.c.id == lease.id, leases.c.expires_at > now)).first()
    if row is None:
        raise LeaseNotFound(f"lease {lease.id} expired or was revoked")


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise InvalidArgument(f"key must be a string, got {type(key).__name__}")


def _insert_key(conn: Connection, key: str, value: bytes, lease: Lease | None) -> None:
    conn.execute(
        insert(lease_keys).values(key=key, value=bytes(value), lease_id=None if lease is None else lease.id)
    )


class SQLiteLeaseStore(LeaseStore):
    """:class:`~torus_core.eventlog.LeaseStore` over a :class:`~torus_sqlite.db.Database`.

    Expiry uses ``time.time()`` of the calling process, so hosts sharing one database file (an
    NFS export is *not* supported anyway) must have synchronised clocks.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def grant(self, ttl: float) -> Lease:
        """Create a lease expiring ``ttl`` seconds from now; ids are random and never reused."""
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not ttl > 0:
            raise InvalidArgument(f"lease ttl must be a positive number of seconds, got {ttl!r}")
        now = time.time()
        lease_id = secrets.randbits(62) + 1
        with self._db.write() as conn:
            _purge_expired(conn, now)
            conn.execute(insert(leases).values(id=lease_id, ttl=float(ttl), expires_at=now + ttl))
        return Lease(id=lease_id, ttl=float(ttl), granted_at=now)

    def keepalive(self, lease: Lease) -> None:
        """Push the expiry ``ttl`` seconds into the future; LeaseNotFound if it is gone."""
        now = time.time()
        with self._db.write() as conn:
            result = conn.execute(
                update(leases)
                .where(leases.c.id == lease.id, leases.c.expires_at > now)
                .values(expires_at=now + leases.c.ttl)
            )
            if result.rowcount == 0:
                raise LeaseNotFound(f"lease {lease.id} expired or was revoked")

    def revoke(self, lease: Lease) -> None:
        """Delete the lease and its keys (no-op if already gone)."""
        with self._db.write() as conn:
            conn.execute(delete(lease_keys).where(lease_keys.c.lease_id == lease.id))
            conn.execute(delete(leases).where(leases.c.id == lease.id))

    @contextmanager
    def _write_key(self, key: str, lease: Lease | None) -> Iterator[Connection]:
        """A write transaction for ``key``: expired leases purged, ``lease`` (if any) checked live."""
        _check_key(key)
        now = time.time()
        with self._db.write() as conn:
            _purge_expired(conn, now)
            if lease is not None:
                _require_live(conn, lease, now)
            yield conn

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        """Set ``key``, attached to ``lease`` when given (LeaseNotFound if that lease is gone)."""
        with self._write_key(key, lease) as conn:
            conn.execute(delete(lease_keys).where(lease_keys.c.key == key))
            _insert_key(conn, key, value, lease)

    def put_if_absent(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        """Set ``key`` only if it is missing or its lease expired; return whether it was set."""
        with self._write_key(key, lease) as conn:
            if conn.execute(select(lease_keys.c.key).where(lease_keys.c.key == key)).first() is not None:
                return False
            _insert_key(conn, key, value, lease)
            return True

    def get(self, key: str) -> bytes | None:
        """Value of a live key, or ``None`` (one cached DB-API statement: the commit path calls this)."""
        _check_key(key)
        with self._db.raw_read() as conn:
            row = conn.execute(_GET_LIVE_SQL, (key, time.time())).fetchone()
        return None if row is None else bytes(row[0])

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """All live keys starting with ``prefix``."""
        _check_key(prefix)
        cond = func.substr(lease_keys.c.key, 1, len(prefix)) == prefix
        with self._db.read() as conn:
            rows = conn.execute(
                select(lease_keys.c.key, lease_keys.c.value)
                .where(and_(cond, _live_key_clause(time.time())))
                .order_by(lease_keys.c.key)
            )
            return {r.key: bytes(r.value) for r in rows}

    def delete(self, key: str, *, expected: bytes | None = None) -> bool:
        """Delete a live ``key`` (only if its value is ``expected``, when given)."""
        _check_key(key)
        now = time.time()
        with self._db.write() as conn:
            _purge_expired(conn, now)
            query = delete(lease_keys).where(lease_keys.c.key == key)
            if expected is not None:
                query = query.where(lease_keys.c.value == bytes(expected))
            return conn.execute(query).rowcount > 0
