"""Built-in blockset layers, registered through the same hook as external plugins."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import Registry


@hookimpl
def torus_register_blockset_layers(registry: Registry) -> None:
    """Register the built-in layers (filled in by the blockset package)."""
