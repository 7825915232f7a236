"""The Distributor: a :class:`~torus_core.blockstore.BlockStore` replicated over the ring.

Reads try the LRU cache, then the local store, then remote peers according to the read level;
writes go to the ring's owners of each block according to the write level (see
:mod:`torus_core.distributor.levels`). A read that finds a missing or corrupt copy on an owner
writes the good copy back to it (read repair, asynchronous and bounded).

The class is a facade over parts with one job each:

* :mod:`~torus_core.distributor.reads` -- reads, read-ahead and the read cache;
* :mod:`~torus_core.distributor.placement` -- which peers take a write, and handoff;
* :mod:`~torus_core.distributor.replication` -- deferred copies and what a flush rewrites;
* :mod:`~torus_core.distributor.repair` -- read repair;
* :mod:`~torus_core.distributor.peercalls` -- one way to call a peer, and suspect peers;
* :mod:`~torus_core.distributor.local` -- this peer's own store as a replica.

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
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.distributor.cache import BlockCache
from torus_core.distributor.levels import ReadLevel, WriteLevel
from torus_core.distributor.local import LocalReplica
from torus_core.distributor.peercalls import PeerCalls
from torus_core.distributor.peers import PeerDirectory
from torus_core.distributor.placement import WritePlacement
from torus_core.distributor.reads import BlockReader
from torus_core.distributor.repair import ReadRepair
from torus_core.distributor.replication import Replication
from torus_core.distributor.stats import DistributorStats
from torus_core.distributor.timeouts import DistributorTimeouts
from torus_core.errors import (
    BlockNotExist,
    Closed,
    ConfigError,
    InvalidArgument,
    NoPeer,
    NoPeersBlock,
    NotSupported,
    StaleRing,
    TorusError,
)
from torus_core.refs import BlockRef
from torus_core.ring.base import Ring
from torus_core.rpc.client import PeerClientPool

log = logging.getLogger(__name__)

BlockData = bytes | bytearray | memoryview

#: Default read cache size.
DEFAULT_READ_CACHE_BYTES = 64 * 1024 * 1024
#: Default bound of deferred (not yet flushed) write bytes before a write forces a flush.
DEFAULT_MAX_UNFLUSHED_BYTES = 32 * 1024 * 1024
#: Default read-ahead: refs fetched ahead of a sequential run of remote misses.
DEFAULT_READAHEAD = 4

__all__ = [
    "DEFAULT_MAX_UNFLUSHED_BYTES",
    "DEFAULT_READAHEAD",
    "DEFAULT_READ_CACHE_BYTES",
    "Distributor",
    "DistributorStats",
    "DistributorTimeouts",
]


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
    #: Blocks not held here are fetched from peers: read-ahead pays.
    prefetches: ClassVar[bool] = True
    serves_page_crcs: ClassVar[bool] = True

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
        self.peers = peers
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
        self._close_local_store = close_local_store
        self._closed = False
        self._close_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="torus-dist")
        self.local = LocalReplica(local_store)
        self.calls = PeerCalls(peers, self.pool, self.timeouts.suspect)
        self.repair = ReadRepair(
            self_uuid,
            self.local,
            self.calls,
            self.stats,
            timeout=self.timeouts.repair,
            max_pending=max_pending_repairs,
        )
        self.placement = WritePlacement(
            self_uuid=self_uuid,
            local=self.local,
            ring=lambda: self._ring,
            calls=self.calls,
            executor=self._executor,
            timeouts=self.timeouts,
            block_size=block_size,
        )
        self.replication = Replication(
            self_uuid=self_uuid,
            local=self.local,
            placement=self.placement,
            calls=self.calls,
            executor=self._executor,
            timeouts=self.timeouts,
            stats=self.stats,
            defer_flush=defer_flush,
            max_unflushed_bytes=max_unflushed_bytes,
            write_behind=write_behind,
        )
        self.reads = BlockReader(
            self_uuid=self_uuid,
            local=self.local,
            ring=lambda: self._ring,
            calls=self.calls,
            cache=self.cache,
            write_behind=self.replication.write_behind,
            repair=self.repair,
            executor=self._executor,
            stats=self.stats,
            timeouts=self.timeouts,
            block_size=block_size,
            read_level=ReadLevel.parse(read_level),
            readahead=readahead,
            ranged_read_max=block_size // 4 if ranged_read_max is None else ranged_read_max,
        )
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

    @property
    def local_store(self) -> BlockStore | None:
        """This peer's store, or None for a client."""
        return self.local.store

    @property
    def read_level(self) -> ReadLevel:
        """The default read level."""
        return self.reads.read_level

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

    def get_block(self, ref: BlockRef, *, level: ReadLevel | str | None = None) -> bytes:
        """Read a block: cache, then local store, then peers per ``level`` (default: the configured one).

        Raises :class:`BlockNotExist` when every source answered that it lacks the block,
        :class:`CorruptBlock` when the only copies found were corrupt, and
        :class:`NoPeersBlock` (retryable) when some source could not be reached. Inside
        :func:`~torus_core.blockstore.nonblocking_reads` a read that needs a peer raises
        :class:`~torus_core.errors.WouldBlock` instead.
        """
        self._check_open()
        return self.reads.get_block(ref, level)

    def read_block_range(self, ref: BlockRef, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``ref``, **unverified** where that is cheaper (the
        caller checks them, see :meth:`BlockStore.read_block_range`).

        A whole block is :meth:`get_block` (verified, any good copy, cached). A part comes from
        the cache or write-behind queue, else from the local store (one ``pread`` for the file
        store), else from a peer: just the range if it is at most ``ranged_read_max`` bytes (and,
        when the access pattern says the block will be read again -- this read continues the
        previous one of the block, or the block is read by range often -- the whole block is
        then fetched into the cache in the background), else the whole block (cached, so the
        next part of it is local).
        """
        self._check_open()
        return self.reads.read_block_range(ref, start, length)

    def page_crcs(self, ref: BlockRef, page_size: int) -> bytes:
        """The page CRC table of ``ref`` (:meth:`BlockStore.page_crcs`) without moving the
        block when it is remote: from the cache or the local store, else one peer's table (see
        :meth:`~torus_core.distributor.reads.BlockReader.page_crcs`)."""
        self._check_open()
        return self.reads.page_crcs(ref, page_size)

    def prefetch(self, refs: Iterable[BlockRef]) -> int:
        """Start fetching blocks that will be read soon (e.g. a file's next blocks) into the read
        cache, in the background; refs already cached, queued, local or being fetched are
        skipped, and at most ``2 * readahead`` fetches run at once (the rest are dropped).
        Returns how many fetches were started. Never raises for a bad ref: its fetch fails
        quietly and a later read reports the error."""
        self._check_open()
        return self.reads.prefetch(refs)

    def drain_repairs(self, timeout: float = 10.0) -> bool:
        """Wait until queued read repairs finish; returns False if some are still running."""
        return self.repair.drain(timeout)

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
            if not self.local.present:
                raise InvalidArgument("write level 'local' needs a local store")
            batch = self.local.write_until_full(batch)
            if not batch:
                return
            write_level = WriteLevel.ONE
        queued = self.replication.write_behind is not None
        self.replication.submit(batch, write_level)
        if not queued:  # cached only once replicated: a failed write leaves nothing behind
            self._cache_written(batch)
        if self.replication.over_bound:
            self.flush()

    def _pad(self, data: BlockData) -> bytes:
        raw = bytes(data)
        if len(raw) > self._block_size:
            raise InvalidArgument(f"block data is {len(raw)} bytes, block size is {self._block_size}")
        if len(raw) < self._block_size:
            raw += bytes(self._block_size - len(raw))
        return raw

    def _cache_written(self, batch: list[tuple[BlockRef, bytes]]) -> None:
        """Cache written blocks that this peer will not hold itself (those it owns are read
        back from the local store, like any local block)."""
        ring = self._ring
        for ref, data in batch:
            if self.local_store is None or self.self_uuid not in ring.get_peers(ref).owners:
                self.cache.put(ref, data)

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
        self.replication.flush()

    # --- the rest of the BlockStore API -----------------------------------------------------

    def has_block(self, ref: BlockRef) -> bool:
        """Whether the block exists: cache, local store, then the owners (RebalanceCheck) and,
        if some owner could not be asked, the other peers (which may hold a handoff copy).

        False only when every owner answered; raises :class:`NoPeersBlock` when no source
        has it and some owner could not be asked.
        """
        self._check_open()
        if self.reads.is_held(ref):
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
            try:
                found = self.calls.call(uuid, lambda c: c.rebalance_check([ref], timeout=self.timeouts.check))
            except TorusError as exc:
                unreachable[uuid] = exc
            else:
                if found[0]:
                    return True
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

    def close(self) -> None:
        """Flush pending writes (best effort, bounded), stop worker threads (in-flight calls are
        bounded by their deadlines), then close the local store (unless ``close_local_store``
        was false) and an internally created pool."""
        if not self._closed and self.replication.pending:
            try:
                self.flush()
            except TorusError as exc:
                log.warning("closing with %d unflushed block(s): %s", len(self.replication.unflushed), exc)
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self.replication.write_behind is not None:
            self.replication.write_behind.close()
        self.reads.close()
        self.calls.close()
        self.repair.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.cache.clear()
        if self.local_store is not None and self._close_local_store:
            self.local_store.close()
        if self._own_pool:
            self.pool.close()
