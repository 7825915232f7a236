"""pluggy entry point (group ``torus``, name ``template``): registers and declares the store."""

from __future__ import annotations

import torus_core
from torus_core.registry import BackendDeclaration, Registry
from torus_template.store import OPTION_NAMES, DirBlockStore


@torus_core.hookimpl
def torus_register_block_stores(registry: Registry) -> None:
    """Register the store under its name (``torusd --block-store template``)."""
    registry.register(DirBlockStore.name, DirBlockStore)


@torus_core.hookimpl
def torus_declare_backends() -> list[BackendDeclaration]:
    """Tell core the store's option keys and how to install it."""
    return [
        BackendDeclaration(
            kind="block store",
            name=DirBlockStore.name,
            config_keys=OPTION_NAMES,
            install_hint="pip install torus-template",
        )
    ]
