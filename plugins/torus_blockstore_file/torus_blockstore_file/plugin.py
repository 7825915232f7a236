"""pluggy entry point (group ``torus``, name ``file``): registers :class:`FileBlockStore`."""

from __future__ import annotations

import torus_core
from torus_blockstore_file.store import FileBlockStore
from torus_core.registry import BackendDeclaration, Registry


@torus_core.hookimpl
def torus_register_block_stores(registry: Registry) -> None:
    """Register the persistent file block store under ``"file"``."""
    registry.register(FileBlockStore.name, FileBlockStore)


@torus_core.hookimpl
def torus_declare_backends() -> list[BackendDeclaration]:
    """The file store takes one option, ``fsync``."""
    return [
        BackendDeclaration(
            kind="block store",
            name=FileBlockStore.name,
            config_keys=("fsync",),
            install_hint="pip install torus-blockstore-file",
        )
    ]
