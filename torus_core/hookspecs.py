"""Hook specifications of the ``torus`` plugin system.

A plugin is a module (or object) with ``@torus_core.hookimpl`` functions, declared in its
distribution's ``[project.entry-points.torus]`` table. Each hook receives a
:class:`~torus_core.registry.Registry` and registers implementation classes by name; torus's own
rings and blockset layers are registered through the very same hooks.

All hooks are called exactly once per plugin manager, from
:meth:`torus_core.plugins.TorusPluginManager.collect_registries`, at start-up. They must not do
I/O or import client libraries (do that lazily in ``from_url`` / ``open``). They may raise
:class:`~torus_core.errors.DuplicateBackendError` through the registry if a name is taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torus_core.registry import Registry

hookspec = pluggy.HookspecMarker("torus")


@hookspec
def torus_register_metadata_backends(registry: Registry) -> None:
    """Register :class:`~torus_core.eventlog.MetadataBackend` classes.

    :param registry: call ``registry.register(cls.name, cls)``; the name is the URL scheme
        users write in ``--metadata`` (``sqlite``, ``etcd``, ``redis``).
    """


@hookspec
def torus_register_block_stores(registry: Registry) -> None:
    """Register :class:`~torus_core.blockstore.BlockStore` classes.

    :param registry: call ``registry.register(cls.name, cls)``; the name is what
        ``torusd --block-store NAME`` selects (``file``, ``mem``).
    """


@hookspec
def torus_register_ring_types(registry: Registry) -> None:
    """Register :class:`~torus_core.ring.base.Ring` classes.

    :param registry: call ``registry.register(cls.name, cls)``. Ring names (and their numeric
        type ids) are persisted in the metadata log, so they must be stable and never reused.
    """


@hookspec
def torus_register_blockset_layers(registry: Registry) -> None:
    """Register blockset layer classes (``base``, ``crc``, ``rep``).

    :param registry: call ``registry.register(cls.name, cls)``. Layer names appear in spec
        strings such as ``crc,base`` and their kind ids in stored INodes, so they are stable.
    """
