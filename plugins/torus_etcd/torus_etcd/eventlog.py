"""The event log on etcd v3: one transaction per appended batch (or group of concurrent batches).

Key layout under the backend prefix ``P`` (default ``/torus/``)::

    P log/head                      decimal global head position
    P log/e/<position:020d>         encoded event (see _codec)
    P log/s/<quoted stream>/<version:020d>   the same encoded event, indexed by stream
    P snap/<quoted name>            u64 position + snapshot state

An append is a single etcd ``Txn``: it compares the head key's ``mod_revision`` with the one
last seen and, per stream, that the key of the stream's first new version is absent and the key
of the version before it exists. On success it writes the head and every event key (positions
are therefore gap-free and assigned in the same atomic write). On failure the same round trip
reads the head and each stream's last version, so a stale stream version
(:class:`CompareFailed`, nothing written) is told from a race on the head (retry, bounded).
Concurrent appends of one process share that transaction (group commit, :mod:`._append`).

Unknown outcomes: when a transaction times out, the client cannot know whether it committed. It
raises :class:`MetadataUnavailable` and remembers the batch id; an identical retry that then
fails its stream compare reads the stored events back and, if they carry that batch id, returns
their positions instead of :class:`CompareFailed`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import grpc
from etcd3 import etcdrpc

from torus_core.errors import Closed, InvalidArgument, MetadataUnavailable
from torus_core.eventbatch import UncertainBatchMemo, check_batch
from torus_core.eventlog import EventLog, NewEvent, StoredEvent
from torus_core.groupcommit import GroupCommitter
from torus_etcd._append import AppendRequest, appender_for, last_version_request, num, prefix_end
from torus_etcd._codec import decode_event
from torus_etcd._transport import EtcdTransport, RangeResponse, StreamCall, WatchResponse, translate

_SNAP = ">Q"

#: Kept for importers of the old names.
_num = num


class EtcdEventLog(EventLog):
    """:class:`EventLog` on etcd; see the module docstring for keys and the append protocol."""

    def __init__(self, transport: EtcdTransport, prefix: bytes) -> None:
        self._t = transport
        self._p = prefix
        self._appender = appender_for(transport, prefix)
        self._head_key = self._appender.head_key
        self._event_prefix = self._appender.event_prefix
        self._snap_prefix = prefix + b"snap/"
        self._memo = UncertainBatchMemo()

    # --- keys ---------------------------------------------------------------------------

    def _stream_prefix(self, stream_id: str) -> bytes:
        return self._appender.stream_prefix(stream_id)

    def reset_cache(self) -> None:
        """Forget the cached head (after a wipe)."""
        self._appender.reset_cache()

    # --- append -------------------------------------------------------------------------

    @property
    def committer(self) -> GroupCommitter[AppendRequest, list[int]]:
        """The process-wide group committer this log's appends go through (tests, metrics)."""
        return self._appender.committer

    def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Atomically append ``events``; return their positions.

        Concurrent appends of this process are group-committed (see :mod:`torus_etcd._append`):
        one etcd transaction carries several callers' batches, each still atomic, contiguous
        and accepted or rejected on its own.
        """
        events = tuple(events)
        if not events:
            return []
        streams = check_batch(events)
        if self._t.closed:
            raise Closed("etcd backend is closed")

        def attempt(batch_id: bytes, retry: bool) -> list[int]:
            return self._appender.append(AppendRequest(self._t, events, streams, batch_id, retry))

        return self._memo.append(events, attempt)

    # --- reads --------------------------------------------------------------------------

    def _range(self, key: bytes, end: bytes, limit: int | None) -> RangeResponse:
        if limit is not None and limit < 0:
            raise InvalidArgument("limit must be >= 0")
        resp: RangeResponse = self._t.call(
            "KV", "Range", etcdrpc.RangeRequest(key=key, range_end=end, limit=limit or 0)
        )
        return resp

    def read_stream(self, stream_id: str, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events of ``stream_id`` with version > ``after``, oldest first (one range read)."""
        if limit == 0:
            return []
        sp = self._stream_prefix(stream_id)
        resp = self._range(sp + _num(max(after, 0) + 1), prefix_end(sp), limit)
        return [decode_event(kv.value)[0] for kv in resp.kvs]

    def stream_version(self, stream_id: str) -> int:
        """The stream's newest version (0 if empty)."""
        sp = self._stream_prefix(stream_id)
        resp: RangeResponse = self._t.call("KV", "Range", last_version_request(sp))
        return int(resp.kvs[0].key.rsplit(b"/", 1)[1]) if resp.kvs else 0

    def read_all(self, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events with position > ``after`` in position order (one range read)."""
        if limit == 0:
            return []
        resp = self._range(
            self._event_prefix + _num(max(after, 0) + 1), prefix_end(self._event_prefix), limit
        )
        return [decode_event(kv.value)[0] for kv in resp.kvs]

    def head_position(self) -> int:
        """The global head position (0 for an empty log)."""
        resp: RangeResponse = self._t.call("KV", "Range", etcdrpc.RangeRequest(key=self._head_key))
        return int(resp.kvs[0].value) if resp.kvs else 0

    def wait_for_events(self, after: int, timeout: float) -> list[StoredEvent]:
        """Return events after ``after``, waiting up to ``timeout`` s on an etcd watch of the head key."""
        deadline = time.monotonic() + max(0.0, timeout)
        req = etcdrpc.RangeRequest(
            key=self._event_prefix + _num(max(after, 0) + 1), range_end=prefix_end(self._event_prefix)
        )
        resp: RangeResponse = self._t.call("KV", "Range", req)
        if resp.kvs:
            return [decode_event(kv.value)[0] for kv in resp.kvs]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return []
        if self._watch_head(resp.header.revision + 1, remaining):
            return self.read_all(after=after)
        return []

    def _watch_head(self, start_revision: int, timeout: float) -> bool:
        """Block until the head key changes at or after ``start_revision``; False on timeout."""
        done = threading.Event()
        deadline = time.monotonic() + timeout
        create = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(key=self._head_key, start_revision=start_revision)
        )

        def requests() -> Iterator[Any]:  # etcdrpc.WatchRequest (etcd3 ships no type hints)
            yield create
            done.wait(timeout + 5.0)

        call: StreamCall[WatchResponse]
        call, _ep = self._t.stream("Watch", "Watch", requests(), timeout)
        try:
            for wresp in call:
                if wresp.events or wresp.canceled or wresp.compact_revision:
                    return True
            return False
        except grpc.RpcError as exc:
            err = translate(exc)
            if isinstance(err, MetadataUnavailable) and time.monotonic() >= deadline - 0.05:
                return False  # our own deadline ended the watch: a plain timeout
            self._t.fail_over()
            raise err from exc
        finally:
            done.set()
            call.cancel()

    # --- snapshots ----------------------------------------------------------------------

    def _snap_key(self, name: str) -> bytes:
        return self._snap_prefix + quote(name, safe="").encode()

    def save_snapshot(self, name: str, position: int, state: bytes) -> None:
        """Store (replace) the snapshot ``name`` taken at ``position``."""
        if position < 0:
            raise InvalidArgument("snapshot position must be >= 0")
        value = position.to_bytes(8, "big") + bytes(state)
        self._t.call("KV", "Put", etcdrpc.PutRequest(key=self._snap_key(name), value=value))

    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        """Return ``(position, state)`` of snapshot ``name`` or ``None``."""
        resp: RangeResponse = self._t.call("KV", "Range", etcdrpc.RangeRequest(key=self._snap_key(name)))
        if not resp.kvs:
            return None
        v = resp.kvs[0].value
        return int.from_bytes(v[:8], "big"), bytes(v[8:])
