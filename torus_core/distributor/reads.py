"""Reads of the distributor: the cache, the local store, then peers per the read level.

A read first tries what is held here (the LRU read cache and the write-behind queue), then the
local store, then remote peers in the order the read level says (see
:mod:`torus_core.distributor.levels`). What came from a peer is cached. A sequential run of
remote misses starts read-ahead. A small ranged read of a remote block asks a peer for just the
range, and the ``crc`` layer's first one asks for the block's page CRC table (:meth:`BlockReader.
page_crcs`, 512 B for a 512 KiB block) instead of the block; the whole block is fetched into the
cache only when the access pattern says it will be read again (:meth:`BlockReader._read_again`:
the read continues the previous one of that block, or the block was read by range
:data:`HOT_RANGED_READS` times while among the recently read ones). An owner found missing or
corrupt on the way is repaired in the background (:mod:`torus_core.distributor.repair`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass

from torus_core.blockstore import reads_may_block
from torus_core.crc32 import page_crcs as page_crc_table
from torus_core.distributor.cache import BlockCache
from torus_core.distributor.levels import ReadLevel
from torus_core.distributor.local import LocalReplica
from torus_core.distributor.peercalls import PeerCalls
from torus_core.distributor.prefetch import Prefetcher
from torus_core.distributor.repair import ReadRepair
from torus_core.distributor.stats import DistributorStats
from torus_core.distributor.timeouts import DistributorTimeouts
from torus_core.distributor.writebehind import WriteBehind
from torus_core.errors import (
    BlockNotExist,
    CorruptBlock,
    InvalidArgument,
    NoPeersBlock,
    PeerUnavailable,
    TorusError,
    WouldBlock,
)
from torus_core.refs import BlockRef
from torus_core.ring.base import PeerPermutation, Ring

log = logging.getLogger(__name__)

#: Page CRC tables of remote blocks kept (512 B each for a 512 KiB block: 4 MiB at most). Blocks
#: are immutable per ref, so a table never goes stale; a volume opened again (each NBD
#: connection opens it anew) does not ask the peers for them again.
PAGE_TABLES_MAX = 8192
#: Fewest blocks remembered as recently read by range (else: as many as the cache holds).
RANGED_RECENT_MIN = 16
#: The ranged read of a block that pulls it into the cache, counted while it stays among the
#: recently read ones (uniform random reads over far more than the cache almost never get
#: there; a hot set does at once).
HOT_RANGED_READS = 4


@dataclass(frozen=True)
class Part:
    """What a read asks a peer for instead of the whole block: bytes ``[start, start +
    length)``, or (``page_size`` > 0) the block's page CRC table."""

    start: int = 0
    length: int = 0
    page_size: int = 0


#: A part of a block; None for the whole block.
Span = Part | None


class ReadOutcome:
    """What each source said during one read (used for the final error and for repair)."""

    def __init__(self) -> None:
        self.missing: list[str] = []
        self.corrupt: list[str] = []
        self.unavailable: dict[str, BaseException] = {}

    def record(self, source: str, exc: BaseException) -> None:
        """Note ``source``'s failure: missing, corrupt, or unreachable."""
        if isinstance(exc, CorruptBlock):
            self.corrupt.append(source)
        elif isinstance(exc, BlockNotExist):
            self.missing.append(source)
        else:
            self.unavailable[source] = exc

    def merge(self, other: ReadOutcome) -> None:
        """Add what one pass of a retried read learnt."""
        self.unavailable.update(other.unavailable)
        for uuid in other.missing:
            if uuid not in self.missing:
                self.missing.append(uuid)
        for uuid in other.corrupt:
            if uuid not in self.corrupt:
                self.corrupt.append(uuid)

    @property
    def transient(self) -> bool:
        """Whether some source could not be asked (a retry may help)."""
        return bool(self.unavailable)

    def error(self, ref: BlockRef) -> TorusError:
        """The error a read that found no good copy raises."""
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


class BlockReader:
    """The read side of a :class:`~torus_core.distributor.Distributor`.

    :param self_uuid: this peer's UUID (skipped among the remote sources).
    :param local: this peer's store as a replica.
    :param ring: returns the ring in use (it changes under the reader).
    :param calls: remote calls to the other peers.
    :param cache: the read cache (what came from a peer is kept there).
    :param write_behind: the write-behind queue, whose blocks are readable, or None.
    :param repair: where bad owner copies found on the way are reported.
    :param executor: runs the parallel reads of the ``spread`` level.
    :param stats: read counters.
    :param timeouts: read deadlines.
    :param block_size: size of every block.
    :param read_level: the default read level.
    :param readahead: refs fetched ahead of a sequential run of remote misses (0: none).
    :param ranged_read_max: a ranged read of a remote block at most this long asks a peer for
        just the range.
    """

    def __init__(
        self,
        *,
        self_uuid: str,
        local: LocalReplica,
        ring: Callable[[], Ring],
        calls: PeerCalls,
        cache: BlockCache,
        write_behind: WriteBehind | None,
        repair: ReadRepair,
        executor: Executor,
        stats: DistributorStats,
        timeouts: DistributorTimeouts,
        block_size: int,
        read_level: ReadLevel,
        readahead: int,
        ranged_read_max: int,
    ) -> None:
        self.self_uuid = self_uuid
        self.local = local
        self.ring = ring
        self.calls = calls
        self.cache = cache
        self.write_behind = write_behind
        self.repair = repair
        self.executor = executor
        self.stats = stats
        self.timeouts = timeouts
        self.block_size = block_size
        self.read_level = read_level
        self.ranged_read_max = ranged_read_max
        #: ref -> (ranged reads seen, end of the last one), most recent last
        self._ranged_recent: OrderedDict[BlockRef, tuple[int, int]] = OrderedDict()
        self._ranged_lock = threading.Lock()
        self._tables: OrderedDict[tuple[BlockRef, int], bytes] = OrderedDict()
        self.prefetcher = Prefetcher(
            self._prefetch_load,
            max_inflight=max(2 * readahead, 2),
            readahead=readahead,
            workers=max(1, readahead),
        )

    # --- whole blocks -----------------------------------------------------------------------

    def get_block(self, ref: BlockRef, level: ReadLevel | str | None = None) -> bytes:
        """Read a block: held here, then the local store, then peers per ``level``."""
        cached = self.held(ref)
        if cached is not None:
            return cached
        if reads_may_block() and self.prefetcher.join(ref, self.timeouts.read_total):
            cached = self.held(ref)
            if cached is not None:
                return cached
        return self._load(ref, level)

    def held(self, ref: BlockRef) -> bytes | None:
        """The block from the read cache or the write-behind queue, else None."""
        cached = self.cache.get(ref)
        if cached is None and self.write_behind is not None:
            cached = self.write_behind.get(ref)
        return cached

    def is_held(self, ref: BlockRef) -> bool:
        """Whether ``ref`` is in the read cache or the write-behind queue."""
        return ref in self.cache or (self.write_behind is not None and ref in self.write_behind)

    def _prefetch_load(self, ref: BlockRef) -> bytes:
        return self._load(ref, guess=False)

    def _load(self, ref: BlockRef, level: ReadLevel | str | None = None, *, guess: bool = True) -> bytes:
        """:meth:`get_block` past the cache: local store, then peers. Caches what came from a
        peer (a local copy is cheap to read again and would only push remote blocks out).
        ``guess``: a remote miss feeds the sequential read-ahead (not for prefetches)."""
        read_level = self.read_level if level is None else ReadLevel.parse(level)
        perm = self.ring().get_peers(ref)
        outcome = ReadOutcome()
        data: bytes | None = None
        source = ""
        if self.local.store is not None:
            try:
                data = self.local.store.get_block(ref)
                source = self.self_uuid
                self.stats.inc("local_reads")
            except (BlockNotExist, CorruptBlock) as exc:
                outcome.record(self.self_uuid, exc)
        if data is None:
            if not reads_may_block():
                self.stats.inc("would_block")
                raise WouldBlock(f"block {ref} must be read from a peer")
            ahead = self.prefetcher.sequential_guess(ref) if guess and self._cache_fits_a_block() else []
            if ahead:
                self.prefetcher.submit(ahead, self._has_nearby)
            data, source = self._read_remote(ref, perm, read_level, outcome)
        if data is None:
            raise outcome.error(ref)
        bad = [p for p in perm.owners if p != source and (p in outcome.missing or p in outcome.corrupt)]
        if bad:  # queued before the block is visible in the cache: a drain after a read sees it
            self.repair.schedule(ref, data, bad)
        if source != self.self_uuid:
            self.cache.put(ref, data)
        return data

    # --- parts of blocks, and read-ahead ----------------------------------------------------

    def read_block_range(self, ref: BlockRef, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``ref``, unverified where that is cheaper (see
        :meth:`~torus_core.distributor.Distributor.read_block_range`)."""
        bs = self.block_size
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
        held = self.held(ref)
        if held is not None:
            return bytes(memoryview(held)[start : start + length])
        if self.local.store is not None:
            try:
                data = self.local.store.read_block_range(ref, start, length)
            except (BlockNotExist, CorruptBlock):
                pass
            else:
                self.stats.inc("local_reads")
                return data
        if length > self.ranged_read_max or (
            reads_may_block() and self.prefetcher.join(ref, self.timeouts.read_total)
        ):
            return bytes(memoryview(self.get_block(ref))[start : start + length])
        if not reads_may_block():
            self.stats.inc("would_block")
            raise WouldBlock(f"a range of block {ref} must be read from a peer")
        outcome = ReadOutcome()
        got, _ = self._read_remote(
            ref, self.ring().get_peers(ref), self.read_level, outcome, Part(start, length)
        )
        if got is None:
            raise outcome.error(ref)
        self.stats.inc("ranged_reads")
        if outcome.missing or outcome.corrupt:
            self._repair_by_whole_read(ref)
        if self._cache_fits_a_block() and self._read_again(ref, start, length):
            # fetch the whole block in the background, so the next parts of it are cache hits
            self.prefetcher.submit([ref], self._has_nearby)
        return got

    def _repair_by_whole_read(self, ref: BlockRef) -> None:
        """A ranged read met an owner without a good copy: read the block whole (the verified
        path, which queues the repair of that owner from the good copy). Rare; best effort."""
        try:
            self._load(ref, guess=False)
        except TorusError as exc:
            log.debug("repair read of %s failed: %s", ref, exc)

    def _read_again(self, ref: BlockRef, start: int, length: int) -> bool:
        """Record a ranged read of ``ref``; whether the pattern says the block will be read
        again: this read continues the previous one of the block (a sequential reader), or it is
        the block's :data:`HOT_RANGED_READS`-th ranged read while among the recent ones (as many
        as the read cache holds blocks). Random reads spread over far more than the cache
        stay ranged: fetching 512 KiB for each 4 KiB read would move 128x the data and evict
        the blocks that are read again."""
        window = max(RANGED_RECENT_MIN, self.cache.max_bytes // self.block_size)
        with self._ranged_lock:
            count, end = self._ranged_recent.pop(ref, (0, -1))
            count += 1
            if start == end or count >= HOT_RANGED_READS:
                return True  # forgotten: the block is on its way into the cache
            self._ranged_recent[ref] = (count, start + length)
            while len(self._ranged_recent) > window:
                self._ranged_recent.popitem(last=False)
            return False

    def page_crcs(self, ref: BlockRef, page_size: int) -> bytes:
        """The CRC-32 of each ``page_size`` page of ``ref`` (see
        :meth:`~torus_core.blockstore.BlockStore.page_crcs`): from the block if it is held
        here, else from the local store, else from the tables read from peers before (at most
        :data:`PAGE_TABLES_MAX`), else from one peer (the table, not the block). When a source
        on the way lacks a good copy, the block is read whole instead (the verified
        path, which finds a good copy and repairs the bad one) and the table computed from it."""
        bs = self.block_size
        if type(page_size) is not int or not 0 < page_size <= bs:
            raise InvalidArgument(f"page size {page_size!r} is not in 1..{bs}")
        held = self.held(ref)
        if held is not None:
            return page_crc_table(held, page_size)
        if self.local.store is not None:
            try:
                table = self.local.store.page_crcs(ref, page_size)
            except CorruptBlock:
                return page_crc_table(self.get_block(ref), page_size)
            except BlockNotExist:
                if self.self_uuid in self.ring().get_peers(ref).owners:
                    # an owner without its copy: the verified whole read repairs it
                    return page_crc_table(self.get_block(ref), page_size)
                # not ours to hold: ask a peer for the table, not the block
            else:
                self.stats.inc("local_reads")
                return table
        with self._ranged_lock:
            kept = self._tables.get((ref, page_size))
            if kept is not None:
                self._tables.move_to_end((ref, page_size))
                return kept
        if not reads_may_block():
            self.stats.inc("would_block")
            raise WouldBlock(f"the page CRCs of block {ref} must be read from a peer")
        if self.prefetcher.join(ref, self.timeouts.read_total):
            held = self.held(ref)
            if held is not None:
                return page_crc_table(held, page_size)
        outcome = ReadOutcome()
        got, _ = self._read_remote(
            ref, self.ring().get_peers(ref), self.read_level, outcome, Part(page_size=page_size)
        )
        if got is None or outcome.missing or outcome.corrupt:
            return page_crc_table(self._load(ref), page_size)
        self.stats.inc("page_crc_reads")
        with self._ranged_lock:
            self._tables[(ref, page_size)] = got
            while len(self._tables) > PAGE_TABLES_MAX:
                self._tables.popitem(last=False)
        return got

    def prefetch(self, refs: Iterable[BlockRef]) -> int:
        """Start fetching ``refs`` into the read cache in the background; returns how many
        fetches started (none when the cache cannot hold a block)."""
        if not self._cache_fits_a_block():
            return 0  # nowhere to keep what would be fetched
        return self.prefetcher.submit(refs, self._has_nearby)

    def _cache_fits_a_block(self) -> bool:
        return self.cache.max_bytes >= self.block_size

    def _has_nearby(self, ref: BlockRef) -> bool:
        """Whether ``ref`` is readable without a peer (cache, write-behind queue, local store)."""
        if self.is_held(ref):
            return True
        try:
            return self.local.store is not None and self.local.store.has_block(ref)
        except TorusError:
            return False

    # --- remote sources ---------------------------------------------------------------------

    def _read_remote(
        self,
        ref: BlockRef,
        perm: PeerPermutation,
        read_level: ReadLevel,
        outcome: ReadOutcome,
        span: Span = None,
    ) -> tuple[bytes | None, str]:
        """Read ``ref`` (or ``span`` of it) from the peers other than this one, per ``read_level``."""
        remote = self.calls.healthy_first([p for p in perm.peers if p != self.self_uuid])
        deadline = time.monotonic() + self.timeouts.read_total
        if read_level is ReadLevel.SPREAD:
            remote_owners = [p for p in perm.owners if p != self.self_uuid]
            return self._read_spread(ref, remote_owners, remote, deadline, outcome, span)
        if read_level is ReadLevel.SEQ:
            return self._read_pass(ref, remote, self.timeouts.read_peer, deadline, outcome, span)
        return self._read_block_level(ref, remote, deadline, outcome, span)

    def _fetch(self, uuid: str, ref: BlockRef, timeout: float, span: Span = None) -> bytes:
        bs = self.block_size
        if span is None:
            want = bs
            data = self.calls.data(uuid, lambda c: c.get_block(ref, timeout=timeout))
        elif span.page_size:
            ps = span.page_size
            want = 4 * -(-bs // ps)
            data = self.calls.data(uuid, lambda c: c.get_block_page_crcs(ref, ps, bs, timeout=timeout))
        else:
            start, want = span.start, span.length
            data = self.calls.data(uuid, lambda c: c.get_block_range(ref, start, want, timeout=timeout))
        self.stats.inc("remote_read_bytes", len(data))
        if len(data) != want:
            raise CorruptBlock(f"peer {uuid} returned {len(data)} bytes for {ref} (wanted {want})")
        return data

    def _try(
        self, uuid: str, ref: BlockRef, timeout: float, outcome: ReadOutcome, span: Span
    ) -> bytes | None:
        try:
            data = self._fetch(uuid, ref, timeout, span)
        except InvalidArgument:
            raise
        except TorusError as exc:
            self.stats.inc("remote_failures")
            log.debug("read %s from %s failed: %s", ref, uuid, exc)
            outcome.record(uuid, exc)
            return None
        self.stats.inc("remote_reads")
        return data

    def _read_pass(
        self,
        ref: BlockRef,
        sources: Sequence[str],
        per_peer: float,
        deadline: float,
        outcome: ReadOutcome,
        span: Span = None,
    ) -> tuple[bytes | None, str]:
        for uuid in sources:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.unavailable.setdefault(uuid, PeerUnavailable("read deadline reached"))
                break
            data = self._try(uuid, ref, min(per_peer, remaining), outcome, span)
            if data is not None:
                return data, uuid
        return None, ""

    def _read_block_level(
        self, ref: BlockRef, sources: Sequence[str], deadline: float, outcome: ReadOutcome, span: Span = None
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
            pass_outcome = ReadOutcome()
            data, source = self._read_pass(ref, sources, per_peer, deadline, pass_outcome, span)
            outcome.merge(pass_outcome)
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
        outcome: ReadOutcome,
        span: Span = None,
    ) -> tuple[bytes | None, str]:
        per_peer = min(self.timeouts.read_peer, max(0.001, deadline - time.monotonic()))
        if owners:
            futures: dict[Future[bytes], str] = {
                self.executor.submit(self._fetch, uuid, ref, per_peer, span): uuid for uuid in owners
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
                            self.repair.watch_late_read(fut, futures[fut], ref, data)
                    return data, futures[winner]
            for fut in pending:
                outcome.unavailable[futures[fut]] = PeerUnavailable("spread read timed out")
        rest = [p for p in sources if p not in owners]
        return self._read_pass(ref, rest, self.timeouts.read_peer, deadline, outcome, span)

    def close(self) -> None:
        """Stop the read-ahead workers."""
        self.prefetcher.close()
