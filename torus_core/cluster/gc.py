"""Compatibility alias: the garbage collector moved to :mod:`torus_core.gc`.

It is run by both :mod:`torus_core.block` (single node) and :mod:`torus_core.cluster` (storage
peers), which must not import each other, so it lives below both. Import :mod:`torus_core.gc`;
this alias goes once nothing imports it.
"""

from torus_core.gc import *  # noqa: F403
from torus_core.gc import GarbageCollector, GCResult, GCSkipped, LiveSet

__all__ = ["GCResult", "GCSkipped", "GarbageCollector", "LiveSet"]
