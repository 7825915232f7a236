"""Built-in blockset layers, registered through the same hook as external plugins."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import Registry


@hookimpl
def torus_register_blockset_layers(registry: Registry) -> None:
    """Register ``base`` (kind 0), ``crc`` (kind 1) and ``rep`` (kind 2, alias ``r``)."""
    from torus_core.blockset.base import BaseLayer
    from torus_core.blockset.crc import CRCLayer
    from torus_core.blockset.rep import RepLayer

    for cls in (BaseLayer, CRCLayer, RepLayer):
        registry.register(cls.name, cls)
