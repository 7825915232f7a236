"""Garbage collection for a single-node ``torusd`` (no cluster, no rebalancer).

Each sync writes new blocks and a new INode; the superseded ones become garbage. In a cluster
the :class:`~torus_core.cluster.node.ClusterNode` collects them; a single node runs the same
:class:`~torus_core.cluster.gc.GarbageCollector` over its local store from this thread, with
the same safety rules (no deletion in a cycle where metadata or an INode could not be read;
in-flight writes, snapshots and clones kept; a grace period across cycles).
"""

from __future__ import annotations

import logging
import threading

from torus_core.blockstore import BlockStore
from torus_core.cluster.gc import GarbageCollector
from torus_core.errors import InvalidArgument, TorusError
from torus_core.metadata import MetadataService
from torus_core.registry import Registry

log = logging.getLogger(__name__)


class LocalGC:
    """Runs :meth:`GarbageCollector.run_cycle` every ``interval`` seconds until stopped.

    :param md: metadata service.
    :param store: the node's block store (read for INodes and collected).
    :param grace: seconds a block must stay dead across cycles before it is deleted.
    :param interval: seconds between cycles.
    """

    def __init__(
        self,
        md: MetadataService,
        store: BlockStore,
        *,
        grace: float = 30.0,
        interval: float = 10.0,
        layer_registry: Registry | None = None,
    ) -> None:
        if not isinstance(interval, int | float) or interval <= 0:
            raise InvalidArgument(f"GC interval must be > 0 seconds, got {interval!r}")
        self.gc = GarbageCollector(md, store, store, grace=grace, layer_registry=layer_registry)
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torus-local-gc", daemon=True)

    def start(self) -> LocalGC:
        """Start the background thread; returns self."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                result = self.gc.run_cycle()
            except TorusError as exc:  # a failed cycle deletes nothing; try again next time
                log.warning("GC cycle failed: %s", exc)
                continue
            if result.deleted:
                log.info("GC deleted %d dead blocks", result.deleted)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current cycle (bounded wait)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
