"""Read repair: a read that met a missing or corrupt copy on an owner writes the good one back.

Repairs run in the background on two workers, one per block at a time, and at most
``max_pending`` are queued (beyond that they are skipped and counted: the rebalancer catches
up later). A failed repair is logged and counted, never raised to the reader.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from torus_core.distributor.local import LocalReplica
from torus_core.distributor.peercalls import PeerCalls
from torus_core.distributor.stats import DistributorStats
from torus_core.errors import BlockNotExist, CorruptBlock
from torus_core.refs import BlockRef

log = logging.getLogger(__name__)


class ReadRepair:
    """Background write-back of good copies to the owners that lacked them.

    :param self_uuid: this peer's UUID (a repair of it goes to ``local``).
    :param local: this peer's store as a replica.
    :param calls: remote calls to the other peers.
    :param stats: counts ``repairs``, ``repair_failures`` and ``repairs_skipped``.
    :param timeout: deadline of one remote repair write.
    :param max_pending: repairs queued beyond this are skipped.
    """

    def __init__(
        self,
        self_uuid: str,
        local: LocalReplica,
        calls: PeerCalls,
        stats: DistributorStats,
        *,
        timeout: float,
        max_pending: int,
    ) -> None:
        self.self_uuid = self_uuid
        self.local = local
        self.calls = calls
        self.stats = stats
        self.timeout = timeout
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="torus-repair")
        self._pending: dict[BlockRef, Future[None]] = {}
        self._late_reads: set[Future[bytes]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def schedule(self, ref: BlockRef, data: bytes, targets: list[str]) -> None:
        """Write ``data`` back to ``targets`` in the background (skipped if ``ref`` is already
        being repaired, the queue is full, or this is closed)."""
        with self._lock:
            if self._closed or ref in self._pending:
                return
            if len(self._pending) >= self.max_pending:
                self.stats.inc("repairs_skipped")
                return
            fut = self._executor.submit(self._repair, ref, data, targets)
            self._pending[ref] = fut

        def done(_: Future[None]) -> None:
            with self._lock:
                self._pending.pop(ref, None)

        fut.add_done_callback(done)

    def watch_late_read(self, fut: Future[bytes], uuid: str, ref: BlockRef, data: bytes) -> None:
        """After a spread read returned ``data``, repair ``uuid`` if its late answer shows a bad copy."""
        with self._lock:
            self._late_reads.add(fut)

        def done(f: Future[bytes]) -> None:
            try:
                exc = None if f.cancelled() else f.exception()
                if isinstance(exc, BlockNotExist | CorruptBlock):
                    self.schedule(ref, data, [uuid])
            finally:
                with self._lock:
                    self._late_reads.discard(f)

        fut.add_done_callback(done)

    def _repair(self, ref: BlockRef, data: bytes, targets: list[str]) -> None:
        for uuid in targets:
            try:
                if uuid == self.self_uuid:
                    if not self.local.present:
                        continue
                    self.local.repair(ref, data)
                else:
                    self.calls.data(
                        uuid, lambda c: c.put_blocks([ref], [data], repair=True, timeout=self.timeout)
                    )
            except Exception as exc:  # best effort: the rebalancer re-replicates later
                self.stats.inc("repair_failures")
                log.warning("read repair of %s on %s failed: %s", ref, uuid, exc)
            else:
                self.stats.inc("repairs")
                log.info("read repair: wrote %s back to %s", ref, uuid)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until queued repairs finish; returns False if some are still running."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                pending: list[Future[Any]] = [*self._late_reads, *self._pending.values()]
            if not pending:
                return True
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            wait(pending, timeout=remaining)

    def close(self) -> None:
        """Stop taking repairs and wait for the running ones (bounded by their deadlines)."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
