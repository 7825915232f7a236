"""pluggy entry point (group ``torus``, name ``mem``): registers :class:`MemBlockStore`."""

from __future__ import annotations

import torus_core
from torus_blockstore_mem.store import MemBlockStore
from torus_core.registry import BackendDeclaration, Registry


@torus_core.hookimpl
def torus_register_block_stores(registry: Registry) -> None:
    """Register the in-memory block store under ``"mem"``."""
    registry.register(MemBlockStore.name, MemBlockStore)


@torus_core.hookimpl
def torus_declare_backends() -> list[BackendDeclaration]:
    """The in-memory store ignores ``[blockstore_options]`` (no keys declared)."""
    return [
        BackendDeclaration(
            kind="block store", name=MemBlockStore.name, install_hint="pip install torus-blockstore-mem"
        )
    ]
