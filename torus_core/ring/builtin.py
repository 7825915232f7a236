"""Built-in ring types, registered through the same hook as external plugins."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import Registry


@hookimpl
def torus_register_ring_types(registry: Registry) -> None:
    """Register the built-in ring types (filled in by the ring package)."""
