"""Group-committed appends on etcd: concurrent batches of one process share one ``Txn``.

Every append contends on the single global head key, so N writers sending one transaction
each would mostly fail their head compare and retry. Instead, one :class:`EtcdAppender` per
(cluster, prefix) in the process gathers concurrent batches with a
:class:`~torus_core.groupcommit.GroupCommitter` and commits a group as **one** transaction:

* compares: the head key's ``mod_revision`` (as last seen) and, for every batch's every stream,
  "key of the first new version is absent" and "key of the version before it exists";
* success: the new head and, per event, the event key and the stream-index key; positions are
  assigned batch after batch, so each batch's positions are contiguous and the group's are
  gap-free, in commit order;
* failure: reads the head and every stream's newest version in the same round trip.

On failure the leader tells, per batch, a stale stream version (that batch alone gets
:class:`CompareFailed`, nothing written) from a lost race on the head (the batch is retried);
the remaining batches are retried at once with the new head (bounded). A group holds batches
with disjoint streams only and stays within etcd's per-transaction operation limit
(``--max-txn-ops``, 128 by default) and a byte budget; a batch that alone exceeds the limit is
sent alone and gets etcd's :class:`InvalidArgument` as before. If the server rejects a combined
transaction as invalid (e.g. a lower ``--max-txn-ops``), each batch is retried alone.
"""

from __future__ import annotations

import random
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any  # etcd3's generated request messages are untyped; responses have protocols
from urllib.parse import quote

from etcd3 import etcdrpc

from torus_core.errors import Again, Closed, CompareFailed, InvalidArgument, TorusError
from torus_core.eventlog import NewEvent
from torus_core.groupcommit import GroupCommitter
from torus_etcd._codec import decode_event, encode_event
from torus_etcd._transport import EtcdTransport, RangeResponse, TxnResponse

#: How many head races one group may lose before its batches get :class:`Again`.
MAX_HEAD_RETRIES = 200
#: etcd's default ``--max-txn-ops``: limit on compares, success ops and failure ops of a Txn.
MAX_TXN_OPS = 128
#: Most batches in one combined transaction.
MAX_GROUP = 32
#: Encoded event bytes one combined transaction may carry (each event is stored twice; etcd's
#: default request limit is 1.5 MiB).
GROUP_BYTES = 384 * 1024


def num(n: int) -> bytes:
    """A position or version as a fixed-width, sortable key component."""
    return b"%020d" % n


def prefix_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def last_version_request(stream_prefix: bytes) -> Any:
    """A ``RangeRequest`` for the key of the newest version under ``stream_prefix`` (keys only)."""
    return etcdrpc.RangeRequest(
        key=stream_prefix,
        range_end=prefix_end(stream_prefix),
        limit=1,
        keys_only=True,
        sort_order=etcdrpc.RangeRequest.DESCEND,
        sort_target=etcdrpc.RangeRequest.KEY,
    )


@dataclass(slots=True)
class AppendRequest:
    """One caller's validated batch, as queued for a group commit."""

    transport: EtcdTransport
    events: tuple[NewEvent, ...]
    #: ``{stream: (first_version, last_version)}`` in batch order.
    streams: dict[str, tuple[int, int]]
    batch_id: bytes
    #: True when this is a retry of a batch whose earlier attempt's outcome is unknown.
    retry_of_uncertain: bool
    #: Operations this batch adds to a transaction: (compares, success puts, failure reads).
    ops: tuple[int, int, int] = (0, 0, 0)
    size: int = 0

    def __post_init__(self) -> None:
        cmp = sum(2 if first > 1 else 1 for first, _ in self.streams.values())
        self.ops = (cmp, 2 * len(self.events), len(self.streams))
        self.size = sum(len(e.state) + len(e.stream_id) + len(e.topic) + 64 for e in self.events)


class EtcdAppender:
    """The head cache and group committer shared by every event log of one (cluster, prefix)."""

    def __init__(self, prefix: bytes) -> None:
        self.head_key = prefix + b"log/head"
        self.event_prefix = prefix + b"log/e/"
        self.stream_root = prefix + b"log/s/"
        self._lock = threading.Lock()
        self._head: tuple[int, int] = (0, 0)  # (position, mod_revision) last seen
        self.committer: GroupCommitter[AppendRequest, list[int]] = GroupCommitter(
            self._commit, backend="etcd", max_group=MAX_GROUP, fits=self._fits
        )

    # --- keys ---------------------------------------------------------------------------

    def stream_prefix(self, stream_id: str) -> bytes:
        """Key prefix of the stream index of ``stream_id``."""
        return self.stream_root + quote(stream_id, safe="").encode() + b"/"

    def stream_key(self, stream_id: str, version: int) -> bytes:
        """Key of version ``version`` in the stream index of ``stream_id``."""
        return self.stream_prefix(stream_id) + num(version)

    def reset_cache(self) -> None:
        """Forget the cached head (after a wipe)."""
        with self._lock:
            self._head = (0, 0)

    def _observe_head(self, head: int, rev: int) -> None:
        with self._lock:
            if rev >= self._head[1]:
                self._head = (head, rev)

    # --- append -------------------------------------------------------------------------

    def append(self, request: AppendRequest) -> list[int]:
        """Commit ``request`` (grouped with concurrent ones); return its positions."""
        timeout = request.transport.config.timeout
        return self.committer.submit(request, wait_timeout=2 * timeout + 1.0)

    @staticmethod
    def _fits(group: Sequence[AppendRequest], request: AppendRequest) -> bool:
        cmp, put, fail = request.ops
        size = request.size
        streams = request.streams.keys()
        for r in group:
            if not streams.isdisjoint(r.streams):
                return False
            cmp, put, fail = cmp + r.ops[0], put + r.ops[1], fail + r.ops[2]
            size += r.size
        limit = MAX_TXN_OPS - 1  # the head compare / head put / head read
        return cmp <= limit and put <= limit and fail <= limit and size <= GROUP_BYTES

    def _txn(self, group: Sequence[AppendRequest], head: int, rev: int) -> Any:
        """The combined transaction for ``group`` given the head ``(head, rev)`` last seen."""
        R = etcdrpc.RequestOp
        cmp = [
            etcdrpc.Compare(
                result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.MOD, key=self.head_key, mod_revision=rev
            )
        ]
        failure = [R(request_range=etcdrpc.RangeRequest(key=self.head_key))]
        total = sum(len(r.events) for r in group)
        success = [R(request_put=etcdrpc.PutRequest(key=self.head_key, value=str(head + total).encode()))]
        now = time.time()
        pos = head
        for r in group:
            for sid, (first, _last) in r.streams.items():
                sp = self.stream_prefix(sid)
                cmp.append(
                    etcdrpc.Compare(
                        result=etcdrpc.Compare.EQUAL,
                        target=etcdrpc.Compare.CREATE,
                        key=sp + num(first),
                        create_revision=0,
                    )
                )
                if first > 1:
                    cmp.append(
                        etcdrpc.Compare(
                            result=etcdrpc.Compare.GREATER,
                            target=etcdrpc.Compare.CREATE,
                            key=sp + num(first - 1),
                            create_revision=0,
                        )
                    )
                failure.append(R(request_range=last_version_request(sp)))
            for ev in r.events:
                pos += 1
                data = encode_event(ev, pos, now, r.batch_id)
                event_key = self.event_prefix + num(pos)
                index_key = self.stream_key(ev.stream_id, ev.version)
                success.append(R(request_put=etcdrpc.PutRequest(key=event_key, value=data)))
                success.append(R(request_put=etcdrpc.PutRequest(key=index_key, value=data)))
        return etcdrpc.TxnRequest(compare=cmp, success=success, failure=failure)

    def _commit(self, group: Sequence[AppendRequest]) -> list[list[int] | BaseException]:
        """Commit ``group`` (one combined transaction per attempt); one outcome per request."""
        outcomes: list[list[int] | BaseException | None] = [None] * len(group)
        live = list(range(len(group)))
        with self._lock:
            head, rev = self._head
        for attempt in range(MAX_HEAD_RETRIES):
            if not live:
                break
            transport = next((group[i].transport for i in live if not group[i].transport.closed), None)
            if transport is None:
                for i in live:
                    outcomes[i] = Closed("etcd backend is closed")
                live = []
                break
            reqs = [group[i] for i in live]
            try:
                resp: TxnResponse = transport.call("KV", "Txn", self._txn(reqs, head, rev))
            except Closed:
                continue  # closed meanwhile: the next attempt uses another caller's connection
            except InvalidArgument as exc:
                if len(live) == 1:
                    outcomes[live[0]] = exc
                else:  # the server's limits are lower than assumed: commit each batch alone
                    for i in live:
                        outcomes[i] = self._commit([group[i]])[0]
                live = []
                break
            except TorusError as exc:
                for i in live:
                    outcomes[i] = exc
                live = []
                break
            if resp.succeeded:
                pos = head
                for i in live:
                    n = len(group[i].events)
                    outcomes[i] = list(range(pos + 1, pos + 1 + n))
                    pos += n
                self._observe_head(pos, resp.header.revision)
                live = []
                break
            live = self._after_failure(group, live, resp, transport, outcomes)
            kvs = resp.responses[0].response_range.kvs
            head, rev = (int(kvs[0].value), kvs[0].mod_revision) if kvs else (0, 0)
            self._observe_head(head, rev)
            if attempt > 3:
                time.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
        for i in live:
            outcomes[i] = Again(f"append lost {MAX_HEAD_RETRIES} races for the global head; retry")
        return [o if o is not None else Again("append was not attempted; retry") for o in outcomes]

    def _after_failure(
        self,
        group: Sequence[AppendRequest],
        live: list[int],
        resp: TxnResponse,
        transport: EtcdTransport,
        outcomes: list[list[int] | BaseException | None],
    ) -> list[int]:
        """Settle the batches whose streams moved; return the ones to retry (lost the head race)."""
        still: list[int] = []
        j = 1
        for i in live:
            stale: tuple[str, int, int] | None = None
            for sid, (first, _last) in group[i].streams.items():
                skvs = resp.responses[j].response_range.kvs
                j += 1
                current = int(skvs[0].key.rsplit(b"/", 1)[1]) if skvs else 0
                if current != first - 1 and stale is None:
                    stale = (sid, current, first)
            if stale is None:
                still.append(i)
                continue
            try:
                done = self._committed_earlier(transport, group[i])
            except TorusError as exc:
                outcomes[i] = exc
                continue
            sid, current, first = stale
            outcomes[i] = (
                done
                if done is not None
                else CompareFailed(
                    f"stream {sid!r} is at version {current}; append expected {first - 1}",
                    stream_id=sid,
                    version=first,
                )
            )
        return still

    def _committed_earlier(self, transport: EtcdTransport, request: AppendRequest) -> list[int] | None:
        """If an earlier attempt of this very batch (timed out) did commit, return its positions."""
        if not request.retry_of_uncertain:
            return None
        first = request.events[0]
        resp: RangeResponse = transport.call(
            "KV", "Range", etcdrpc.RangeRequest(key=self.stream_key(first.stream_id, first.version))
        )
        if not resp.kvs:
            return None
        stored, stored_batch = decode_event(resp.kvs[0].value)
        if stored_batch != request.batch_id:
            return None
        return list(range(stored.position, stored.position + len(request.events)))


_APPENDERS: weakref.WeakValueDictionary[tuple[Any, ...], EtcdAppender] = weakref.WeakValueDictionary()
_APPENDERS_GUARD = threading.Lock()


def appender_for(transport: EtcdTransport, prefix: bytes) -> EtcdAppender:
    """The process-wide appender of the cluster and credentials of ``transport`` under ``prefix``.

    Logs with the same endpoints, credentials and prefix share it (and so group their appends);
    it lives as long as one of them does.
    """
    c = transport.config
    key = (tuple(sorted(c.endpoints)), prefix, c.user, c.password, c.ca_file, c.cert_file, c.key_file)
    with _APPENDERS_GUARD:
        appender = _APPENDERS.get(key)
        if appender is None:
            appender = EtcdAppender(prefix)
            _APPENDERS[key] = appender
        return appender
