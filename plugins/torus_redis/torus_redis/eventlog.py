"""The event log on Redis: one Lua script call per appended batch (or group of concurrent batches).

Keys under the prefix ``P`` (default ``torus:``)::

    P head            global head position (string integer)
    P log             list of every event, entry i holds position i + 1
    P s:<stream id>   list of the stream's events, entry i holds version i + 1
    P notify          stream with one entry ``<position>-1`` per append (trimmed to ~128)
    P cluster-id      identity marker written by the first append
    P snap:<name>     u64 position + snapshot state

The append script checks every stream's length (= version) and the cluster identity, then
pushes all events and advances the head, all-or-nothing per batch. Concurrent appends of one
process share one script call (group commit, :mod:`._append`), each batch checked on its own.
``wait_for_events`` blocks on ``XREAD BLOCK`` of the notify stream from ID ``<after>-1`` — no
window between the read and the wait, no polling. Blocking reads are cut into chunks shorter
than the socket timeout, so an outage is still noticed within bounded time.

Unknown outcomes: if the script call times out, the batch id is remembered; an identical retry
that fails its version check reads the stream back and, if the events there carry that batch
id, returns their positions instead of :class:`CompareFailed`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from torus_core.errors import InvalidArgument
from torus_core.eventbatch import UncertainBatchMemo, check_batch
from torus_core.eventlog import EventLog, NewEvent, StoredEvent
from torus_core.groupcommit import GroupCommitter
from torus_redis import _scripts
from torus_redis._append import AppendRequest, appender_for
from torus_redis._client import RedisClient
from torus_redis._codec import decode_entry


class RedisEventLog(EventLog):
    """:class:`EventLog` on Redis; see the module docstring for keys and the append protocol."""

    def __init__(self, client: RedisClient) -> None:
        self._c = client
        p = client.config.prefix
        self._p = p
        self._log_key = f"{p}log"
        self._notify_key = f"{p}notify"
        self._appender = appender_for(client)
        self._script = client.redis.register_script(_scripts.APPEND_GROUP)
        self._memo = UncertainBatchMemo()

    def _stream_key(self, stream_id: str) -> str:
        return f"{self._p}s:{stream_id}"

    # --- append -------------------------------------------------------------------------

    @property
    def committer(self) -> GroupCommitter[AppendRequest, list[int]]:
        """The process-wide group committer this log's appends go through (tests, metrics)."""
        return self._appender.committer

    def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Atomically append ``events``; return their positions.

        Concurrent appends of this process are group-committed (see :mod:`torus_redis._append`):
        one script call carries several callers' batches, each still atomic, contiguous and
        accepted or refused on its own.
        """
        events = tuple(events)
        if not events:
            return []
        streams = check_batch(events)

        def attempt(batch_id: bytes, retry: bool) -> list[int]:
            request = AppendRequest(
                self._c,
                self._script,
                events,
                streams,
                batch_id,
                retry,
                baseline=self._c.seen_head,
                stream_key=self._stream_key,
            )
            return self._appender.append(request)

        return self._memo.append(events, attempt)

    # --- reads --------------------------------------------------------------------------

    def _lrange(self, key: str, after: int, limit: int | None) -> list[StoredEvent]:
        if limit is not None and limit < 0:
            raise InvalidArgument("limit must be >= 0")
        if limit == 0:
            return []
        start = max(after, 0)
        stop = -1 if limit is None else start + limit - 1
        entries = self._c.call(lambda: self._c.redis.lrange(key, start, stop))
        return [decode_entry(e)[0] for e in entries]

    def read_stream(self, stream_id: str, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events of ``stream_id`` with version > ``after`` (one LRANGE)."""
        return self._lrange(self._stream_key(stream_id), after, limit)

    def stream_version(self, stream_id: str) -> int:
        """The stream's length, which is its version."""
        return int(self._c.call(lambda: self._c.redis.llen(self._stream_key(stream_id))))

    def read_all(self, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events with position > ``after`` (one LRANGE on the global list)."""
        return self._lrange(self._log_key, after, limit)

    def head_position(self) -> int:
        """The global head; raises DataLossDetected if it went backwards."""
        baseline = self._c.seen_head
        raw = self._c.call(lambda: self._c.redis.get(self._c.head_key))
        head = int(raw) if raw is not None else 0
        self._c.observe(self._c.known_cluster_id, head, baseline)
        return head

    def wait_for_events(self, after: int, timeout: float) -> list[StoredEvent]:
        """Return events after ``after``, blocking on ``XREAD BLOCK`` for up to ``timeout`` s."""
        deadline = time.monotonic() + max(0.0, timeout)
        found = self.read_all(after=after)
        if found:
            return found
        chunk = max(0.05, self._c.config.timeout * 0.5)
        stream_id = f"{max(after, 0)}-1"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            block_ms = max(1, int(min(remaining, chunk) * 1000))
            res = self._c.call(
                lambda ms=block_ms: self._c.redis.xread({self._notify_key: stream_id}, count=1, block=ms)  # type: ignore[misc]
            )
            if res:
                return self.read_all(after=after)

    # --- snapshots ----------------------------------------------------------------------

    def save_snapshot(self, name: str, position: int, state: bytes) -> None:
        """Store (replace) the snapshot ``name`` taken at ``position``."""
        if position < 0:
            raise InvalidArgument("snapshot position must be >= 0")
        value = position.to_bytes(8, "big") + bytes(state)
        self._c.call(lambda: self._c.redis.set(f"{self._p}snap:{name}", value))

    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        """Return ``(position, state)`` of snapshot ``name`` or ``None``."""
        v = self._c.call(lambda: self._c.redis.get(f"{self._p}snap:{name}"))
        if v is None:
            return None
        return int.from_bytes(v[:8], "big"), bytes(v[8:])
