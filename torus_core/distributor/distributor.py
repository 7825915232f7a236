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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torus_core.blockstore import BlockStore, BlockStoreConfig, reads_may_block
from torus_core.distributor.cache import BlockCache
from torus_core.distributor.levels import ReadLevel, WriteLevel
from torus_core.distributor.peers import PeerDirectory
from torus_core.distributor.prefetch import Prefetcher
from torus_core.distributor.unflushed import UnflushedBlock, UnflushedWrites
from torus_core.distributor.writebehind import WriteBehind
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
    WouldBlock,
)
from torus_core.refs import BlockRef
from torus_core.ring.base import PeerPermutation, Ring
from torus_core.rpc.client import PeerClientPool
from torus_core.rpc.server import write_replacing_corrupt

log = logging.getLogger(__name__)

BlockData = bytes | bytearray | memoryview

#: Default read cache size.
DEFAULT_READ_CACHE_BYTES = 64 * 1024 * 1024
#: Default bound of deferred (not yet flushed) write bytes before a write forces a flush.
DEFAULT_MAX_UNFLUSHED_BYTES = 32 * 1024 * 1024
#: Default read-ahead: refs fetched ahead of a sequential run of remote misses.
DEFAULT_READAHEAD = 4

#: Blocks remembered as recently read by range (a second ranged read pulls the block in).
RANGED_RECENT_MAX = 4096

#: ``(start, length)`` of a ranged read; None for the whole block.
Span = tuple[int, int] | None


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
    :param suspect: seconds a peer whose call failed is tried after the others (writes hand
        off to the next peer at once instead of waiting on it again).
    """

    read_peer: float = 0.5
    read_peer_max: float = 2.0
    read_attempts: int = 3
    read_total: float = 10.0
    retry_pause: float = 0.05
    write: float = 5.0
    check: float = 2.0
    repair: float = 5.0
    suspect: float = 2.0

    def __post_init__(self) -> None:
        for name in ("read_peer", "read_peer_max", "read_total", "write", "check", "repair", "suspect"):
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
    ranged_reads: int = 0
    would_block: int = 0
    remote_failures: int = 0
    repairs: int = 0
    repair_failures: int = 0
    repairs_skipped: int = 0
    flush_rewrites: int = 0
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
    :param defer_flush: send writes without a remote flush and flush the peers written to in
        :meth:`flush` (default); False makes every PutBlocks durable before it is acknowledged.
    :param max_unflushed_bytes: a write that leaves more than this many bytes unflushed
        triggers a :meth:`flush` (bounds the memory kept for re-replication).
    :param write_behind: replicate in background workers (see
        :mod:`~torus_core.distributor.writebehind`): ``write_blocks`` returns once the blocks
        are queued, and replication errors surface at :meth:`flush`. Off by default.
    :param readahead: remote blocks fetched ahead of a sequential run of remote misses, and
        the bound of :meth:`prefetch` requests in flight (x2); 0 disables the guessing.
    :param ranged_read_max: :meth:`read_block_range` of a block that is neither cached nor
        local asks a peer for just the range when it is at most this long (default: a quarter
        block), else reads (and caches) the whole block.
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
        defer_flush: bool = True,
        max_unflushed_bytes: int = DEFAULT_MAX_UNFLUSHED_BYTES,
        write_behind: bool = False,
        readahead: int = DEFAULT_READAHEAD,
        ranged_read_max: int | None = None,
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
        self.defer_flush = defer_flush
        self.max_unflushed_bytes = max_unflushed_bytes
        self._unflushed = UnflushedWrites()
        self._flush_lock = threading.Lock()
        # local writes made / covered by a finished local flush (flush only when they differ)
        self._local_lock = threading.Lock()
        self._local_written = 0
        self._local_flushed = 0
        self._suspects: dict[str, float] = {}
        self._suspects_lock = threading.Lock()
        self._wb = WriteBehind(self._replicate_recorded) if write_behind else None
        self.ranged_read_max = block_size // 4 if ranged_read_max is None else ranged_read_max
        self._ranged_recent: OrderedDict[BlockRef, None] = OrderedDict()
        self._ranged_lock = threading.Lock()
        self._prefetcher = Prefetcher(
            self._prefetch_load,
            max_inflight=max(2 * readahead, 2),
            readahead=readahead,
            workers=max(1, readahead),
        )
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

    def _fetch_remote(self, uuid: str, ref: BlockRef, timeout: float, span: Span = None) -> bytes:
        address = self.peers.address(uuid)
        if address is None:
            raise PeerUnavailable(f"peer {uuid} has no known address or is down")
        client = self.pool.get(address)
        try:
            if span is None:
                data = client.get_block(ref, timeout=timeout)
            else:
                data = client.get_block_range(ref, span[0], span[1], timeout=timeout)
        except PeerUnavailable:
            self.pool.reset(address)
            raise
        want = self._block_size if span is None else span[1]
        if len(data) != want:
            raise CorruptBlock(f"peer {uuid} returned {len(data)} bytes for {ref} (wanted {want})")
        return data

    def _try_remote(
        self, uuid: str, ref: BlockRef, timeout: float, outcome: _ReadOutcome, span: Span = None
    ) -> bytes | None:
        try:
            data = self._fetch_remote(uuid, ref, timeout, span)
        except InvalidArgument:
            raise
        except TorusError as exc:
            self.stats.inc("remote_failures")
            log.debug("read %s from %s failed: %s", ref, uuid, exc)
            outcome.record(uuid, exc)
            if isinstance(exc, PeerUnavailable):
                self._suspect(uuid)
            return None
        self.stats.inc("remote_reads")
        return data

    def get_block(self, ref: BlockRef, *, level: ReadLevel | str | None = None) -> bytes:
        """Read a block: cache, then local store, then peers per ``level`` (default: the configured one).

        Raises :class:`BlockNotExist` when every source answered that it lacks the block,
        :class:`CorruptBlock` when the only copies found were corrupt, and
        :class:`NoPeersBlock` (retryable) when some source could not be reached. Inside
        :func:`~torus_core.blockstore.nonblocking_reads` a read that needs a peer raises
        :class:`~torus_core.errors.WouldBlock` instead.
        """
        self._check_open()
        cached = self._held(ref)
        if cached is not None:
            return cached
        if reads_may_block() and self._prefetcher.join(ref, self.timeouts.read_total):
            cached = self._held(ref)
            if cached is not None:
                return cached
        return self._load(ref, level)

    def _held(self, ref: BlockRef) -> bytes | None:
        """The block from the read cache or the write-behind queue, else None."""
        cached = self.cache.get(ref)
        if cached is None and self._wb is not None:
            cached = self._wb.get(ref)
        return cached

    def _prefetch_load(self, ref: BlockRef) -> bytes:
        return self._load(ref, guess=False)

    def _load(self, ref: BlockRef, level: ReadLevel | str | None = None, *, guess: bool = True) -> bytes:
        """:meth:`get_block` past the cache: local store, then peers. Caches what came from a
        peer (a local copy is cheap to read again and would only push remote blocks out).
        ``guess``: a remote miss feeds the sequential read-ahead (not for prefetches)."""
        read_level = self.read_level if level is None else ReadLevel.parse(level)
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
            if not reads_may_block():
                self.stats.inc("would_block")
                raise WouldBlock(f"block {ref} must be read from a peer")
            ahead = self._prefetcher.sequential_guess(ref) if guess and self._cache_fits_a_block() else []
            if ahead:
                self._prefetcher.submit(ahead, self._has_nearby)
            data, source = self._read_remote(ref, perm, read_level, outcome)
        if data is None:
            raise outcome.error(ref)
        if source != self.self_uuid:
            self.cache.put(ref, data)
        bad = [p for p in owners if p != source and (p in outcome.missing or p in outcome.corrupt)]
        if bad:
            self._schedule_repair(ref, data, bad)
        return data

    def _read_remote(
        self,
        ref: BlockRef,
        perm: PeerPermutation,
        read_level: ReadLevel,
        outcome: _ReadOutcome,
        span: Span = None,
    ) -> tuple[bytes | None, str]:
        """Read ``ref`` (or ``span`` of it) from the peers other than this one, per ``read_level``."""
        remote = self._healthy_first([p for p in perm.peers if p != self.self_uuid])
        deadline = time.monotonic() + self.timeouts.read_total
        if read_level is ReadLevel.SPREAD:
            remote_owners = [p for p in perm.owners if p != self.self_uuid]
            return self._read_spread(ref, remote_owners, remote, deadline, outcome, span)
        if read_level is ReadLevel.SEQ:
            return self._read_pass(ref, remote, self.timeouts.read_peer, deadline, outcome, span)
        return self._read_block_level(ref, remote, deadline, outcome, span)

    def _has_nearby(self, ref: BlockRef) -> bool:
        """Whether ``ref`` is readable without a peer (cache, write-behind queue, local store)."""
        if ref in self.cache or (self._wb is not None and ref in self._wb):
            return True
        try:
            return self.local_store is not None and self.local_store.has_block(ref)
        except TorusError:
            return False

    def read_block_range(self, ref: BlockRef, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``ref``, **unverified** where that is cheaper (the
        caller checks them, see :meth:`BlockStore.read_block_range`).

        A whole block is :meth:`get_block` (verified, any good copy, cached). A part comes from
        the cache or write-behind queue, else from the local store (one ``pread`` for the file
        store), else from a peer: just the range if it is at most ``ranged_read_max`` bytes (and,
        while the read cache has room or when the block was read by range recently, the whole
        block is then fetched into it in the background), else the whole block (cached, so the
        next part of it is local).
        """
        self._check_open()
        bs = self._block_size
        if (
            type(start) is not int
            or type(length) is not int
            or start < 0
            or length <= 0
            or start + length > bs
        ):
            raise InvalidArgument(f"bad range start={start!r} length={length!r} of a {bs}-byte block")
        if length == bs:
            return self.get_block(ref)
        held = self._held(ref)
        if held is not None:
            return bytes(memoryview(held)[start : start + length])
        if self.local_store is not None:
            try:
                data = self.local_store.read_block_range(ref, start, length)
            except (BlockNotExist, CorruptBlock):
                pass
            else:
                self.stats.inc("local_reads")
                return data
        if length > self.ranged_read_max or (
            reads_may_block() and self._prefetcher.join(ref, self.timeouts.read_total)
        ):
            return bytes(memoryview(self.get_block(ref))[start : start + length])
        if not reads_may_block():
            self.stats.inc("would_block")
            raise WouldBlock(f"a range of block {ref} must be read from a peer")
        outcome = _ReadOutcome()
        got, _ = self._read_remote(ref, self._ring.get_peers(ref), self.read_level, outcome, (start, length))
        if got is None:
            raise outcome.error(ref)
        self.stats.inc("ranged_reads")
        if self.cache.used_bytes + bs <= self.cache.max_bytes or self._ranged_again(ref):
            # fetch the whole block in the background, so the next parts of it are cache hits:
            # while the cache has room, or (a full cache) when this block is read again soon --
            # random reads over far more than the cache stay ranged, a hot set gets cached
            self._prefetcher.submit([ref], self._has_nearby)
        return got

    def _ranged_again(self, ref: BlockRef) -> bool:
        """Record a ranged read of ``ref``; whether it is among the recent ones already."""
        with self._ranged_lock:
            if ref in self._ranged_recent:
                del self._ranged_recent[ref]
                return True
            self._ranged_recent[ref] = None
            if len(self._ranged_recent) > RANGED_RECENT_MAX:
                self._ranged_recent.popitem(last=False)
            return False

    def prefetch(self, refs: Iterable[BlockRef]) -> int:
        """Start fetching blocks that will be read soon (e.g. a file's next blocks) into the read
        cache, in the background; refs already cached, queued, local or being fetched are
        skipped, and at most ``2 * readahead`` fetches run at once (the rest are dropped).
        Returns how many fetches were started. Never raises for a bad ref: its fetch fails
        quietly and a later read reports the error."""
        self._check_open()
        if not self._cache_fits_a_block():
            return 0  # nowhere to keep what would be fetched
        return self._prefetcher.submit(refs, self._has_nearby)

    def _cache_fits_a_block(self) -> bool:
        return self.cache.max_bytes >= self._block_size

    def _healthy_first(self, uuids: list[str]) -> list[str]:
        """``uuids`` with peers marked down or recently failed moved to the end (order kept)."""
        good = [u for u in uuids if not self._is_suspect(u) and not self.peers.is_down(u)]
        if len(good) == len(uuids):
            return uuids
        return good + [u for u in uuids if u not in good]

    def _read_pass(
        self,
        ref: BlockRef,
        sources: Sequence[str],
        per_peer: float,
        deadline: float,
        outcome: _ReadOutcome,
        span: Span = None,
    ) -> tuple[bytes | None, str]:
        for uuid in sources:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.unavailable.setdefault(uuid, PeerUnavailable("read deadline reached"))
                break
            data = self._try_remote(uuid, ref, min(per_peer, remaining), outcome, span)
            if data is not None:
                return data, uuid
        return None, ""

    def _read_block_level(
        self, ref: BlockRef, sources: Sequence[str], deadline: float, outcome: _ReadOutcome, span: Span = None
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
            data, source = self._read_pass(ref, sources, per_peer, deadline, pass_outcome, span)
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
        span: Span = None,
    ) -> tuple[bytes | None, str]:
        per_peer = min(self.timeouts.read_peer, max(0.001, deadline - time.monotonic()))
        if owners:
            futures: dict[Future[bytes], str] = {
                self._executor.submit(self._fetch_remote, uuid, ref, per_peer, span): uuid for uuid in owners
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
                    if span is None:  # slower owners may still report a bad copy: repair it then
                        for fut in pending:
                            self._watch_late_read(fut, futures[fut], ref, data)
                    return data, futures[winner]
            for fut in pending:
                outcome.unavailable[futures[fut]] = PeerUnavailable("spread read timed out")
        rest = [p for p in sources if p not in owners]
        return self._read_pass(ref, rest, self.timeouts.read_peer, deadline, outcome, span)

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
                    self._note_local_write()
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
        """Store several blocks, sending one PutBlocks per peer (all peers in parallel).

        ``all``: each block was acknowledged by R distinct peers -- its owners, or, for an owner
        that is down or fails, the next peers of its permutation (hinted handoff; the
        rebalancer later moves such copies to the owners). Fewer than R reachable peers raises
        :class:`ReplicationFailed` (retryable; blocks are immutable so a retry is safe).
        ``one``: at least one peer, owners first. ``local``: the local store, falling back to
        ``one`` if it is full. A content conflict (:class:`BlockExists`) or bad input
        (:class:`InvalidArgument`) is raised as such, and :class:`OutOfSpace` when every failed
        peer was full.

        With ``defer_flush`` (the default) the copies are durable only after :meth:`flush`,
        which is exactly what NBD asks (durability at FLUSH/FUA); until then the bytes are kept
        here so a copy lost before the flush can be written again.
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
        if self._wb is not None:
            self._cache_written(batch)
            self._wb.submit(batch, write_level)
        else:
            self._replicate_recorded(batch, write_level)
            self._cache_written(batch)
        if self.defer_flush and self._unflushed.nbytes > self.max_unflushed_bytes:
            self.flush()

    def _cache_written(self, batch: list[tuple[BlockRef, bytes]]) -> None:
        """Cache written blocks that this peer will not hold itself (those it owns are read
        back from the local store, like any local block)."""
        ring = self._ring
        for ref, data in batch:
            if self.local_store is None or self.self_uuid not in ring.get_peers(ref).owners:
                self.cache.put(ref, data)

    def _replicate_recorded(self, batch: list[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        """Replicate ``batch`` and remember deferred copies for the next :meth:`flush`."""
        acks = self._replicate(batch, level, durable=not self.defer_flush)
        if self.defer_flush:
            self._unflushed.add(batch, acks, level)

    def _write_local(self, batch: list[tuple[BlockRef, bytes]]) -> list[tuple[BlockRef, bytes]]:
        assert self.local_store is not None
        for i, (ref, data) in enumerate(batch):
            try:
                self.local_store.write_block(ref, data)
                self._note_local_write()
            except OutOfSpace:
                log.info("local write cache full; writing %d block(s) to owners", len(batch) - i)
                return batch[i:]
        return []

    # peers that just failed are tried after the others for a while

    def _suspect(self, uuid: str) -> None:
        with self._suspects_lock:
            self._suspects[uuid] = time.monotonic() + self.timeouts.suspect

    def _is_suspect(self, uuid: str) -> bool:
        with self._suspects_lock:
            until = self._suspects.get(uuid)
            if until is None:
                return False
            if until <= time.monotonic():
                del self._suspects[uuid]
                return False
            return True

    def _pick(
        self, perm: PeerPermutation, tried: set[str], k: int, failed: dict[str, BaseException]
    ) -> list[str]:
        """The next ``k`` untried peers of ``perm`` in permutation order; peers marked down are
        skipped (and recorded as failed), recently failed ones are used only as a last resort."""
        picked: list[str] = []
        later: list[str] = []
        for uuid in perm.peers:
            if len(picked) >= k:
                break
            if uuid in tried:
                continue
            if uuid == self.self_uuid:
                if self.local_store is None:
                    tried.add(uuid)
                    continue
            elif self.peers.address(uuid) is None:
                tried.add(uuid)
                failed.setdefault(uuid, PeerUnavailable(f"peer {uuid} is down or has no known address"))
                continue
            if self._is_suspect(uuid):
                later.append(uuid)
                continue
            picked.append(uuid)
        for uuid in later:
            if len(picked) >= k:
                break
            picked.append(uuid)
        tried.update(picked)
        return picked

    def _put_to(self, uuid: str, batch: list[tuple[BlockRef, bytes]], durable: bool = True) -> str:
        """Store ``batch`` on one peer; returns the boot id it reported (``""`` for self)."""
        if uuid == self.self_uuid:
            if self.local_store is None:
                raise NoPeer(f"peer {uuid} is this process, which has no local store")
            for ref, data in batch:
                self.local_store.write_block(ref, data)
            self._note_local_write()
            if durable:  # in parallel with the other peers' durable puts
                self._flush_local()
            return ""
        address = self.peers.address(uuid)
        if address is None:
            raise PeerUnavailable(f"peer {uuid} has no known address or is down")
        client = self.pool.get(address)
        limit = max(self._block_size, client.max_message_bytes // 2)
        start = 0
        boot = ""
        try:
            while start < len(batch):
                end, size = start, 0
                while end < len(batch) and (end == start or size + len(batch[end][1]) <= limit):
                    size += len(batch[end][1])
                    end += 1
                chunk = batch[start:end]
                _, b = client.put_blocks_deferred(
                    [r for r, _ in chunk],
                    [d for _, d in chunk],
                    defer_flush=not durable,
                    timeout=self.timeouts.write,
                    trim=True,  # padded to the block size by _pad: the peer pads it back
                )
                if boot and b != boot:
                    raise PeerUnavailable(f"peer {uuid} restarted during a write")
                boot = b
                start = end
        except PeerUnavailable:
            self.pool.reset(address)
            raise
        return boot

    def _replicate(
        self,
        batch: list[tuple[BlockRef, bytes]],
        level: WriteLevel,
        *,
        durable: bool,
        seed: Sequence[dict[str, str]] | None = None,
        exclude: Sequence[set[str]] | None = None,
    ) -> list[dict[str, str]]:
        """Write ``batch`` until each block has enough acknowledgements from distinct peers.

        Round 1 sends every block to its owners that are not marked down (one PutBlocks per
        peer, in parallel). Each later round sends the blocks still short of acknowledgements to
        the next untried peers of their permutations (handoff), until the level is met or the
        permutation is exhausted. ``seed`` gives acknowledgements already held per block and
        ``exclude`` peers not to use. Returns, per block, ``peer -> boot id`` of the acks.
        """
        ring = self._ring
        n = len(batch)
        perms: list[PeerPermutation] = []
        for ref, _ in batch:
            perm = ring.get_peers(ref)
            if not perm.owners:
                raise NoPeer(f"ring v{ring.version} has no owners for {ref}")
            perms.append(perm)
        acks: list[dict[str, str]] = [dict(seed[i]) if seed is not None else {} for i in range(n)]
        tried: list[set[str]] = [
            set(acks[i]) | (exclude[i] if exclude is not None else set()) for i in range(n)
        ]
        want = [len(p.owners) if level is WriteLevel.ALL else 1 for p in perms]
        failed: dict[str, BaseException] = {}
        first = True
        while True:
            plans: dict[str, list[int]] = {}
            for i in range(n):
                k = (len(perms[i].owners) if first else want[i]) - len(acks[i])
                if k <= 0:
                    continue
                for uuid in self._pick(perms[i], tried[i], k, failed):
                    plans.setdefault(uuid, []).append(i)
            first = False
            if not plans:
                break
            self._write_round(batch, plans, acks, want, failed, level, durable)
            if all(len(acks[i]) >= want[i] for i in range(n)):
                return acks
        short = [i for i in range(n) if len(acks[i]) < want[i]]
        if not short:
            return acks
        if failed and all(isinstance(e, OutOfSpace) for e in failed.values()):
            raise OutOfSpace("no room for the block on " + "; ".join(f"{u}: {e}" for u, e in failed.items()))
        i = short[0]
        acked = sorted(acks[i])
        raise ReplicationFailed(
            f"write level {level.value}: {len(short)} of {n} block(s) short of replicas; "
            f"{batch[i][0]} acknowledged by {len(acked)}/{want[i]} distinct peer(s) {acked}; "
            + "; ".join(f"{u}: {e}" for u, e in failed.items()),
            acked=acked,
            failed=failed,
        )

    def _write_round(
        self,
        batch: list[tuple[BlockRef, bytes]],
        plans: dict[str, list[int]],
        acks: list[dict[str, str]],
        want: list[int],
        failed: dict[str, BaseException],
        level: WriteLevel,
        durable: bool,
    ) -> None:
        futures: dict[Future[str], str] = {}
        for uuid, indexes in plans.items():
            fut = self._executor.submit(self._put_to, uuid, [batch[i] for i in indexes], durable)
            fut.add_done_callback(_log_failure(uuid))
            futures[fut] = uuid
        most = max(len(ix) for ix in plans.values())
        bound = time.monotonic() + self.timeouts.write * (1 + most // 64) + 1.0
        pending = set(futures)
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
                    boot = fut.result()
                    for i in plans[uuid]:
                        acks[i][uuid] = boot
                    continue
                if isinstance(exc, BlockExists | InvalidArgument):
                    raise exc
                failed[uuid] = exc
                if isinstance(exc, PeerUnavailable):
                    self._suspect(uuid)
            if level is WriteLevel.ONE and all(len(acks[i]) >= want[i] for i in range(len(batch))):
                return  # the other owners' writes finish in the background
        for fut in pending:
            uuid = futures[fut]
            failed[uuid] = PeerUnavailable(f"write to {uuid} did not finish in time")
            self._suspect(uuid)

    # --- the rest of the BlockStore API -----------------------------------------------------

    def has_block(self, ref: BlockRef) -> bool:
        """Whether the block exists: cache, local store, then the owners (RebalanceCheck) and,
        if some owner could not be asked, the other peers (which may hold a handoff copy).

        False only when every owner answered; raises :class:`NoPeersBlock` when no source
        has it and some owner could not be asked.
        """
        self._check_open()
        if ref in self.cache or (self._wb is not None and ref in self._wb):
            return True
        if self.local_store is not None and self.local_store.has_block(ref):
            return True
        unreachable: dict[str, BaseException] = {}
        perm = self._ring.get_peers(ref)
        for uuid in perm.peers:
            if uuid not in perm.owners and not unreachable:
                break  # every owner answered: a handoff copy elsewhere does not matter
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

    def discard_blocks(self, refs: Iterable[BlockRef]) -> int:
        """Leave superseded blocks to each peer's GC (copies live on several peers); returns 0."""
        return 0

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
        """Make every write acknowledged so far durable on as many distinct peers as its level
        required, then flush the local store.

        Sends ``Flush`` (in parallel) to every peer that took a deferred write since the last
        flush. A peer whose flush fails, or that restarted since it took the write (its boot id
        changed), no longer counts: its blocks are written again, durably, to the next peers of
        their permutations (handoff). If that cannot reach the level the writes stay pending
        (a later flush retries them) and :class:`ReplicationFailed` is raised.
        """
        self._check_open()
        with self._flush_lock:
            if self._wb is not None:
                self._retry_failed_background_writes()
            entries = self._unflushed.take()
            try:
                self._flush_entries(entries)
                if self._local_unflushed():
                    self._flush_local()
            except BaseException:
                self._unflushed.restore(entries)
                raise

    def _retry_failed_background_writes(self) -> None:
        assert self._wb is not None
        # the queued tail is written here, durably (fsync before the ack): no Flush round trip
        # for it, which is what keeps a lone flushed 4 KiB write fast
        tail = self._wb.steal()
        by_level_tail: dict[WriteLevel, list[tuple[BlockRef, bytes, WriteLevel]]] = {}
        for item in tail:
            by_level_tail.setdefault(item[2], []).append(item)
        for level, items in by_level_tail.items():
            try:
                self._replicate([(r, d) for r, d, _ in items], level, durable=True)
            except BaseException as tail_exc:
                self._wb.settle(items, ok=False, error=tail_exc)  # retried below like any failure
            else:
                self._wb.settle(items, ok=True)
        bound = self.timeouts.write * 8 + 30.0
        failed = self._wb.drain(bound)
        if not failed:
            return
        fatal = [(item, e) for item, e in failed if isinstance(e, BlockExists | InvalidArgument)]
        if fatal:  # not retryable: reported once, then dropped
            self._wb.settle([item for item, _ in fatal], ok=True)
        by_level: dict[WriteLevel, list[tuple[BlockRef, bytes, WriteLevel]]] = {}
        for item, e in failed:
            if not isinstance(e, BlockExists | InvalidArgument):
                by_level.setdefault(item[2], []).append(item)
        levels = list(by_level)
        for n, level in enumerate(levels):
            items = by_level[level]
            try:
                self._replicate_recorded([(r, d) for r, d, _ in items], level)
            except BaseException as exc:
                rest = [it for lv in levels[n:] for it in by_level[lv]]
                self._wb.settle(rest, ok=False, error=exc)
                raise
            self._wb.settle(items, ok=True)
        if fatal:
            raise fatal[0][1]

    def _note_local_write(self) -> None:
        with self._local_lock:
            self._local_written += 1

    def _flush_local(self) -> None:
        """Flush the local store; covers every local write noted before the call."""
        if self.local_store is None:
            return
        with self._local_lock:
            upto = self._local_written
        self.local_store.flush()
        with self._local_lock:
            self._local_flushed = max(self._local_flushed, upto)

    def _local_unflushed(self) -> bool:
        with self._local_lock:
            return self._local_written != self._local_flushed

    def _flush_peer(self, uuid: str) -> str:
        if uuid == self.self_uuid:
            self._flush_local()
            return ""
        address = self.peers.address(uuid)
        if address is None:
            raise PeerUnavailable(f"peer {uuid} has no known address or is down")
        try:
            return self.pool.get(address).flush(timeout=self.timeouts.write)
        except PeerUnavailable:
            self.pool.reset(address)
            raise

    def _flush_entries(self, entries: dict[BlockRef, UnflushedBlock]) -> None:
        """Flush the peers of ``entries`` (this one's store among them, in parallel) and
        rewrite, durably, what they lost."""
        if not entries:
            return
        peers: set[str] = set()
        for entry in entries.values():
            peers.update(entry.acks)
        futures = {self._executor.submit(self._flush_peer, uuid): uuid for uuid in peers}
        done, not_done = wait(futures, timeout=self.timeouts.write + 1.0)
        boots: dict[str, str] = {}
        for fut in done:
            uuid = futures[fut]
            exc = fut.exception()
            if exc is None:
                boots[uuid] = fut.result()
            else:
                log.warning("flush of %s failed; re-replicating its unflushed blocks: %s", uuid, exc)
                if isinstance(exc, PeerUnavailable):
                    self._suspect(uuid)
        for fut in not_done:
            log.warning("flush of %s timed out; re-replicating its unflushed blocks", futures[fut])
            self._suspect(futures[fut])
        # entries keep their recorded acks until the rewrite succeeded: a failed flush is
        # restored as it was, and its retry flushes the same peers again
        redo: dict[WriteLevel, list[tuple[BlockRef, UnflushedBlock, dict[str, str]]]] = {}
        for ref, entry in entries.items():
            good = {u: b for u, b in entry.acks.items() if u in boots and boots[u] == b}
            if len(good) < len(entry.acks):
                redo.setdefault(entry.level, []).append((ref, entry, good))
        for level, items in redo.items():
            self.stats.inc("flush_rewrites", len(items))
            acks = self._replicate(
                [(ref, e.data) for ref, e, _ in items],
                level,
                durable=True,
                seed=[good for _, _, good in items],
                exclude=[set(e.acks) - set(good) for _, e, good in items],
            )
            for (_, entry, _), got in zip(items, acks, strict=True):
                entry.acks = got

    def close(self) -> None:
        """Flush pending writes (best effort, bounded), stop worker threads (in-flight calls are
        bounded by their deadlines), then close the local store (unless ``close_local_store``
        was false) and an internally created pool."""
        if not self._closed and (len(self._unflushed) or (self._wb is not None and self._wb.pending_bytes)):
            try:
                self.flush()
            except TorusError as exc:
                log.warning("closing with %d unflushed block(s): %s", len(self._unflushed), exc)
        with self._repairs_lock:
            if self._closed:
                return
            self._closed = True
        if self._wb is not None:
            self._wb.close()
        self._prefetcher.close()
        self._repair_executor.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.cache.clear()
        if self.local_store is not None and self._close_local_store:
            self.local_store.close()
        if self._own_pool:
            self.pool.close()


def _log_failure(uuid: str) -> Callable[[Future[Any]], None]:
    def callback(fut: Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.warning("replica write to %s failed: %s", uuid, exc)

    return callback
