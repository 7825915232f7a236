"""The cluster layer: a :class:`Distributor` block store replicated over the ring.

Public API: :class:`Distributor`, :class:`DistributorTimeouts`, :class:`PeerDirectory`,
:class:`ReadLevel`, :class:`WriteLevel`, :class:`BlockCache`.
"""

from __future__ import annotations

from torus_core.distributor.cache import BlockCache
from torus_core.distributor.distributor import (
    DEFAULT_READ_CACHE_BYTES,
    Distributor,
    DistributorStats,
    DistributorTimeouts,
)
from torus_core.distributor.levels import ReadLevel, WriteLevel
from torus_core.distributor.peers import PeerDirectory

__all__ = [
    "DEFAULT_READ_CACHE_BYTES",
    "BlockCache",
    "Distributor",
    "DistributorStats",
    "DistributorTimeouts",
    "PeerDirectory",
    "ReadLevel",
    "WriteLevel",
]
