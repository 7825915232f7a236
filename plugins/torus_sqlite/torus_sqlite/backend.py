"""``SQLiteBackend``: the embedded metadata backend (one SQLite file, WAL, ``synchronous=FULL``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from torus_core.datadir import open_private, private_dir, restrict_file
from torus_core.errors import ConfigError
from torus_core.eventlog import MetadataBackend

if TYPE_CHECKING:  # SQLAlchemy is imported only when a backend is opened
    from torus_sqlite.eventlog import SQLiteEventLog
    from torus_sqlite.leases import SQLiteLeaseStore

#: Seconds a writer waits for another process's write lock before MetadataUnavailable.
DEFAULT_BUSY_TIMEOUT = 10.0
#: Seconds between polls in ``wait_for_events``.
DEFAULT_POLL_INTERVAL = 0.025

_OPTIONS = {"busy_timeout": DEFAULT_BUSY_TIMEOUT, "poll_interval": DEFAULT_POLL_INTERVAL}


def parse_url(url: str) -> tuple[str, dict[str, float]]:
    """Split ``sqlite:///relative.db`` / ``sqlite:////abs/path.db`` into ``(path, options)``.

    Follows SQLAlchemy's convention: the path is everything after ``sqlite:///``, so a fourth
    slash makes it absolute. Query options: ``busy_timeout`` and ``poll_interval`` (seconds).
    Anything else (other schemes, a host, ``:memory:``, unknown options) raises ConfigError.
    """
    if not isinstance(url, str):
        raise ConfigError(f"sqlite URL must be a string, got {type(url).__name__}")
    if not url.startswith("sqlite:///"):
        raise ConfigError(
            f"bad sqlite metadata URL {url!r}: use sqlite:///relative/meta.db or sqlite:////abs/path/meta.db"
        )
    parts = urlsplit(url)
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if parts.fragment or not path or path.endswith("/") or path == ":memory:" or "\x00" in path:
        raise ConfigError(f"bad sqlite metadata URL {url!r}: it must name a database file")
    options: dict[str, float] = {}
    for key, raw in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise ConfigError(f"unknown sqlite URL option {key!r} (known: {', '.join(sorted(_OPTIONS))})")
        options[key] = _positive(key, raw)
    return path, options


def _positive(key: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"sqlite option {key}={raw!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(f"sqlite option {key}={raw!r} must be a positive number of seconds")
    return value


def _private_database_files(path: str) -> None:
    """Create the database file ``0600`` before SQLite does, and restrict existing ones.

    SQLite creates ``-wal`` and ``-shm`` with the database file's permission bits, so a private
    database file keeps them private too; ones written by an older torus are restricted here.
    """
    try:
        os.close(open_private(path, os.O_RDWR | os.O_CREAT))
        for suffix in ("-wal", "-shm", "-journal"):
            restrict_file(path + suffix)
    except OSError as exc:
        raise ConfigError(f"cannot open sqlite metadata database {path!r}: {exc}") from exc


class SQLiteBackend(MetadataBackend):
    """Event log + lease store in one SQLite file; safe for many threads and processes."""

    name: ClassVar[str] = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ConfigError(f"sqlite metadata directory {parent!r} does not exist")
        from torus_sqlite.db import Database
        from torus_sqlite.eventlog import SQLiteEventLog
        from torus_sqlite.leases import SQLiteLeaseStore

        _private_database_files(path)
        self.path = path
        self._db = Database(path, busy_timeout=busy_timeout)
        self._log = SQLiteEventLog(self._db, poll_interval=poll_interval)
        self._leases = SQLiteLeaseStore(self._db)

    @classmethod
    def prepare_local(cls, url: str) -> None:
        """Create the database's directory (a server's default lives in its data dir)."""
        path, _ = parse_url(url)
        parent = os.path.dirname(path)
        if parent:
            private_dir(parent, fix_existing=False)

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any] | None = None) -> SQLiteBackend:
        """Open (creating if needed) the database named by ``url``; ``options`` override URL options."""
        path, opts = parse_url(url)
        for key, raw in (options or {}).items():
            if key not in _OPTIONS:
                raise ConfigError(f"unknown sqlite option {key!r} (known: {', '.join(sorted(_OPTIONS))})")
            opts[key] = _positive(key, raw)
        return cls(path, **opts)

    @property
    def log(self) -> SQLiteEventLog:
        """The event log."""
        return self._log

    @property
    def leases(self) -> SQLiteLeaseStore:
        """The lease store."""
        return self._leases

    def wipe(self) -> None:
        """Delete every event, snapshot, lease and key (positions restart at 1)."""
        self._db.wipe()

    def close(self) -> None:
        """Dispose of the connection pool. Idempotent."""
        self._db.close()

    def __enter__(self) -> SQLiteBackend:
        return self

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r})"
