"""Replication of acknowledged writes and the bookkeeping that makes a flush mean durable.

With deferred flushes (the default) a write is acknowledged once its peers hold the copies in
memory; the bytes are kept here (:class:`~torus_core.distributor.unflushed.UnflushedWrites`)
until :meth:`Replication.flush` has every peer that took one flush it. A peer whose flush fails,
or that restarted since it took the write (its boot id changed), no longer counts: its blocks
are written again, durably, to the next peers of their permutations. With write-behind the
replication itself runs in background workers and its failures are retried at the flush.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Executor, wait

from torus_core.distributor.levels import WriteLevel
from torus_core.distributor.local import LocalReplica
from torus_core.distributor.peercalls import PeerCalls
from torus_core.distributor.placement import Acks, WritePlacement
from torus_core.distributor.stats import DistributorStats
from torus_core.distributor.timeouts import DistributorTimeouts
from torus_core.distributor.unflushed import UnflushedBlock, UnflushedWrites
from torus_core.distributor.writebehind import WriteBehind
from torus_core.errors import BlockExists, InvalidArgument
from torus_core.refs import BlockRef

log = logging.getLogger(__name__)

#: A queued write-behind item: the block, its bytes and its write level.
Queued = tuple[BlockRef, bytes, WriteLevel]


class Replication:
    """Sends writes to their replicas and keeps what a later flush must make durable.

    :param self_uuid: this peer's UUID (its flush is the local store's).
    :param local: this peer's store as a replica.
    :param placement: chooses the peers of each block and writes to them.
    :param calls: remote calls (the Flush RPC).
    :param executor: runs the per-peer flushes in parallel.
    :param timeouts: the ``write`` deadline bounds a flush too.
    :param stats: counts ``flush_rewrites``.
    :param defer_flush: replicas make writes durable only at :meth:`flush` (else at once).
    :param max_unflushed_bytes: a write leaving more than this unflushed asks for a flush.
    :param write_behind: replicate in background workers (errors surface at :meth:`flush`).
    """

    def __init__(
        self,
        *,
        self_uuid: str,
        local: LocalReplica,
        placement: WritePlacement,
        calls: PeerCalls,
        executor: Executor,
        timeouts: DistributorTimeouts,
        stats: DistributorStats,
        defer_flush: bool,
        max_unflushed_bytes: int,
        write_behind: bool,
    ) -> None:
        self.self_uuid = self_uuid
        self.local = local
        self.placement = placement
        self.calls = calls
        self.executor = executor
        self.timeouts = timeouts
        self.stats = stats
        self.defer_flush = defer_flush
        self.max_unflushed_bytes = max_unflushed_bytes
        self.unflushed = UnflushedWrites()
        self.write_behind = WriteBehind(self.replicate) if write_behind else None
        self._flush_lock = threading.Lock()

    def submit(self, batch: list[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        """Replicate ``batch`` now, or queue it for the write-behind workers."""
        if self.write_behind is not None:
            self.write_behind.submit(batch, level)
        else:
            self.replicate(batch, level)

    def replicate(self, batch: list[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        """Replicate ``batch`` and remember deferred copies for the next :meth:`flush`."""
        acks = self.placement.replicate(batch, level, durable=not self.defer_flush)
        if self.defer_flush:
            self.unflushed.add(batch, acks, level)

    @property
    def over_bound(self) -> bool:
        """Whether deferred writes hold more than ``max_unflushed_bytes`` (time to flush)."""
        return self.defer_flush and self.unflushed.nbytes > self.max_unflushed_bytes

    @property
    def pending(self) -> bool:
        """Whether some write is not yet durable on its replicas."""
        return bool(
            len(self.unflushed) or (self.write_behind is not None and self.write_behind.pending_bytes)
        )

    def flush(self) -> None:
        """Make every write acknowledged so far durable on as many distinct peers as its level
        required, then flush the local store; writes that could not be made durable stay
        pending for the next flush, and the error is raised."""
        with self._flush_lock:
            if self.write_behind is not None:
                self._settle_write_behind(self.write_behind)
            entries = self.unflushed.take()
            try:
                self._flush_entries(entries)
                if self.local.dirty:
                    self.local.flush()
            except BaseException:
                self.unflushed.restore(entries)
                raise

    def _settle_write_behind(self, wb: WriteBehind) -> None:
        """Write the queued tail durably, wait for the workers, and retry what they failed."""
        # the queued tail is written here, durably (fsync before the ack): no Flush round trip
        # for it, which is what keeps a lone flushed 4 KiB write fast
        for level, items in _by_level(wb.steal()).items():
            try:
                self.placement.replicate([(r, d) for r, d, _ in items], level, durable=True)
            except BaseException as tail_exc:
                wb.settle(items, ok=False, error=tail_exc)  # retried below like any failure
            else:
                wb.settle(items, ok=True)
        failed = wb.drain(self.timeouts.write * 8 + 30.0)
        if not failed:
            return
        fatal = [(item, e) for item, e in failed if isinstance(e, BlockExists | InvalidArgument)]
        if fatal:  # not retryable: reported once, then dropped
            wb.settle([item for item, _ in fatal], ok=True)
        by_level = _by_level(item for item, e in failed if not isinstance(e, BlockExists | InvalidArgument))
        levels = list(by_level)
        for n, level in enumerate(levels):
            items = by_level[level]
            try:
                self.replicate([(r, d) for r, d, _ in items], level)
            except BaseException as exc:
                wb.settle([it for lv in levels[n:] for it in by_level[lv]], ok=False, error=exc)
                raise
            wb.settle(items, ok=True)
        if fatal:
            raise fatal[0][1]

    def _flush_peer(self, uuid: str) -> str:
        if uuid == self.self_uuid:
            self.local.flush()
            return ""
        return self.calls.data(uuid, lambda c: c.flush(timeout=self.timeouts.write))

    def _flush_entries(self, entries: dict[BlockRef, UnflushedBlock]) -> None:
        """Flush the peers of ``entries`` (this one's store among them, in parallel) and
        rewrite, durably, what they lost."""
        if not entries:
            return
        peers: set[str] = set()
        for entry in entries.values():
            peers.update(entry.acks)
        futures = {self.executor.submit(self._flush_peer, uuid): uuid for uuid in peers}
        done, not_done = wait(futures, timeout=self.timeouts.write + 1.0)
        boots: dict[str, str] = {}
        for fut in done:
            uuid = futures[fut]
            exc = fut.exception()
            if exc is None:
                boots[uuid] = fut.result()
            else:
                log.warning("flush of %s failed; re-replicating its unflushed blocks: %s", uuid, exc)
        for fut in not_done:
            log.warning("flush of %s timed out; re-replicating its unflushed blocks", futures[fut])
            self.calls.suspect(futures[fut])
        # entries keep their recorded acks until the rewrite succeeded: a failed flush is
        # restored as it was, and its retry flushes the same peers again
        redo: dict[WriteLevel, list[tuple[BlockRef, UnflushedBlock, Acks]]] = {}
        for ref, entry in entries.items():
            good = {u: b for u, b in entry.acks.items() if u in boots and boots[u] == b}
            if len(good) < len(entry.acks):
                redo.setdefault(entry.level, []).append((ref, entry, good))
        for level, items in redo.items():
            self.stats.inc("flush_rewrites", len(items))
            acks = self.placement.replicate(
                [(ref, e.data) for ref, e, _ in items],
                level,
                durable=True,
                seed=[good for _, _, good in items],
                exclude=[set(e.acks) - set(good) for _, e, good in items],
            )
            for (_, entry, _), got in zip(items, acks, strict=True):
                entry.acks = got


def _by_level(items: Iterable[Queued]) -> dict[WriteLevel, list[Queued]]:
    grouped: dict[WriteLevel, list[Queued]] = {}
    for item in items:
        grouped.setdefault(item[2], []).append(item)
    return grouped
