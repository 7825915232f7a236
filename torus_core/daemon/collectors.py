"""Prometheus collectors of the daemon's own objects (``/metrics`` of ``torusd``).

They read a :class:`~torus_core.daemon.server.Server`, a
:class:`~torus_core.cluster.node.ClusterNode` and a
:class:`~torus_core.journal.store.JournalStore` directly, which is why they live here, above
them, and not in :mod:`torus_core.metrics` (the metric definitions every layer may import).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from torus_core import __version__
from torus_core.cluster.node import ClusterNode
from torus_core.journal.store import JournalStore
from torus_core.metrics import Collector

if TYPE_CHECKING:  # daemon.server builds a ServerCollector: a runtime import would be circular
    from torus_core.daemon.server import Server


class ServerCollector(Collector):
    """Volumes and NBD connections of one :class:`~torus_core.daemon.server.Server`.

    Reads only in-memory state (the projection as of its last catch-up, the export provider),
    so a scrape never waits on the metadata backend.
    """

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """Gauges: volumes, opened exports, connections per export, NBD connections."""
        server = self.server
        yield GaugeMetricFamily(
            "torus_volumes",
            "Volumes in the cluster (as of this process's last metadata read).",
            value=len(server.md.projector.state.volumes),
        )
        opened = server.exports.open_names()
        yield GaugeMetricFamily("torus_nbd_open_volumes", "Volumes opened by NBD clients.", value=len(opened))
        conns = GaugeMetricFamily(
            "torus_nbd_volume_connections", "NBD connections per opened export.", labels=["volume"]
        )
        for name, count in sorted(opened.items()):
            conns.add_metric([name], count)
        yield conns
        nbd = server.nbd
        yield GaugeMetricFamily(
            "torus_nbd_connections",
            "Open NBD client connections.",
            value=nbd.server.connections if nbd is not None else 0,
        )
        info = InfoMetricFamily("torus_build", "torus version of this process.")
        info.add_metric([], {"version": __version__})
        yield info


class JournalCollector(Collector):
    """Disk space of this node's volume journal files, read at scrape time (like the store's
    usage in :class:`~torus_core.metrics.StoreCollector`)."""

    def __init__(self, journal: JournalStore) -> None:
        self.journal = journal

    def collect(self) -> Iterator[Metric]:
        """One gauge: :meth:`~torus_core.journal.store.JournalStore.disk_bytes` (a walk of the
        segment files, no lock taken)."""
        yield GaugeMetricFamily(
            "torus_journal_disk_bytes",
            "Disk space reserved by this node's volume journal segment files (its own volumes' and "
            "the replicas it holds for other peers; freed by checkpoints).",
            value=self.journal.disk_bytes(),
        )


class ClusterCollector(Collector):
    """Ring membership, peers and rebalancer state of one :class:`~torus_core.cluster.node.ClusterNode`."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        """Gauges read from the node (no RPC, no metadata I/O)."""
        node = self.node
        ring = node.distributor.ring
        members = ring.members()
        yield GaugeMetricFamily(
            "torus_ring_version", "Version of the ring in force here.", value=ring.version
        )
        yield GaugeMetricFamily("torus_ring_members", "Peers in the ring.", value=len(members))
        yield GaugeMetricFamily(
            "torus_ring_member", "1 if this peer is in the ring, else 0.", value=int(node.uuid in members)
        )
        yield GaugeMetricFamily(
            "torus_peers_live", "Peers with a live heartbeat (as last seen).", value=len(node.directory)
        )
        reb = node.rebalancer
        if reb is None:
            return
        info = reb.info()
        yield GaugeMetricFamily(
            "torus_rebalance_under_replicated_blocks",
            "Local blocks the last complete rebalance pass found missing on an owner (-1: no pass yet).",
            value=info.under_replicated,
        )
        yield GaugeMetricFamily(
            "torus_rebalance_unconfirmed_blocks",
            "Local blocks whose owners could not all confirm a copy in the last complete pass.",
            value=info.unconfirmed,
        )
        yield GaugeMetricFamily(
            "torus_rebalance_running", "1 while a rebalance pass runs.", value=int(info.rebalancing)
        )
        yield GaugeMetricFamily(
            "torus_rebalance_rate_bytes_per_second",
            "Push rate of the last (or current) rebalance pass.",
            value=info.rate,
        )
