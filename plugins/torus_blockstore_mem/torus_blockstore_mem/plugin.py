"""pluggy entry point (group ``torus``, name ``mem``): registers :class:`MemBlockStore`."""

from __future__ import annotations

import torus_core
from torus_blockstore_mem.store import MemBlockStore
from torus_core.registry import Registry


@torus_core.hookimpl
def torus_register_block_stores(registry: Registry) -> None:
    """Register the in-memory block store under ``"mem"``."""
    registry.register(MemBlockStore.name, MemBlockStore)
