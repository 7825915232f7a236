"""Garbage collection for a single-node ``torusd`` (no cluster, no rebalancer).

Each sync writes new blocks and a new INode; the superseded ones become garbage. In a cluster
the :class:`~torus_core.cluster.node.ClusterNode` collects them; a single node runs the same
:class:`~torus_core.gc.GarbageCollector` over its local store from this thread, with
the same safety rules (no deletion in a cycle where metadata or an INode could not be read;
in-flight writes, snapshots and clones kept; a grace period across cycles).
"""

from __future__ import annotations

import logging
import threading
import time

from torus_core.blockstore import BlockStore
from torus_core.errors import InvalidArgument, TorusError
from torus_core.gc import GarbageCollector
from torus_core.metadata import MetadataService
from torus_core.registry import Registry

log = logging.getLogger(__name__)


class LocalGC:
    """Runs :meth:`GarbageCollector.run_cycle` every ``interval`` seconds until stopped, and
    sooner under space pressure.

    :param md: metadata service.
    :param store: the node's block store (read for INodes and collected).
    :param grace: seconds a block must stay dead across cycles before it is deleted.
    :param interval: seconds between cycles.
    :param pressure: store fill ratio (used/capacity) from which cycles run every
        ``pressure_interval`` seconds with ``pressure_grace`` instead of ``grace``.

    The first cycle runs right at start (a restarted node with a full store frees space before
    its first write needs it). :meth:`collect_now` runs a cycle at once and waits for it
    (bounded): a write that found the store full asks for it before failing with ENOSPC.
    """

    def __init__(
        self,
        md: MetadataService,
        store: BlockStore,
        *,
        grace: float = 30.0,
        interval: float = 10.0,
        layer_registry: Registry,
        pressure: float = 0.75,
        pressure_grace: float = 2.0,
        pressure_interval: float = 1.0,
    ) -> None:
        if not isinstance(interval, int | float) or interval <= 0:
            raise InvalidArgument(f"GC interval must be > 0 seconds, got {interval!r}")
        if not 0 < pressure <= 1:
            raise InvalidArgument(f"GC pressure threshold must be in (0, 1], got {pressure!r}")
        self.gc = GarbageCollector(md, store, store, grace=grace, layer_registry=layer_registry)
        self.store = store
        self.interval = float(interval)
        self.grace = float(grace)
        self.pressure = float(pressure)
        self.pressure_grace = min(float(pressure_grace), self.grace)
        self.pressure_interval = float(pressure_interval)
        self.cycles = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="torus-local-gc", daemon=True)

    def start(self) -> LocalGC:
        """Start the background thread; returns self."""
        self._thread.start()
        return self

    def fill_ratio(self) -> float:
        """Used blocks / capacity of the store (0 when the capacity is unknown)."""
        try:
            total = self.store.num_blocks()
            return self.store.used_blocks() / total if total else 0.0
        except TorusError:
            return 0.0

    def _cycle(self) -> None:
        under_pressure = self.fill_ratio() >= self.pressure
        self.gc.grace = self.pressure_grace if under_pressure else self.grace
        try:
            result = self.gc.run_cycle()
        except TorusError as exc:  # a failed cycle deletes nothing; try again next time
            log.warning("GC cycle failed: %s", exc)
            return
        finally:
            with self._done:
                self.cycles += 1
                self._done.notify_all()
        if result.deleted:
            log.info(
                "GC deleted %d dead blocks%s", result.deleted, " (space pressure)" if under_pressure else ""
            )

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            due = now - last >= self.interval or self._wake.is_set()
            if not due and self.fill_ratio() >= self.pressure:
                due = now - last >= self.pressure_interval
            if due:
                self._wake.clear()
                last = time.monotonic()
                self._cycle()
            self._stop.wait(min(0.5, self.pressure_interval))

    def collect_now(self, timeout: float = 10.0) -> bool:
        """Ask for a cycle at once and wait until one more cycle finished (bounded); returns
        whether one did."""
        with self._done:
            target = self.cycles + 1
            self._wake.set()
            deadline = time.monotonic() + timeout
            while self.cycles < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._done.wait(min(left, 0.5))
            return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current cycle (bounded wait)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
