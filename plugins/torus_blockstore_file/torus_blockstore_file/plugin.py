"""pluggy entry point (group ``torus``, name ``file``): registers :class:`FileBlockStore`."""

from __future__ import annotations

import torus_core
from torus_blockstore_file.store import FileBlockStore
from torus_core.registry import Registry


@torus_core.hookimpl
def torus_register_block_stores(registry: Registry) -> None:
    """Register the persistent file block store under ``"file"``."""
    registry.register(FileBlockStore.name, FileBlockStore)
