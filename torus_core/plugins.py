"""Plugin discovery: built-ins plus every ``torus`` entry point, isolated from each other.

Use :func:`make_plugin_manager` to build a fresh manager (there is no module-level global) and
:meth:`TorusPluginManager.collect_registries` to get the four registries.

Environment variables:

``TORUS_DISABLE_PLUGIN_AUTOLOAD=1``
    load only the built-ins.
``TORUS_LOAD_PLUGINS=sqlite,file``
    load only the named entry points.
``TORUS_BLOCK_PLUGINS=redis``
    never load the named entry points.
``TORUS_DEBUG_PLUGINS=1``
    trace hook calls to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from types import ModuleType
from typing import cast

import pluggy

from torus_core import hookspecs
from torus_core.errors import PluginError
from torus_core.registry import BackendDeclaration, Registry

ENTRY_POINT_GROUP = "torus"

#: Core modules registered exactly like external plugins.
DEFAULT_PLUGINS: tuple[str, ...] = ("torus_core.ring.builtin", "torus_core.blockset.builtin")


@dataclass
class PluginInfo:
    """What ``torusctl plugins`` shows about one plugin."""

    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    #: What the plugin declared (``torus_declare_backends``), one line per backend.
    declared: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Registries:
    """The four registries built from every loaded plugin."""

    metadata: Registry
    block_stores: Registry
    ring_types: Registry
    blockset_layers: Registry


def _split_env(name: str) -> set[str]:
    return {p.strip() for p in os.environ.get(name, "").split(",") if p.strip()}


class TorusPluginManager(pluggy.PluginManager):
    """A pluggy manager that records where each plugin came from and which failed to load."""

    def __init__(self) -> None:
        super().__init__("torus")
        self.add_hookspecs(hookspecs)
        self.failed_plugins: dict[str, str] = {}
        self.plugin_info: dict[str, PluginInfo] = {}

    def register_builtin(self, module_name: str) -> None:
        """Register a core module as a plugin, the same way entry points are registered."""
        module = importlib.import_module(module_name)
        short = module_name.rsplit(".", 2)[-2]  # torus_core.ring.builtin -> ring
        name = f"builtin-{short}"
        self.register(module, name=name)
        from torus_core import __version__

        self.plugin_info[name] = PluginInfo(name, "torus-core", __version__)

    def load_entry_points(self, *, only: set[str] | None = None, blocked: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Import every ``torus`` entry point; an import failure is recorded, not raised."""
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or (only is not None and ep.name not in only):
                continue
            if self.has_plugin(ep.name) or ep.name in self.failed_plugins:
                continue
            dist = ep.dist
            info = PluginInfo(
                ep.name,
                dist.metadata["Name"] if dist else "?",
                dist.version if dist else "?",
            )
            self.plugin_info[ep.name] = info
            try:
                plugin: ModuleType | object = ep.load()
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                self.failed_plugins[ep.name] = info.error
                continue
            self.register(plugin, name=ep.name)

    def collect_registries(self) -> Registries:
        """Call each registration hook once per plugin and return the filled registries."""
        regs = Registries(
            metadata=Registry("metadata", dist_prefix="torus-"),
            block_stores=Registry("block store", dist_prefix="torus-blockstore-"),
            ring_types=Registry("ring type"),
            blockset_layers=Registry("blockset layer"),
        )
        hooks = {
            "torus_register_metadata_backends": ("metadata", regs.metadata),
            "torus_register_block_stores": ("block_stores", regs.block_stores),
            "torus_register_ring_types": ("ring_types", regs.ring_types),
            "torus_register_blockset_layers": ("blockset_layers", regs.blockset_layers),
        }
        for reg in (regs.metadata, regs.block_stores, regs.ring_types, regs.blockset_layers):
            reg.failed_plugins = dict(self.failed_plugins)
        # Call hook by hook, plugin by plugin, so each registration knows its plugin.
        for hook_name, (label, reg) in hooks.items():
            caller = getattr(self.hook, hook_name)
            for impl in caller.get_hookimpls():
                reg.current_plugin = impl.plugin_name
                before = set(reg.names())
                impl.function(registry=reg)
                info = self.plugin_info.get(impl.plugin_name)
                if info is not None:
                    if hook_name not in info.hooks:
                        info.hooks.append(hook_name)
                    added = sorted(set(reg.names()) - before)
                    if added:
                        info.registered.setdefault(label, []).extend(added)
            reg.current_plugin = "?"
        by_kind = {regs.metadata.kind: regs.metadata, regs.block_stores.kind: regs.block_stores}
        for impl in self.hook.torus_declare_backends.get_hookimpls():
            declared = cast("list[BackendDeclaration] | None", impl.function()) or []
            for decl in declared:
                target = by_kind.get(decl.kind)
                if target is None:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} declares a {decl.kind!r}; "
                        f"only {', '.join(sorted(by_kind))} can be declared"
                    )
                target.declare(decl, impl.plugin_name)
                info = self.plugin_info.get(impl.plugin_name)
                if info is not None:
                    if "torus_declare_backends" not in info.hooks:
                        info.hooks.append("torus_declare_backends")
                    info.declared.append(_describe(decl))
        for reg in by_kind.values():
            reg.finish()
        return regs


def _describe(decl: BackendDeclaration) -> str:
    parts = [f"{decl.kind} {decl.name}"]
    if decl.kind == "metadata":
        parts.append("schemes " + ", ".join(f"{s}://" for s in decl.schemes()))
    if decl.config_keys is not None:
        parts.append("options " + (", ".join(decl.config_keys) or "none"))
    if decl.install_hint:
        parts.append(f"install: {decl.install_hint}")
    return "; ".join(parts)


def make_plugin_manager(*, autoload: bool | None = None, block: tuple[str, ...] = ()) -> TorusPluginManager:
    """Build a new plugin manager with the built-ins and (unless disabled) all entry points."""
    pm = TorusPluginManager()
    for mod in DEFAULT_PLUGINS:
        pm.register_builtin(mod)
    if autoload is None:
        autoload = not os.environ.get("TORUS_DISABLE_PLUGIN_AUTOLOAD")
    if autoload:
        only = _split_env("TORUS_LOAD_PLUGINS") or None
        pm.load_entry_points(only=only, blocked=set(block) | _split_env("TORUS_BLOCK_PLUGINS"))
    pm.check_pending()
    if os.environ.get("TORUS_DEBUG_PLUGINS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


def load_registries() -> Registries:
    """Shortcut: a fresh manager's registries."""
    return make_plugin_manager().collect_registries()
