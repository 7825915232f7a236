"""The cluster layer above the distributor: heartbeats, membership, rebalancing, GC, nodes.

Public API: :class:`ClusterNode`, :class:`ClusterOptions`, :class:`PeerInfo`,
:class:`RebalanceInfo`, :class:`Heartbeat`, :class:`Membership`, :class:`RingWatcher`,
:class:`Rebalancer`, :class:`RebalanceOptions`, :class:`GarbageCollector`, :class:`LiveSet`,
:func:`load_or_create_uuid`.
"""

from torus_core.cluster.heartbeat import Heartbeat
from torus_core.cluster.membership import Membership, RingWatcher
from torus_core.cluster.node import ClusterNode, ClusterOptions
from torus_core.cluster.peerinfo import MIN_PROTOCOL_VERSION, PeerInfo, RebalanceInfo, parse_peers
from torus_core.cluster.rebalancer import PassResult, RateLimiter, RebalanceOptions, Rebalancer
from torus_core.datadir import load_or_create_uuid
from torus_core.gc import GarbageCollector, GCResult, GCSkipped, LiveSet

__all__ = [
    "MIN_PROTOCOL_VERSION",
    "ClusterNode",
    "ClusterOptions",
    "GCResult",
    "GCSkipped",
    "GarbageCollector",
    "Heartbeat",
    "LiveSet",
    "Membership",
    "PassResult",
    "PeerInfo",
    "RateLimiter",
    "RebalanceInfo",
    "RebalanceOptions",
    "Rebalancer",
    "RingWatcher",
    "load_or_create_uuid",
    "parse_peers",
]
