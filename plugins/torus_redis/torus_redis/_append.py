"""Group-committed appends on Redis: concurrent batches of one process share one ``EVALSHA``.

One :class:`RedisAppender` per (server, credentials, prefix) in the process gathers concurrent
batches with a :class:`~torus_core.groupcommit.GroupCommitter` and sends a group as **one** call
of :data:`~torus_redis._scripts.APPEND_GROUP`. The script runs atomically on the server and
checks each batch on its own, in order (cluster identity, head not behind what that caller has
seen, every stream's length = the batch's expected version): a refused batch writes nothing and
gets its own outcome (:class:`CompareFailed`, :class:`DataLossDetected`) while the accepted ones
are appended with contiguous, gap-free positions in call order. One round trip and one
redis-py call then serve the whole group.
"""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from torus_core.errors import CompareFailed, MetadataError, TorusError
from torus_core.eventlog import NewEvent
from torus_core.groupcommit import GroupCommitter
from torus_redis._client import RedisClient
from torus_redis._codec import decode_entry, encode_body

#: Most batches in one script call.
MAX_GROUP = 64
#: Event bytes one script call may carry (a larger single batch is sent alone).
GROUP_BYTES = 1024 * 1024


class AppendRequest:
    """One caller's validated batch, as queued for a group commit (events encoded up front)."""

    __slots__ = (
        "baseline",
        "batch_id",
        "bodies",
        "client",
        "events",
        "header",
        "keys",
        "retry_of_uncertain",
        "script",
        "size",
        "streams",
    )

    def __init__(
        self,
        client: RedisClient,
        script: Any,
        events: tuple[NewEvent, ...],
        streams: dict[str, tuple[int, int]],
        batch_id: bytes,
        retry_of_uncertain: bool,
        *,
        baseline: int,
        stream_key: Callable[[str], str],
    ) -> None:
        self.client = client
        #: The ``APPEND_GROUP`` script registered on ``client``.
        self.script = script
        self.events = events
        #: ``{stream: (first_version, last_version)}`` in batch order.
        self.streams = streams
        self.batch_id = batch_id
        #: True when this is a retry of a batch whose earlier attempt's outcome is unknown.
        self.retry_of_uncertain = retry_of_uncertain
        #: ``client.seen_head`` when the request was made (the head may not be behind it).
        self.baseline = baseline
        now = time.time()
        #: The encoded events (:func:`~torus_redis._codec.encode_body`).
        self.bodies = [encode_body(ev, now, batch_id) for ev in events]
        self.size = sum(len(b) for b in self.bodies)
        #: This batch's stream keys and its ``APPEND_GROUP`` header (see ``_scripts``).
        self.keys = [stream_key(sid) for sid in streams]
        number = {sid: i for i, sid in enumerate(streams, start=1)}
        header = [baseline, len(streams)]
        for sid, (first, _last) in streams.items():
            header += [number[sid], first - 1]
        header.append(len(events))
        header += [number[ev.stream_id] for ev in events]
        self.header = " ".join(map(str, header))


class RedisAppender:
    """The group committer shared by every event log of one (server, credentials, prefix)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.head_key = f"{prefix}head"
        self.log_key = f"{prefix}log"
        self.notify_key = f"{prefix}notify"
        self.cluster_key = f"{prefix}cluster-id"
        self.committer: GroupCommitter[AppendRequest, list[int]] = GroupCommitter(
            self._commit, backend="redis", max_group=MAX_GROUP, fits=self._fits
        )

    def stream_key(self, stream_id: str) -> str:
        """The list holding the events of ``stream_id``."""
        return f"{self.prefix}s:{stream_id}"

    def append(self, request: AppendRequest) -> list[int]:
        """Commit ``request`` (grouped with concurrent ones); return its positions."""
        timeout = request.client.config.timeout
        return self.committer.submit(request, wait_timeout=2 * timeout + 1.0)

    @staticmethod
    def _fits(group: Sequence[AppendRequest], request: AppendRequest) -> bool:
        return sum(r.size for r in group) + request.size <= GROUP_BYTES

    def _call_args(self, group: Sequence[AppendRequest]) -> tuple[list[str], list[Any]]:
        """Keys and arguments of one ``APPEND_GROUP`` call for ``group``."""
        keys = [self.head_key, self.log_key, self.notify_key, self.cluster_key]
        args: list[Any] = ["", len(group)]
        for r in group:
            expected = r.client.known_cluster_id or ""
            if not expected:  # the server may have no cluster id yet: offer a new one
                args[0] = args[0] or uuid.uuid4().hex
            keys += r.keys
            args += [expected, r.header, *r.bodies]
        return keys, args

    def _commit(self, group: Sequence[AppendRequest]) -> list[list[int] | BaseException]:
        """Send ``group`` as one script call; settle each request from its own result."""
        sender = group[0]
        keys, args = self._call_args(group)
        res = sender.client.evalsha(sender.script, keys, args)
        server_cid = res[-1].decode() if isinstance(res[-1], bytes) else str(res[-1])
        outcomes: list[list[int] | BaseException] = []
        for n, r in enumerate(group):
            status, x, y = res[3 * n], res[3 * n + 1], res[3 * n + 2]
            try:
                outcomes.append(self._settle(r, int(status), x, int(y), server_cid))
            except TorusError as exc:
                outcomes.append(exc)
        return outcomes

    def _settle(self, r: AppendRequest, status: int, x: Any, y: int, server_cid: str) -> list[int]:
        """One batch's positions from its script result, or raise its error."""
        if status == 1:
            first_pos = int(x)
            r.client.observe(server_cid, first_pos + len(r.events) - 1, r.baseline)
            return list(range(first_pos, first_pos + len(r.events)))
        if status == 0:
            sid = list(r.streams)[int(x) - 1]
            done = self._committed_earlier(r)
            if done is not None:
                return done
            raise CompareFailed(
                f"stream {sid!r} is at version {y}; append expected {r.streams[sid][0] - 1}",
                stream_id=sid,
                version=r.streams[sid][0],
            )
        if status == -1:
            cid = x.decode() if isinstance(x, bytes) else str(x)
            r.client.observe(cid or None, r.baseline, r.baseline)
        elif status == -2:
            r.client.observe(r.client.known_cluster_id, int(x), r.baseline)
        raise MetadataError(f"unexpected reply from the append script: {(status, x, y)!r}")

    def _committed_earlier(self, r: AppendRequest) -> list[int] | None:
        """If an earlier attempt of this very batch (timed out) did commit, return its positions."""
        if not r.retry_of_uncertain:
            return None
        first = r.events[0]
        key = self.stream_key(first.stream_id)
        entry = r.client.call(lambda: r.client.redis.lindex(key, first.version - 1))
        if entry is None:
            return None
        stored, stored_batch = decode_entry(entry)
        if stored_batch != r.batch_id:
            return None
        return list(range(stored.position, stored.position + len(r.events)))


_APPENDERS: weakref.WeakValueDictionary[tuple[Any, ...], RedisAppender] = weakref.WeakValueDictionary()
_APPENDERS_GUARD = threading.Lock()


def appender_for(client: RedisClient) -> RedisAppender:
    """The process-wide appender for the server, credentials and prefix of ``client``.

    Logs with equal settings share it (and so group their appends); it lives as long as one
    of them does.
    """
    c = client.config
    key = (c.url, c.prefix, tuple(sorted((k, str(v)) for k, v in c.client_kwargs.items())))
    with _APPENDERS_GUARD:
        appender = _APPENDERS.get(key)
        if appender is None:
            appender = RedisAppender(c.prefix)
            _APPENDERS[key] = appender
        return appender
