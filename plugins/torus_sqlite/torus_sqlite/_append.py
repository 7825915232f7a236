"""Group-committed appends on SQLite: concurrent batches of one process share one transaction.

The cost of an append is dominated by the commit (an fsync of the WAL with
``synchronous=FULL``). One :class:`SQLiteAppender` per database file in the process gathers
concurrent batches with a :class:`~torus_core.groupcommit.GroupCommitter` and writes a group in
**one** ``BEGIN IMMEDIATE`` transaction, so N waiting writers pay for one fsync:

* the head (``max(position)``) is read once; each stream's version is read once and then
  tracked across the group;
* each batch is checked on its own, in order: a stale one gets :class:`CompareFailed` and
  contributes nothing, the others get contiguous positions following the previous batch's;
* all accepted events are inserted with one ``executemany`` and committed together.

Statements go straight to the DB-API connection (prepared statements cached by :mod:`sqlite3`),
not through SQLAlchemy's statement layer: the per-append CPU cost is a few small SQL calls.
Other *processes* are still serialised by SQLite's write lock, and the unique
``(stream_id, version)`` constraint stays the backstop. If a combined transaction fails on a
constraint anyway, each batch is retried in a transaction of its own.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from torus_core.errors import Closed, CompareFailed, TorusError
from torus_core.eventlog import NewEvent
from torus_core.groupcommit import GroupCommitter
from torus_sqlite.db import Database

#: Most batches in one transaction.
MAX_GROUP = 64

_HEAD_SQL = "SELECT coalesce(max(position), 0) FROM events"
_VERSION_SQL = "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = ?"
_INSERT_SQL = (
    "INSERT INTO events (position, stream_id, version, topic, state, timestamp) VALUES (?, ?, ?, ?, ?, ?)"
)


@dataclass(slots=True)
class AppendRequest:
    """One caller's validated batch, as queued for a group commit."""

    db: Database
    events: Sequence[NewEvent]
    #: ``{stream: (first_version, last_version)}`` in batch order.
    streams: dict[str, tuple[int, int]]


class SQLiteAppender:
    """The group committer shared by every event log of one database file in this process."""

    def __init__(self) -> None:
        self.committer: GroupCommitter[AppendRequest, list[int]] = GroupCommitter(
            self._commit, backend="sqlite", max_group=MAX_GROUP
        )

    def append(self, request: AppendRequest) -> list[int]:
        """Commit ``request`` (grouped with concurrent ones); return its positions."""
        return self.committer.submit(request, wait_timeout=2 * request.db.busy_timeout + 1.0)

    def _commit(self, group: Sequence[AppendRequest]) -> list[list[int] | BaseException]:
        db = next((r.db for r in group if not r.db.closed), None)
        if db is None:
            return [Closed(f"sqlite metadata backend {group[0].db.path!r} is closed")] * len(group)
        try:
            return self._commit_in(db, group)
        except CompareFailed:
            if len(group) == 1:
                raise
        # A constraint failed in the combined transaction (nothing was written): retry singly.
        outcomes: list[list[int] | BaseException] = []
        for r in group:
            try:
                outcomes.append(self._commit_in(r.db, [r])[0])
            except TorusError as exc:
                outcomes.append(exc)
        return outcomes

    @staticmethod
    def _commit_in(db: Database, group: Sequence[AppendRequest]) -> list[list[int] | BaseException]:
        """One ``BEGIN IMMEDIATE`` transaction for ``group`` on ``db``; one outcome per request."""
        outcomes: list[list[int] | BaseException] = []
        with db.raw_write() as conn:
            cur = conn.cursor()
            try:
                (head,) = cur.execute(_HEAD_SQL).fetchone()
                versions: dict[str, int] = {}
                rows: list[tuple[int, str, int, str, bytes, float]] = []
                now = time.time()
                for r in group:
                    stale = None
                    for sid, (first, _last) in r.streams.items():
                        current = versions.get(sid)
                        if current is None:
                            (current,) = cur.execute(_VERSION_SQL, (sid,)).fetchone()
                            versions[sid] = current
                        if current != first - 1:
                            stale = (sid, current, first)
                            break
                    if stale is not None:
                        sid, current, first = stale
                        outcomes.append(
                            CompareFailed(
                                f"stream {sid!r} is at version {current}, cannot append version {first}",
                                stream_id=sid,
                                version=first,
                            )
                        )
                        continue
                    positions = list(range(head + 1, head + 1 + len(r.events)))
                    head += len(r.events)
                    for sid, (_first, last) in r.streams.items():
                        versions[sid] = last
                    rows.extend(
                        (p, e.stream_id, e.version, e.topic, bytes(e.state), now)
                        for p, e in zip(positions, r.events, strict=True)
                    )
                    outcomes.append(positions)
                if rows:
                    cur.executemany(_INSERT_SQL, rows)
            finally:
                cur.close()
        return outcomes


_APPENDERS: weakref.WeakValueDictionary[str, SQLiteAppender] = weakref.WeakValueDictionary()
_APPENDERS_GUARD = threading.Lock()


def appender_for(path: str) -> SQLiteAppender:
    """The process-wide appender of the database file at ``path`` (shared by its event logs)."""
    key = os.path.realpath(path)
    with _APPENDERS_GUARD:
        appender = _APPENDERS.get(key)
        if appender is None:
            appender = SQLiteAppender()
            _APPENDERS[key] = appender
        return appender
