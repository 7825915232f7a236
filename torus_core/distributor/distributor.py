"""The Distributor: a :class:`~torus_core.blockstore.BlockStore` replicated over the ring.

Reads try the LRU cache, then the local store, then remote peers according to the read level;
writes go to the ring's owners of each block according to the write level (see
:mod:`torus_core.distributor.levels`). A read that finds a missing or corrupt copy on an owner
writes the good copy back to it (read repair, asynchronous and bounded).

Wiring (a storage daemon)::

    store = MemBlockStore.open(cfg)            # or the file store
    server = PeerServer(store, uuid=me, address="127.0.0.1:40000", tls=tls).start()
    peers = PeerDirectory({me: server.address})
    pool = PeerClientPool(tls=tls)
    dist = Distributor(me, store, ring, peers, pool)
    ...membership updates: peers.replace(...); ring changes: dist.set_ring(new_ring)
    dist.close(); server.stop(); pool.close()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.distributor.cache import BlockCache
from torus_core.distributor.levels import ReadLevel, WriteLevel
from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import (
    BlockExists,
    BlockNotExist,
    Closed,
    ConfigError,
    CorruptBlock,
    InvalidArgument,
    NoPeer,
    NoPeersBlock,
    NotSupported,
    OutOfSpace,
    PeerUnavailable,
    ReplicationFailed,
    StaleRing,
    TorusError,
)
from torus_core.refs import BlockRef
from torus_core.ring.base import Ring
from torus_core.rpc.client import PeerClientPool
from torus_core.rpc.server import write_replacing_corrupt

log = logging.getLogger(__name__)

BlockData = bytes | bytearray | memoryview

#: Default read cache size.
DEFAULT_READ_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class DistributorTimeouts:
    """Bounds on every remote operation, in seconds.

    :param read_peer: deadline of the first GetBlock to one peer.
    :param read_peer_max: cap of the per-peer deadline as ``block`` reads back off (x2 per pass).
    :param read_attempts: passes over the permutation for the ``block`` read level.
    :param read_total: overall bound of one read, whatever the level.
    :param retry_pause: pause before the second pass of a ``block`` read (doubles per pass).
    :param write: deadline of one PutBlocks call (includes the remote flush).
    :param check: deadline of one RebalanceCheck (``has_block``).
    :param repair: deadline of one read-repair write.
    """

    read_peer: float = 0.5
    read_peer_max: float = 2.0
    read_attempts: int = 3
    read_total: float = 10.0
    retry_pause: float = 0.05
    write: float = 5.0
    check: float = 2.0
    repair: float = 5.0

    def __post_init__(self) -> None:
        for name in ("read_peer", "read_peer_max", "read_total", "write", "check", "repair"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise InvalidArgument(f"timeout {name!r} must be a positive number, got {value!r}")
        if not isinstance(self.read_attempts, int) or not 1 <= self.read_attempts <= 10:
            raise InvalidArgument(f"read_attempts must be in [1, 10], got {self.read_attempts!r}")
        if not isinstance(self.retry_pause, int | float) or not 0 <= self.retry_pause <= 5:
            raise InvalidArgument(f"retry_pause must be in [0, 5], got {self.retry_pause!r}")


@dataclass
class DistributorStats:
    """Counters of where reads were served from and what repair did (thread-safe increments)."""

    local_reads: int = 0
    remote_reads: int = 0
    remote_failures: int = 0
    repairs: int = 0
    repair_failures: int = 0
    repairs_skipped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def inc(self, name: str, by: int = 1) -> None:
        """Add ``by`` to counter ``name``."""
        with self._lock:
            setattr(self, name, getattr(self, name) + by)


class _ReadOutcome:
    """What each source said during one read (used for the final error and for repair)."""

    def __init__(self) -> None:
        self.missing: list[str] = []
        self.corrupt: list[str] = []
        self.unavailable: dict[str, BaseException] = {}

    def record(self, source: str, exc: BaseException) -> None:
        if isinstance(exc, CorruptBlock):
            self.corrupt.append(source)
        elif isinstance(exc, BlockNotExist):
            self.missing.append(source)
        else:
            self.unavailable[source] = exc

    @property
    def transient(self) -> bool:
        return bool(self.unavailable)

    def error(self, ref: BlockRef) -> TorusError:
        if not self.unavailable and not self.corrupt and self.missing:
            return BlockNotExist(f"block {ref} not found on {len(self.missing)} peer(s)")
        if not self.unavailable and self.corrupt:
            return CorruptBlock(f"block {ref}: every copy found was corrupt ({', '.join(self.corrupt)})")
        parts = [f"{src}: {exc}" for src, exc in self.unavailable.items()]
        if self.missing:
            parts.append(f"missing on {', '.join(self.missing)}")
        if self.corrupt:
            parts.append(f"corrupt on {', '.join(self.corrupt)}")
        detail = "; ".join(parts) or "no peers to ask"
        return NoPeersBlock(f"no peer could provide block {ref} ({detail})")


class Distributor(BlockStore):
    """A block store whose blocks live on the ring's owners.

    :param self_uuid: this process's peer UUID (a client's UUID is simply not in the ring).
    :param local_store: this peer's store, or None for a client without a write cache. It is
        closed by :meth:`close` unless ``close_local_store`` is false.
    :param ring: the current ring.
    :param peers: UUID -> address directory fed by membership.
    :param pool: channels to peers; one is created (and closed with the distributor) if None.
    :param read_level: default read level.
    :param write_level: default write level (``local`` needs a local store).
    :param read_cache_bytes: LRU read cache size; 0 disables it.
    :param timeouts: bounds on remote operations.
    :param block_size: required when there is no local store.
    :param max_workers: threads for parallel replica writes and spread reads.
    :param max_pending_repairs: read repairs queued beyond this are skipped (the rebalancer
        catches up later).
    """

    name: ClassVar[str] = "distributor"
    #: Durability comes from the peers' stores; the distributor itself cannot be "reopened".
    persistent: ClassVar[bool] = False

    def __init__(
        self,
        self_uuid: str,
        local_store: BlockStore | None,
        ring: Ring,
        peers: PeerDirectory,
        pool: PeerClientPool | None = None,
        *,
        read_level: ReadLevel | str = ReadLevel.BLOCK,
        write_level: WriteLevel | str = WriteLevel.ALL,
        read_cache_bytes: int = DEFAULT_READ_CACHE_BYTES,
        timeouts: DistributorTimeouts | None = None,
        block_size: int | None = None,
        max_workers: int = 16,
        max_pending_repairs: int = 64,
        close_local_store: bool = True,
    ) -> None:
        if local_store is not None:
            if block_size is not None and block_size != local_store.block_size:
                raise ConfigError(
                    f"block_size {block_size} differs from the local store's {local_store.block_size}"
                )
            block_size = local_store.block_size
        if not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError("a Distributor without a local store needs a positive block_size")
        self.self_uuid = self_uuid
        self.local_store = local_store
        self.peers = peers
        self.read_level = ReadLevel.parse(read_level)
        self.write_level = WriteLevel.parse(write_level)
        if self.write_level is WriteLevel.LOCAL and local_store is None:
            raise ConfigError("write level 'local' needs a local store (a write cache)")
        self.timeouts = timeouts or DistributorTimeouts()
        self.cache = BlockCache(read_cache_bytes)
        self.stats = DistributorStats()
        self._block_size = block_size
        self._own_pool = pool is None
        self.pool = pool if pool is not None else PeerClientPool()
        self._ring = ring
        self._ring_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="torus-dist")
        self._repair_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="torus-repair")
        self._repairs: dict[BlockRef, Future[None]] = {}
        self._late_reads: set[Future[bytes]] = set()
        self._repairs_lock = threading.Lock()
        self._max_pending_repairs = max_pending_repairs
        self._close_local_store = close_local_store
        self._closed = False
        peers.on_address_dropped(self._drop_address)

    # --- BlockStore plumbing ----------------------------------------------------------------

    @classmethod
    def open(cls, config: BlockStoreConfig) -> Distributor:
        """Not supported: a Distributor is built from live objects (see the module docstring)."""
        raise NotSupported("build a Distributor with its constructor, not from a BlockStoreConfig")

    @property
    def block_size(self) -> int:
        """Size of every block in bytes."""
        return self._block_size

    @property
    def ring(self) -> Ring:
        """The ring in use."""
        return self._ring

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("distributor is closed")

    def _drop_address(self, address: str) -> None:
        try:
            self.pool.reset(address)
        except TorusError:  # a malformed old address: nothing cached for it
            pass

    def set_ring(self, ring: Ring) -> bool:
        """Switch to ``ring`` if it is newer; returns whether it was applied.

        An equal version is ignored (False); an older one raises
        :class:`~torus_core.errors.StaleRing` and keeps the current ring.
        """
        with self._ring_lock:
            current = self._ring.version
            if ring.version == current:
                return False
            if ring.version < current:
                raise StaleRing(f"ring version {ring.version} is older than the current {current}")
            self._ring = ring
            log.info("ring changed: v%d -> v%d", current, ring.version)
            return True

    # --- reads ------------------------------------------------------------------------------

    def _pad(self, data: BlockData) -> bytes:
        raw = bytes(data)
        if len(raw) > self._block_size:
            raise InvalidArgument(f"block data is {len(raw)} bytes, block size is {self._block_size}")
        if len(raw) < self._block_size:
            raw += bytes(self._block_size - len(raw))
        return raw

    def _fetch_remote(self, uuid: str, ref: BlockRef, timeout: float) -> bytes:
        address = self.peers.address(uuid)
        if address is None:
            raise PeerUnavailable(f"peer {uuid} has no known address or is down")
        try:
            data = self.pool.get(address).get_block(ref, timeout=timeout)
        except PeerUnavailable:
            self.pool.reset(address)
            raise
        if len(data) != self._block_size:
            raise CorruptBlock(f"peer {uuid} returned {len(data)} bytes for {ref}")
        return data

    def _try_remote(self, uuid: str, ref: BlockRef, timeout: float, outcome: _ReadOutcome) -> bytes | None:
        try:
            data = self._fetch_remote(uuid, ref, timeout)
        except InvalidArgument:
            raise
        except TorusError as exc:
            self.stats.inc("remote_failures")
            log.debug("read %s from %s failed: %s", ref, uuid, exc)
            outcome.record(uuid, exc)
            return None
        self.stats.inc("remote_reads")
        return data

    def get_block(self, ref: BlockRef, *, level: ReadLevel | str | None = None) -> bytes:
        """Read a block: cache, then local store, then peers per ``level`` (default: the configured one).

        Raises :class:`BlockNotExist` when every source answered that it lacks the block,
        :class:`CorruptBlock` when the only copies found were corrupt, and
        :class:`NoPeersBlock` (retryable) when some source could not be reached.
        """
        self._check_open()
        read_level = self.read_level if level is None else ReadLevel.parse(level)
        cached = self.cache.get(ref)
        if cached is not None:
            return cached
        perm = self._ring.get_peers(ref)
        owners = perm.owners
        outcome = _ReadOutcome()
        data: bytes | None = None
        source = ""
        if self.local_store is not None:
            try:
                data = self.local_store.get_block(ref)
                source = self.self_uuid
                self.stats.inc("local_reads")
            except (BlockNotExist, CorruptBlock) as exc:
                outcome.record(self.self_uuid, exc)
        if data is None:
            remote = [p for p in perm.peers if p != self.self_uuid]
            remote_owners = [p for p in owners if p != self.self_uuid]
            deadline = time.monotonic() + self.timeouts.read_total
            if read_level is ReadLevel.SPREAD:
                data, source = self._read_spread(ref, remote_owners, remote, deadline, outcome)
            elif read_level is ReadLevel.SEQ:
                data, source = self._read_pass(ref, remote, self.timeouts.read_peer, deadline, outcome)
            else:
                data, source = self._read_block_level(ref, remote, deadline, outcome)
        if data is None:
            raise outcome.error(ref)
        self.cache.put(ref, data)
        bad = [p for p in owners if p != source and (p in outcome.missing or p in outcome.corrupt)]
        if bad:
            self._schedule_repair(ref, data, bad)
        return data

    def _read_pass(
        self, ref: BlockRef, sources: Sequence[str], per_peer: float, deadline: float, outcome: _ReadOutcome
    ) -> tuple[bytes | None, str]:
        for uuid in sources:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.unavailable.setdefault(uuid, PeerUnavailable("read deadline reached"))
                break
            data = self._try_remote(uuid, ref, min(per_peer, remaining), outcome)
            if data is not None:
                return data, uuid
        return None, ""

    def _read_block_level(
        self, ref: BlockRef, sources: Sequence[str], deadline: float, outcome: _ReadOutcome
    ) -> tuple[bytes | None, str]:
        t = self.timeouts
        for attempt in range(t.read_attempts):
            if attempt:
                if not outcome.transient:
                    break  # every peer answered authoritatively: retrying cannot help
                pause = min(t.retry_pause * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic()))
                time.sleep(pause)
                outcome.unavailable.clear()
            per_peer = min(t.read_peer * 2**attempt, t.read_peer_max)
            pass_outcome = _ReadOutcome()
            data, source = self._read_pass(ref, sources, per_peer, deadline, pass_outcome)
            outcome.unavailable.update(pass_outcome.unavailable)
            for uuid in pass_outcome.missing:
                if uuid not in outcome.missing:
                    outcome.missing.append(uuid)
            for uuid in pass_outcome.corrupt:
                if uuid not in outcome.corrupt:
                    outcome.corrupt.append(uuid)
            if data is not None:
                return data, source
            if time.monotonic() >= deadline:
                break
        return None, ""

    def _read_spread(
        self,
        ref: BlockRef,
        owners: Sequence[str],
        sources: Sequence[str],
        deadline: float,
        outcome: _ReadOutcome,
    ) -> tuple[bytes | None, str]:
        per_peer = min(self.timeouts.read_peer, max(0.001, deadline - time.monotonic()))
        if owners:
            futures: dict[Future[bytes], str] = {
                self._executor.submit(self._fetch_remote, uuid, ref, per_peer): uuid for uuid in owners
            }
            pending = set(futures)
            bound = time.monotonic() + per_peer + 1.0
            while pending:
                done, pending = wait(
                    pending, timeout=max(0.0, bound - time.monotonic()), return_when=FIRST_COMPLETED
                )
                if not done:
                    break
                winner: Future[bytes] | None = None
                for fut in done:
                    exc = fut.exception()
                    if exc is None:
                        winner = winner or fut
                    elif isinstance(exc, InvalidArgument):
                        raise exc
                    else:
                        self.stats.inc("remote_failures")
                        outcome.record(futures[fut], exc)
                if winner is not None:
                    self.stats.inc("remote_reads")
                    data = winner.result()
                    for fut in pending:  # slower owners may still report a bad copy: repair it then
                        self._watch_late_read(fut, futures[fut], ref, data)
                    return data, futures[winner]
            for fut in pending:
                outcome.unavailable[futures[fut]] = PeerUnavailable("spread read timed out")
        rest = [p for p in sources if p not in owners]
        return self._read_pass(ref, rest, self.timeouts.read_peer, deadline, outcome)

    # --- read repair ------------------------------------------------------------------------

    def _watch_late_read(self, fut: Future[bytes], uuid: str, ref: BlockRef, data: bytes) -> None:
        """After a spread read returned, repair ``uuid`` if its late answer shows a bad copy."""
        with self._repairs_lock:
            self._late_reads.add(fut)

        def done(f: Future[bytes]) -> None:
            try:
                exc = None if f.cancelled() else f.exception()
                if isinstance(exc, BlockNotExist | CorruptBlock):
                    self._schedule_repair(ref, data, [uuid])
            finally:
                with self._repairs_lock:
                    self._late_reads.discard(f)

        fut.add_done_callback(done)

    def _schedule_repair(self, ref: BlockRef, data: bytes, targets: list[str]) -> None:
        with self._repairs_lock:
            if self._closed or ref in self._repairs:
                return
            if len(self._repairs) >= self._max_pending_repairs:
                self.stats.inc("repairs_skipped")
                return
            fut = self._repair_executor.submit(self._repair, ref, data, targets)
            self._repairs[ref] = fut

        def done(_: Future[None]) -> None:
            with self._repairs_lock:
                self._repairs.pop(ref, None)

        fut.add_done_callback(done)

    def _repair(self, ref: BlockRef, data: bytes, targets: list[str]) -> None:
        for uuid in targets:
            try:
                if uuid == self.self_uuid:
                    if self.local_store is None:
                        continue
                    write_replacing_corrupt(self.local_store, ref, data)
                else:
                    address = self.peers.address(uuid)
                    if address is None:
                        raise PeerUnavailable(f"peer {uuid} has no known address or is down")
                    self.pool.get(address).put_blocks(
                        [ref], [data], repair=True, timeout=self.timeouts.repair
                    )
            except Exception as exc:  # best effort: the rebalancer re-replicates later
                self.stats.inc("repair_failures")
                log.warning("read repair of %s on %s failed: %s", ref, uuid, exc)
            else:
                self.stats.inc("repairs")
                log.info("read repair: wrote %s back to %s", ref, uuid)

    def drain_repairs(self, timeout: float = 10.0) -> bool:
        """Wait until queued read repairs finish; returns False if some are still running."""
        end = time.monotonic() + timeout
        while True:
            with self._repairs_lock:
                pending: list[Future[Any]] = [*self._late_reads, *self._repairs.values()]
            if not pending:
                return True
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            wait(pending, timeout=remaining)

    # --- writes -----------------------------------------------------------------------------

    def write_block(self, ref: BlockRef, data: BlockData, *, level: WriteLevel | str | None = None) -> None:
        """Store one block per the write level (default: the configured one)."""
        self.write_blocks([(ref, data)], level=level)

    def write_blocks(
        self, items: Iterable[tuple[BlockRef, BlockData]], *, level: WriteLevel | str | None = None
    ) -> None:
        """Store several blocks, sending one PutBlocks per peer.

        ``all``: every owner of every block acknowledged, else :class:`ReplicationFailed`
        (retryable; blocks are immutable so a retry is safe). ``one``: at least one owner of
        each block. ``local``: the local store, falling back to ``one`` if it is full.
        A content conflict (:class:`BlockExists`) or bad input (:class:`InvalidArgument`) is
        raised as such, and :class:`OutOfSpace` when every failed owner was full.
        """
        self._check_open()
        write_level = self.write_level if level is None else WriteLevel.parse(level)
        batch = [(ref, self._pad(data)) for ref, data in items]
        if not batch:
            return
        if write_level is WriteLevel.LOCAL:
            if self.local_store is None:
                raise InvalidArgument("write level 'local' needs a local store")
            batch = self._write_local(batch)
            if not batch:
                return
            write_level = WriteLevel.ONE
        self._replicate(batch, write_level)
        for ref, data in batch:
            self.cache.put(ref, data)

    def _write_local(self, batch: list[tuple[BlockRef, bytes]]) -> list[tuple[BlockRef, bytes]]:
        assert self.local_store is not None
        for i, (ref, data) in enumerate(batch):
            try:
                self.local_store.write_block(ref, data)
            except OutOfSpace:
                log.info("local write cache full; writing %d block(s) to owners", len(batch) - i)
                return batch[i:]
            self.cache.put(ref, data)
        return []

    def _put_to(self, uuid: str, batch: list[tuple[BlockRef, bytes]]) -> None:
        if uuid == self.self_uuid:
            if self.local_store is None:
                raise NoPeer(f"peer {uuid} is this process, which has no local store")
            for ref, data in batch:
                self.local_store.write_block(ref, data)
            return
        address = self.peers.address(uuid)
        if address is None:
            raise PeerUnavailable(f"peer {uuid} has no known address or is down")
        client = self.pool.get(address)
        limit = max(self._block_size, client.max_message_bytes // 2)
        start = 0
        try:
            while start < len(batch):
                end, size = start, 0
                while end < len(batch) and (end == start or size + len(batch[end][1]) <= limit):
                    size += len(batch[end][1])
                    end += 1
                chunk = batch[start:end]
                client.put_blocks([r for r, _ in chunk], [d for _, d in chunk], timeout=self.timeouts.write)
                start = end
        except PeerUnavailable:
            self.pool.reset(address)
            raise

    def _replicate(self, batch: list[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        ring = self._ring
        owners_of: list[list[str]] = []
        plans: dict[str, list[int]] = {}
        for i, (ref, _) in enumerate(batch):
            owners = ring.get_peers(ref).owners
            if not owners:
                raise NoPeer(f"ring v{ring.version} has no owners for {ref}")
            owners_of.append(owners)
            for uuid in owners:
                plans.setdefault(uuid, []).append(i)
        futures: dict[Future[None], str] = {}
        for uuid, indexes in plans.items():
            fut = self._executor.submit(self._put_to, uuid, [batch[i] for i in indexes])
            fut.add_done_callback(_log_failure(uuid))
            futures[fut] = uuid
        acks: list[set[str]] = [set() for _ in batch]
        failed: dict[str, BaseException] = {}
        pending = set(futures)
        bound = time.monotonic() + self.timeouts.write * (1 + len(batch) // 64) + 1.0
        while pending:
            done, pending = wait(
                pending, timeout=max(0.0, bound - time.monotonic()), return_when=FIRST_COMPLETED
            )
            if not done:
                break
            for fut in done:
                uuid = futures[fut]
                exc = fut.exception()
                if exc is None:
                    for i in plans[uuid]:
                        acks[i].add(uuid)
                else:
                    failed[uuid] = exc
            if level is WriteLevel.ONE and all(acks):
                return
        for fut in pending:
            failed[futures[fut]] = PeerUnavailable(f"write to {futures[fut]} did not finish in time")
        for exc in failed.values():
            if isinstance(exc, BlockExists | InvalidArgument):
                raise exc
        if level is WriteLevel.ONE:
            short = [i for i, a in enumerate(acks) if not a]
        else:
            short = [i for i, a in enumerate(acks) if len(a) < len(owners_of[i])]
        if short:
            if failed and all(isinstance(e, OutOfSpace) for e in failed.values()):
                raise OutOfSpace(
                    "no room for the block on " + "; ".join(f"{u}: {e}" for u, e in failed.items())
                )
            first = short[0]
            acked = sorted(acks[first])
            need = 1 if level is WriteLevel.ONE else len(owners_of[first])
            raise ReplicationFailed(
                f"write level {level.value}: {len(short)} of {len(batch)} block(s) short of replicas; "
                f"{batch[first][0]} acknowledged by {len(acked)}/{need} owner(s) {acked}; "
                + "; ".join(f"{u}: {e}" for u, e in failed.items()),
                acked=acked,
                failed=failed,
            )

    # --- the rest of the BlockStore API -----------------------------------------------------

    def has_block(self, ref: BlockRef) -> bool:
        """Whether the block exists: cache, local store, then the owners (RebalanceCheck).

        False only when every owner answered; raises :class:`NoPeersBlock` when no source
        has it and some owner could not be asked.
        """
        self._check_open()
        if ref in self.cache:
            return True
        if self.local_store is not None and self.local_store.has_block(ref):
            return True
        unreachable: dict[str, BaseException] = {}
        for uuid in self._ring.get_peers(ref).owners:
            if uuid == self.self_uuid:
                if self.local_store is None:
                    unreachable[uuid] = NoPeer("this process has no local store")
                continue
            address = self.peers.address(uuid)
            try:
                if address is None:
                    raise PeerUnavailable(f"peer {uuid} has no known address or is down")
                if self.pool.get(address).rebalance_check([ref], timeout=self.timeouts.check)[0]:
                    return True
            except TorusError as exc:
                if address is not None and isinstance(exc, PeerUnavailable):
                    self.pool.reset(address)
                unreachable[uuid] = exc
        if unreachable:
            detail = "; ".join(f"{u}: {e}" for u, e in unreachable.items())
            raise NoPeersBlock(f"cannot tell whether {ref} exists ({detail})")
        return False

    def delete_block(self, ref: BlockRef) -> None:
        """Delete the local copy (GC and rebalancing act per peer)."""
        self._check_open()
        self.cache.discard(ref)
        if self.local_store is None:
            raise BlockNotExist(f"block {ref} not found (no local store)")
        self.local_store.delete_block(ref)

    def num_blocks(self) -> int:
        """Capacity of the local store in blocks (0 without one)."""
        self._check_open()
        return self.local_store.num_blocks() if self.local_store is not None else 0

    def used_blocks(self) -> int:
        """Blocks in the local store (0 without one)."""
        self._check_open()
        return self.local_store.used_blocks() if self.local_store is not None else 0

    def iter_refs(self) -> Iterator[BlockRef]:
        """The local store's refs."""
        self._check_open()
        if self.local_store is None:
            return iter(())
        return self.local_store.iter_refs()

    def flush(self) -> None:
        """Flush the local store; remote writes were flushed before they were acknowledged."""
        self._check_open()
        if self.local_store is not None:
            self.local_store.flush()

    def close(self) -> None:
        """Stop worker threads (in-flight calls are bounded by their deadlines), then close the
        local store (unless ``close_local_store`` was false) and an internally created pool."""
        with self._repairs_lock:
            if self._closed:
                return
            self._closed = True
        self._repair_executor.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.cache.clear()
        if self.local_store is not None and self._close_local_store:
            self.local_store.close()
        if self._own_pool:
            self.pool.close()


def _log_failure(uuid: str) -> Callable[[Future[None]], None]:
    def callback(fut: Future[None]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.warning("replica write to %s failed: %s", uuid, exc)

    return callback
