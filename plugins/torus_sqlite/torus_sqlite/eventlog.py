"""The event log on SQLite: one ``events`` table, positions assigned ``max + 1`` under the write lock.

Appends of one process are group-committed (:mod:`torus_sqlite._append`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import Row, delete, func, insert, select

from torus_core.errors import Closed, CompareFailed, InvalidArgument
from torus_core.eventlog import EventLog, NewEvent, StoredEvent
from torus_core.groupcommit import GroupCommitter
from torus_sqlite._append import AppendRequest, appender_for
from torus_sqlite.backend import DEFAULT_POLL_INTERVAL
from torus_sqlite.db import Database
from torus_sqlite.schema import events, snapshots


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


def _stored(row: Row) -> StoredEvent:
    return StoredEvent(
        stream_id=row.stream_id,
        version=row.version,
        topic=row.topic,
        state=bytes(row.state),
        position=row.position,
        timestamp=row.timestamp,
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
        query = (
            select(events)
            .where(events.c.stream_id == stream_id, events.c.version > after)
            .order_by(events.c.version)
        )
        if limit is not None:
            query = query.limit(limit)
        with self._db.read() as conn:
            return [_stored(r) for r in conn.execute(query)]

    def stream_version(self, stream_id: str) -> int:
        """Current version of ``stream_id`` (0 when empty)."""
        with self._db.read() as conn:
            return int(
                conn.execute(
                    select(func.coalesce(func.max(events.c.version), 0)).where(
                        events.c.stream_id == stream_id
                    )
                ).scalar_one()
            )

    def read_all(self, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events with position > ``after`` in position order."""
        _check_range("after", after, 0)
        _check_range("limit", limit, 0)
        query = select(events).where(events.c.position > after).order_by(events.c.position)
        if limit is not None:
            query = query.limit(limit)
        with self._db.read() as conn:
            return [_stored(r) for r in conn.execute(query)]

    def head_position(self) -> int:
        """Position of the newest event (0 when empty)."""
        with self._db.read() as conn:
            return int(conn.execute(select(func.coalesce(func.max(events.c.position), 0))).scalar_one())

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
        with self._db.read() as conn:
            row = conn.execute(select(snapshots).where(snapshots.c.name == name)).first()
        return None if row is None else (int(row.position), bytes(row.state))
