"""Volume journals replicated over the cluster: :class:`RemoteJournalReplicas`.

Placement: the replicas of volume V's journal are the first R peers (R = the ring's
replication) of the ring's permutation for :func:`journal_ref` ``(V)`` -- ``BlockRef(V, 0, 0)``,
a data ref no volume block uses (indexes start at 1) -- recomputed only when the ring version
changes. Peers marked down by the membership are skipped and peers whose last call failed
("suspects", 2 s) are tried last, so a dead replica is replaced by the next peer of the
permutation, as hinted handoff does for blocks (docs/cluster.md).

* :meth:`~RemoteJournalReplicas.append` sends the batch to those R peers in one parallel round
  of unary ``JournalAppend`` calls and returns when R distinct peers acknowledged it durable.
  The request is encoded once; one blocking call runs in the calling thread, the others (and
  this peer's own replica, appended directly: no RPC to itself) on helper threads handed the
  work with two plain locks. (gRPC's asynchronous ``future()`` calls measured about twice as
  slow as blocking ones, a ThreadPoolExecutor round trip ten times a lock handoff.)
  A replica that fails hands the batch to the next untried peer of the permutation; too few
  reachable peers raise :class:`~torus_core.errors.ReplicationFailed`, a replica that saw a
  newer lock epoch :class:`~torus_core.errors.StaleEpoch` (nothing is retried then).
* :meth:`~RemoteJournalReplicas.fence` and :meth:`~RemoteJournalReplicas.read` ask **every**
  reachable ring member (records handed off live outside the first R), and need answers from
  at least ``members - R + 1`` of them: every acknowledged batch is on R distinct members, so
  such a set meets each one (else ``ReplicationFailed``, retryable).
* :meth:`~RemoteJournalReplicas.trim` is best effort on every reachable member.

Appends to a peer that advertises a journal channel (:mod:`torus_core.journal.channel`; set
:attr:`~RemoteJournalReplicas.channel_address`) go over it instead of gRPC: a framed request on
a kept-open TCP (or TLS, the pool's certificates) connection costs a fraction of a gRPC call. A
refused channel connection falls back to the peer's ``JournalAppend`` RPC, and that peer's appends
stay on gRPC for the next ``suspect`` seconds.

Records that outlive a ring change on a peer that left the ring are not found by ``read``
(checkpoints trim the journal often, so only the tail since the last checkpoint is at risk).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from typing import TypeVar

from torus_core.distributor.peercalls import PeerCalls
from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import (
    InvalidArgument,
    NoPeer,
    NotSupported,
    PeerUnavailable,
    ReplicationFailed,
    StaleEpoch,
    TorusError,
)
from torus_core.journal.channel import ChannelRefused, JournalChannelClient, encode_append
from torus_core.journal.record import JournalRecord, decode_record
from torus_core.journal.store import JournalStore
from torus_core.refs import VOLUME_MAX, BlockRef
from torus_core.ring.base import Ring
from torus_core.rpc.client import PeerClient, PeerClientPool
from torus_core.rpc.wire import encode_journal_append

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a peer whose journal call failed is tried after the others.
DEFAULT_SUSPECT = 2.0
#: Deadline of one journal RPC.
DEFAULT_TIMEOUT = 5.0


def journal_ref(volume_id: int) -> BlockRef:
    """The ref whose ring permutation places volume ``volume_id``'s journal."""
    if not isinstance(volume_id, int) or isinstance(volume_id, bool) or not 0 < volume_id <= VOLUME_MAX:
        raise InvalidArgument(f"bad journal volume id {volume_id!r}")
    return BlockRef(volume_id, 0, 0)


class _Placement:
    """The permutation of one volume's journal under one ring version."""

    __slots__ = ("peers", "replication", "version")

    def __init__(self, version: int, peers: tuple[str, ...], replication: int) -> None:
        self.version = version
        self.peers = peers
        self.replication = replication


class _Helper:
    """A thread that runs one call at a time for an append round, handed over with two plain
    locks: a ThreadPoolExecutor round trip costs about ten times more (~190 vs ~17 us here)."""

    __slots__ = ("_abandoned", "_done", "_fn", "_go", "error")

    def __init__(self) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._fn: Callable[[], object] | None = None
        self._abandoned = False
        #: what the last call raised (None: it returned)
        self.error: BaseException | None = None
        threading.Thread(target=self._loop, name="torus-journal-append", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._go.acquire()
            fn = self._fn
            if fn is None:
                return
            self._fn = None
            try:
                fn()
                self.error = None
            except BaseException as exc:
                self.error = exc
            self._done.release()
            if self._abandoned:
                return

    def start(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the helper's thread."""
        self._fn = fn
        self._go.release()

    def wait(self, timeout: float) -> bool:
        """Wait for the call; False if it did not end within ``timeout`` (the helper is then
        abandoned: its thread exits once the call ends)."""
        if self._done.acquire(timeout=timeout):
            return True
        self._abandoned = True
        return False

    def stop(self) -> None:
        """End the idle helper's thread."""
        self._fn = None
        self._go.release()


class _Outcome:
    """What went wrong in one append round: refusals are raised, failures handed off."""

    __slots__ = ("refused",)

    def __init__(self) -> None:
        self.refused: TorusError | None = None

    def add(
        self,
        owner: RemoteJournalReplicas,
        uuid: str,
        address: str | None,
        exc: BaseException,
        failed: dict[str, BaseException],
        volume_id: int,
    ) -> None:
        if isinstance(exc, StaleEpoch):
            self.refused = exc
        elif isinstance(exc, InvalidArgument):
            if not isinstance(self.refused, StaleEpoch):
                self.refused = exc
        elif isinstance(exc, Exception):  # a peer failure or a local disk error: hand off
            if address is None:
                log.warning("local journal append for volume %d failed: %s", volume_id, exc)
            failed[uuid] = exc
            owner._failed(uuid, address, exc)
        else:
            raise exc


class RemoteJournalReplicas:
    """:class:`~torus_core.journal.replicas.JournalReplicas` over the ring's peers (see the
    module docstring).

    :param self_uuid: this process's peer UUID; its replica is ``local`` (no RPC to itself).
    :param local: this peer's journal store (None for a process that stores no journal).
    :param ring: returns the ring in force (e.g. ``lambda: node.distributor.ring``).
    :param peers: the membership's peer directory (addresses, peers marked down).
    :param pool: the per-peer gRPC clients (shared with the distributor).
    :param timeout: deadline of each journal RPC, in seconds.
    :param suspect: seconds a peer whose call failed is tried after the others.
    :param max_workers: helper threads (parallel appends, fence, read, trim).
    :param prefer_local: this peer's own store is always one of the R replicas (when it is a
        ring member with a journal store), then the permutation's first other peers. Safe
        because fence and read ask every member; off by default (placement then does not
        depend on which peer writes).
    """

    def __init__(
        self,
        self_uuid: str,
        local: JournalStore | None,
        ring: Callable[[], Ring],
        peers: PeerDirectory,
        pool: PeerClientPool,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        suspect: float = DEFAULT_SUSPECT,
        max_workers: int = 8,
        prefer_local: bool = False,
    ) -> None:
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidArgument(f"journal RPC timeout must be positive, got {timeout!r}")
        self.self_uuid = self_uuid
        self.local = local
        self._ring = ring
        self.peers = peers
        self.pool = pool
        self.timeout = float(timeout)
        self.suspect_seconds = float(suspect)
        self._placements: dict[int, _Placement] = {}
        self._clients: dict[str, PeerClient] = {}
        self.calls = PeerCalls(peers, pool, self.suspect_seconds)
        self._lock = threading.Lock()
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._helpers: list[_Helper] = []  # idle append helpers (list ops are atomic)
        #: when this peer is one of the replicas: False (default, measured faster by
        #: bench/journal.py) runs one RPC in the calling thread and the local append on a helper
        #: thread; True swaps them
        self.local_inline = False
        #: place the journals this peer writes on itself plus the next R-1 peers of the
        #: permutation (one RPC fewer per append for a writer that is not among the first R)
        self.prefer_local = prefer_local
        #: ``uuid -> address`` of the peer's journal channel, "" or None for none (then appends
        #: use gRPC); None: never use channels. The cluster node sets it from the heartbeats.
        self.channel_address: Callable[[str], str | None] | None = None
        self._channels: dict[str, JournalChannelClient] = {}
        self._channel_off: dict[str, float] = {}  # uuid -> until when its channel is not used

    # --- placement ------------------------------------------------------------------------------

    def _placement(self, volume_id: int) -> _Placement:
        ring = self._ring()
        pl = self._placements.get(volume_id)
        if pl is not None and pl.version == ring.version:
            return pl
        perm = ring.get_peers(journal_ref(volume_id))
        peers = tuple(perm.peers)
        if self.prefer_local and self.local is not None and self.self_uuid in peers:
            peers = (self.self_uuid, *(p for p in peers if p != self.self_uuid))
        pl = _Placement(ring.version, peers, len(perm.owners))
        self._placements[volume_id] = pl
        return pl

    def replicas(self, volume_id: int) -> list[str]:
        """The peers that hold the volume's journal when all are up (the first R of its
        permutation; with ``prefer_local``, this peer and the first R-1 others)."""
        pl = self._placement(volume_id)
        return list(pl.peers[: pl.replication])

    def permutation(self, volume_id: int) -> list[str]:
        """Every ring member in the order appends try them for this volume."""
        return list(self._placement(volume_id).peers)

    # --- peers ----------------------------------------------------------------------------------

    def _client(self, address: str) -> PeerClient:
        client = self._clients.get(address)
        if client is None or client.closed:
            client = self.pool.get(address)
            self._clients[address] = client
        return client

    def _channel(self, uuid: str) -> JournalChannelClient | None:
        """The channel client of peer ``uuid`` when it advertises one (else None: use gRPC)."""
        lookup = self.channel_address
        address = lookup(uuid) if lookup is not None else None
        if not address:
            return None
        off = self._channel_off.get(uuid)
        if off is not None:
            if off > time.monotonic():
                return None
            self._channel_off.pop(uuid, None)
        chan = self._channels.get(uuid)
        if chan is not None and chan.address == address:
            return chan
        try:
            fresh = JournalChannelClient(
                address,
                tls=self.pool.tls,
                allow_insecure=self.pool.allow_insecure,
                timeout=self.timeout,
                auth=self.pool.auth,
            )
        except TorusError as exc:
            log.warning("journal channel of peer %s at %s unusable, using gRPC: %s", uuid, address, exc)
            return None
        with self._lock:
            old = self._channels.get(uuid)
            self._channels[uuid] = fresh
        if old is not None:
            old.close()
        return fresh

    def _append_channel(
        self,
        uuid: str,
        chan: JournalChannelClient,
        address: str,
        frame: bytes,
        volume_id: int,
        epoch: int,
        payloads: Sequence[bytes],
    ) -> None:
        """One append over the peer's channel; over gRPC if the channel refused the connection."""
        try:
            chan.append_encoded(frame, timeout=self.timeout)
        except ChannelRefused as exc:
            log.debug("journal channel %s refused (%s); appending over gRPC", chan.address, exc)
            self._channel_off[uuid] = time.monotonic() + self.suspect_seconds
            self._client(address).journal_append(volume_id, epoch, payloads, timeout=self.timeout)

    def _usable(self, uuid: str) -> bool:
        if uuid == self.self_uuid:
            return self.local is not None
        return self.calls.dialable(uuid)

    def _pick(self, perm: Sequence[str], tried: set[str], k: int) -> list[str]:
        """The next ``k`` untried, usable peers of ``perm``; suspects only as a last resort."""
        picked: list[str] = []
        later: list[str] = []
        for uuid in perm:
            if len(picked) >= k:
                break
            if uuid in tried:
                continue
            tried.add(uuid)
            if not self._usable(uuid):
                continue
            if self.calls.is_suspect(uuid):
                later.append(uuid)
            else:
                picked.append(uuid)
        for uuid in later:
            if len(picked) >= k:
                tried.discard(uuid)
            else:
                picked.append(uuid)
        return picked

    def _failed(self, uuid: str, address: str | None, exc: BaseException) -> None:
        if isinstance(exc, PeerUnavailable):
            self.calls.suspect(uuid)
            if address is not None:
                try:
                    self.pool.reset(address)
                except TorusError:
                    pass
                self._clients.pop(address, None)

    # --- append (the hot path) ------------------------------------------------------------------

    def append(self, volume_id: int, epoch: int, payloads: Sequence[bytes]) -> None:
        """Append encoded records to R distinct peers in parallel; returns once all of them
        acknowledged the batch durable (see the module docstring for handoff and errors)."""
        if not payloads:
            return
        pl = self._placement(volume_id)
        want = pl.replication
        if want <= 0:
            raise NoPeer(f"the ring has no peers for volume {volume_id}'s journal")
        tried: set[str] = set()
        acked: list[str] = []
        failed: dict[str, BaseException] = {}
        targets = self._pick(pl.peers, tried, want)
        while targets:
            self._append_round(volume_id, epoch, payloads, targets, acked, failed)
            short = want - len(acked)
            if short <= 0:
                return
            targets = self._pick(pl.peers, tried, short)
        for uuid in pl.peers:
            if uuid not in acked and uuid not in failed:
                failed[uuid] = PeerUnavailable(f"peer {uuid} is down or has no known address")
        raise ReplicationFailed(
            f"journal of volume {volume_id}: batch acknowledged by {len(acked)}/{want} distinct "
            f"peer(s) {sorted(acked)}; " + "; ".join(f"{u}: {e}" for u, e in failed.items()),
            acked=sorted(acked),
            failed=failed,
        )

    def _append_round(
        self,
        volume_id: int,
        epoch: int,
        payloads: Sequence[bytes],
        targets: list[str],
        acked: list[str],
        failed: dict[str, BaseException],
    ) -> None:
        """One parallel round: every target but one on the helper threads, one in this thread
        (blocking gRPC calls: cheaper than gRPC's asynchronous ones)."""
        remote: list[tuple[str, str, PeerClient]] = []
        channels: list[tuple[str, str, JournalChannelClient]] = []
        local = False
        for uuid in targets:
            if uuid == self.self_uuid:
                local = True
                continue
            address = self.peers.address(uuid)
            if address is None:
                failed[uuid] = PeerUnavailable(f"peer {uuid} is down or has no known address")
                continue
            chan = self._channel(uuid)
            if chan is not None:
                channels.append((uuid, address, chan))
                continue
            try:
                remote.append((uuid, address, self._client(address)))
            except TorusError as exc:
                failed[uuid] = exc
        request = encode_journal_append(volume_id, epoch, payloads) if remote else b""
        frame = encode_append(volume_id, epoch, payloads) if channels else b""
        jobs: list[tuple[str, str | None, Callable[[], object]]] = []
        if local:
            store = self.local
            assert store is not None
            jobs.append((self.self_uuid, None, partial(store.append, volume_id, epoch, payloads)))
        for uuid, address, client in remote:
            jobs.append(
                (uuid, address, partial(client.journal_append_encoded, request, timeout=self.timeout))
            )
        for uuid, address, chan in channels:
            jobs.append(
                (
                    uuid,
                    address,
                    partial(self._append_channel, uuid, chan, address, frame, volume_id, epoch, payloads),
                )
            )
        if not jobs:
            return
        inline = jobs.pop(0) if self.local_inline or not (remote or channels) else jobs.pop()
        pending: list[tuple[str, str | None, _Helper]] = []
        for uuid, address, fn in jobs:
            helper = self._helper()
            helper.start(fn)
            pending.append((uuid, address, helper))
        outcome = _Outcome()
        uuid, address, fn = inline
        try:
            fn()
            acked.append(uuid)
        except BaseException as exc:
            outcome.add(self, uuid, address, exc, failed, volume_id)
        deadline = time.monotonic() + self.timeout + 1.0
        for uuid, address, helper in pending:
            if not helper.wait(max(0.0, deadline - time.monotonic())):
                late = PeerUnavailable(f"journal append on {uuid} did not finish in time", address=address)
                outcome.add(self, uuid, address, late, failed, volume_id)
                continue  # the helper is abandoned: it exits when the call ends
            error = helper.error
            self._helpers.append(helper)
            if error is None:
                acked.append(uuid)
            else:
                outcome.add(self, uuid, address, error, failed, volume_id)
        if outcome.refused is not None:
            raise outcome.refused

    # --- fence / read / trim: every reachable ring member ----------------------------------------

    def _helper(self) -> _Helper:
        try:
            return self._helpers.pop()
        except IndexError:
            return _Helper()

    def _pool(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is not None:
            return executor
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._max_workers, thread_name_prefix="torus-journal"
                )
            return self._executor

    def _everyone(
        self,
        what: str,
        volume_id: int,
        local_fn: Callable[[JournalStore], T],
        remote_fn: Callable[[PeerClient], T],
    ) -> tuple[dict[str, T], dict[str, BaseException], int]:
        """Run ``local_fn`` / ``remote_fn`` on every usable ring member in parallel (bounded by
        the RPC deadline); returns the answers, the failures and the number of ring members."""
        pl = self._placement(volume_id)
        results: dict[str, T] = {}
        failed: dict[str, BaseException] = {}
        futures: dict[Future[T], tuple[str, str | None]] = {}
        local = False
        executor = self._pool()
        for uuid in pl.peers:
            if uuid == self.self_uuid:
                if self.local is not None:
                    local = True
                else:
                    failed[uuid] = NoPeer(f"peer {uuid} is this process, which keeps no journal")
                continue
            address = self.peers.address(uuid)
            if address is None:
                failed[uuid] = PeerUnavailable(f"peer {uuid} is down or has no known address")
                continue
            try:
                client = self._client(address)
            except TorusError as exc:
                failed[uuid] = exc
                continue
            futures[executor.submit(remote_fn, client)] = (uuid, address)
        if local:
            assert self.local is not None
            try:
                results[self.self_uuid] = local_fn(self.local)
            except (StaleEpoch, InvalidArgument):
                raise
            except Exception as exc:
                log.warning("local journal %s for volume %d failed: %s", what, volume_id, exc)
                failed[self.self_uuid] = exc
        done, pending = wait(futures, timeout=self.timeout + 1.0)
        for fut in pending:
            fut.cancel()
            uuid, _ = futures[fut]
            failed[uuid] = PeerUnavailable(f"journal {what} on {uuid} did not finish in time")
        refused: TorusError | None = None
        for fut in done:
            uuid, address = futures[fut]
            error = fut.exception()
            if error is None:
                results[uuid] = fut.result()
            elif isinstance(error, StaleEpoch | InvalidArgument):
                if not isinstance(refused, StaleEpoch):
                    refused = error
            else:
                failed[uuid] = error
                self._failed(uuid, address, error)
        if refused is not None:
            raise refused
        return results, failed, len(pl.peers)

    def _need_quorum(
        self, what: str, volume_id: int, answered: int, failed: dict[str, BaseException], members: int
    ) -> None:
        replication = self._placement(volume_id).replication
        need = max(1, members - replication + 1)
        if answered < need:
            raise ReplicationFailed(
                f"journal {what} of volume {volume_id}: {answered} of {members} ring member(s) "
                f"answered, {need} needed to meet every replica set; "
                + "; ".join(f"{u}: {e}" for u, e in failed.items()),
                acked=[],
                failed=failed,
            )

    def fence(self, volume_id: int, epoch: int) -> int:
        """Raise the volume's epoch on every reachable ring member; returns the highest
        sequence number any of them stores. StaleEpoch if one saw a newer epoch;
        ReplicationFailed if too few members answered to be sure of the highest number."""
        timeout = self.timeout

        def remote(client: PeerClient) -> int:
            try:
                return client.journal_fence(volume_id, epoch, timeout=timeout)
            except NotSupported:
                return 0  # a peer without a journal store holds no records and accepts none

        results, failed, members = self._everyone(
            "fence", volume_id, lambda store: store.fence(volume_id, epoch), remote
        )
        self._need_quorum("fence", volume_id, len(results), failed, members)
        return max(results.values(), default=0)

    def read(self, volume_id: int, after_seq: int) -> list[JournalRecord]:
        """Records with ``seq > after_seq`` from every reachable ring member, duplicates
        included (merge them with :func:`~torus_core.journal.replicas.select_replay`)."""
        timeout = self.timeout

        def remote(client: PeerClient) -> list[JournalRecord]:
            try:
                raws = client.journal_read(volume_id, after_seq, timeout=timeout)
            except NotSupported:
                return []
            out: list[JournalRecord] = []
            for raw in raws:
                try:
                    rec = decode_record(raw)
                except InvalidArgument as exc:
                    log.warning("peer %s sent a bad journal record: %s", client.address, exc)
                    continue
                if rec.volume_id == volume_id and rec.seq > after_seq:
                    out.append(rec)
            return out

        results, failed, members = self._everyone(
            "read", volume_id, lambda store: store.read(volume_id, after_seq), remote
        )
        self._need_quorum("read", volume_id, len(results), failed, members)
        return [rec for uuid in sorted(results) for rec in results[uuid]]

    def trim(self, volume_id: int, epoch: int, through_seq: int) -> None:
        """Ask every reachable ring member to drop records ``<= through_seq`` (best effort:
        failures are logged). StaleEpoch if one saw a newer epoch."""
        timeout = self.timeout

        def remote(client: PeerClient) -> int:
            try:
                return client.journal_trim(volume_id, epoch, through_seq, timeout=timeout)
            except NotSupported:
                return 0

        _, failed, _ = self._everyone(
            "trim", volume_id, lambda store: store.trim(volume_id, epoch, through_seq), remote
        )
        for uuid, exc in failed.items():
            log.debug("journal trim of volume %d on %s skipped: %s", volume_id, uuid, exc)

    def close(self) -> None:
        """Stop the helper threads (the pool and the store are the caller's). A later call
        starts new ones."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        while self._helpers:
            try:
                self._helpers.pop().stop()
            except IndexError:
                break
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for chan in channels:
            chan.close()
