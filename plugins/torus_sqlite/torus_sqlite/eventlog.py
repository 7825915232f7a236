"""The event log on SQLite: one ``events`` table, positions assigned ``max + 1`` under the write lock.

Appends of one process are group-committed (:mod:`torus_sqlite._append`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import delete, insert

from torus_core.errors import Closed, CompareFailed, InvalidArgument
from torus_core.eventlog import EventLog, NewEvent, StoredEvent
from torus_core.groupcommit import GroupCommitter
from torus_sqlite._append import AppendRequest, appender_for
from torus_sqlite.backend import DEFAULT_POLL_INTERVAL
from torus_sqlite.db import Database
from torus_sqlite.schema import snapshots


def _validate(batch: Sequence[NewEvent]) -> None:
    for e in batch:
        if not isinstance(e, NewEvent):
            raise InvalidArgument(f"expected NewEvent, got {type(e).__name__}")
        if not isinstance(e.stream_id, str) or not e.stream_id:
            raise InvalidArgument(f"stream_id must be a non-empty string, got {e.stream_id!r}")
        if not isinstance(e.version, int) or isinstance(e.version, bool) or e.version < 1:
            raise InvalidArgument(f"version must be an integer >= 1, got {e.version!r}")
        if not isinstance(e.topic, str) or not e.topic:
            raise InvalidArgument(f"topic must be a non-empty string, got {e.topic!r}")
        if not isinstance(e.state, bytes | bytearray):
            raise InvalidArgument(f"state must be bytes, got {type(e.state).__name__}")


def _check_range(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise InvalidArgument(f"{name} must be an integer >= {minimum}, got {value!r}")


# Hot reads go straight to the DB-API (cached prepared statements), not through SQLAlchemy.
_COLUMNS = "stream_id, version, topic, state, position, timestamp"
_READ_STREAM_SQL = (
    f"SELECT {_COLUMNS} FROM events WHERE stream_id = ? AND version > ? ORDER BY version LIMIT ?"
)
_READ_ALL_SQL = f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?"
_STREAM_VERSION_SQL = "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = ?"
_HEAD_SQL = "SELECT coalesce(max(position), 0) FROM events"
_LOAD_SNAPSHOT_SQL = "SELECT position, state FROM snapshots WHERE name = ?"


def _stored(row: tuple[str, int, str, bytes, int, float]) -> StoredEvent:
    stream_id, version, topic, state, position, timestamp = row
    return StoredEvent(
        stream_id=stream_id,
        version=version,
        topic=topic,
        state=bytes(state),
        position=position,
        timestamp=timestamp,
    )


class SQLiteEventLog(EventLog):
    """:class:`~torus_core.eventlog.EventLog` over a :class:`~torus_sqlite.db.Database`."""

    def __init__(self, db: Database, *, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self._db = db
        self.poll_interval = poll_interval
        self._appender = appender_for(db.path)

    @property
    def committer(self) -> GroupCommitter[AppendRequest, list[int]]:
        """The process-wide group committer this log's appends go through (tests, metrics)."""
        return self._appender.committer

    def append(self, events_: Sequence[NewEvent]) -> list[int]:
        """Atomically append a batch (see the ABC); CompareFailed writes nothing.

        Concurrent appends of this process are group-committed (see :mod:`torus_sqlite._append`):
        one transaction carries several callers' batches, each still atomic, contiguous and
        accepted or refused on its own.
        """
        batch = list(events_)
        if not batch:
            return []
        _validate(batch)
        if self._db.closed:
            raise Closed(f"sqlite metadata backend {self._db.path!r} is closed")
        streams: dict[str, tuple[int, int]] = {}
        for e in batch:
            seen = streams.get(e.stream_id)
            if seen is not None and e.version != seen[1] + 1:
                raise CompareFailed(
                    f"stream {e.stream_id!r}: version {e.version} does not follow {seen[1]} in the batch",
                    stream_id=e.stream_id,
                    version=e.version,
                )
            streams[e.stream_id] = (e.version if seen is None else seen[0], e.version)
        return self._appender.append(AppendRequest(self._db, batch, streams))

    def read_stream(self, stream_id: str, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events of ``stream_id`` with version > ``after``, oldest first."""
        _check_range("after", after, 0)
        _check_range("limit", limit, 0)
        with self._db.raw_read() as conn:
            rows = conn.execute(
                _READ_STREAM_SQL, (stream_id, after, -1 if limit is None else limit)
            ).fetchall()
        return [_stored(r) for r in rows]

    def stream_version(self, stream_id: str) -> int:
        """Current version of ``stream_id`` (0 when empty)."""
        with self._db.raw_read() as conn:
            (version,) = conn.execute(_STREAM_VERSION_SQL, (stream_id,)).fetchone()
        return int(version)

    def read_all(self, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events with position > ``after`` in position order."""
        _check_range("after", after, 0)
        _check_range("limit", limit, 0)
        with self._db.raw_read() as conn:
            rows = conn.execute(_READ_ALL_SQL, (after, -1 if limit is None else limit)).fetchall()
        return [_stored(r) for r in rows]

    def head_position(self) -> int:
        """Position of the newest event (0 when empty)."""
        with self._db.raw_read() as conn:
            (head,) = conn.execute(_HEAD_SQL).fetchone()
        return int(head)

    def wait_for_events(self, after: int, timeout: float) -> list[StoredEvent]:
        """Poll every ``poll_interval`` seconds until events after ``after`` exist or ``timeout`` passes."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            found = self.read_all(after=after)
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return found
            time.sleep(min(self.poll_interval, remaining))

    def save_snapshot(self, name: str, position: int, state: bytes) -> None:
        """Store (replace) the snapshot ``name`` taken at ``position``."""
        _check_range("position", position, 0)
        with self._db.write() as conn:
            conn.execute(delete(snapshots).where(snapshots.c.name == name))
            conn.execute(insert(snapshots).values(name=name, position=position, state=bytes(state)))

    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        """``(position, state)`` of snapshot ``name``, or ``None``."""
        with self._db.raw_read() as conn:
            row = conn.execute(_LOAD_SNAPSHOT_SQL, (name,)).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))
