"""Built-in ring types, registered through the same hook as external plugins."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import Registry


@hookimpl
def torus_register_ring_types(registry: Registry) -> None:
    """Register ``empty`` (0), ``single`` (1), ``mod`` (2), ``union`` (3) and ``ketama`` (4)."""
    from torus_core.ring.empty import EmptyRing
    from torus_core.ring.ketama import KetamaRing
    from torus_core.ring.mod import ModRing
    from torus_core.ring.single import SingleRing
    from torus_core.ring.union import UnionRing

    for cls in (EmptyRing, SingleRing, ModRing, UnionRing, KetamaRing):
        registry.register(cls.name, cls)


def builtin_ring_types() -> Registry:
    """A new registry of the built-in ring types only (no plugins loaded).

    For tests and tools that load no plugins; processes pass the plugin manager's registry.
    """
    from torus_core.registry import builtin_registry

    return builtin_registry("ring type", "builtin-ring", torus_register_ring_types)
