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
    from torus_core.registry import BackendDeclaration, Registry

hookspec = pluggy.HookspecMarker("torus")


@hookspec
def torus_register_metadata_backends(registry: Registry) -> None:
    """Register :class:`~torus_core.eventlog.MetadataBackend` classes.

    :param registry: call ``registry.register(cls.name, cls)``. Users select a backend by the
        scheme of ``--metadata URL``; a backend's schemes are its name unless the plugin declares
        others in :func:`torus_declare_backends` (``etcd`` takes ``etcd://`` and ``etcds://``).
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


@hookspec
def torus_declare_backends() -> list[BackendDeclaration]:
    """Declare the URL schemes, configuration keys and install hint of this plugin's backends.

    Called once per plugin, after the ``torus_register_*`` hooks. Each
    :class:`~torus_core.registry.BackendDeclaration` names a metadata backend or block store
    *this plugin* registered (declaring another plugin's name is a
    :class:`~torus_core.errors.PluginError`), so core needs no table of plugin names or schemes:

    - ``url_schemes``: the ``--metadata`` URL schemes that select the backend (default: its
      name); two backends claiming one scheme is a
      :class:`~torus_core.errors.DuplicateBackendError`;
    - ``config_keys``: the keys accepted in ``[metadata_options]`` / ``[blockstore_options]``
      (checked by :class:`~torus_core.opener.Opener` before the backend is opened, and listed by
      ``torusctl plugins``);
    - ``install_hint``: printed when the backend is selected but something it imports lazily is
      missing (``pip install torus-etcd``).

    A plugin that declares nothing still works: each backend's scheme is then its name.

    :return: a list of declarations (may be empty).
    """
    return []  # a spec is never called; pluggy runs the plugins' implementations
