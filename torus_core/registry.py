"""Name → implementation registries, one per extension kind."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torus_core.errors import DuplicateBackendError, UnknownBackendError

#: Which distribution provides a name that is not built in, for "pip install" hints.
KNOWN_DISTRIBUTIONS: dict[str, dict[str, str]] = {
    "metadata": {"sqlite": "torus-sqlite", "etcd": "torus-etcd", "redis": "torus-redis"},
    "block store": {"file": "torus-blockstore-file", "mem": "torus-blockstore-mem"},
}


@dataclass
class Registration:
    """One registered implementation and the plugin that registered it."""

    name: str
    impl: Any
    plugin: str


@dataclass
class Registry:
    """Implementations of one kind (metadata, block store, ring type, blockset layer)."""

    kind: str
    _entries: dict[str, Registration] = field(default_factory=dict)
    #: Plugins that failed to import: name -> error text (filled by the plugin manager).
    failed_plugins: dict[str, str] = field(default_factory=dict)
    #: Name of the plugin whose hook is running (set by the plugin manager).
    current_plugin: str = "?"

    def register(self, name: str, impl: Any) -> None:
        """Register ``impl`` under ``name``; a name taken by another plugin is an error."""
        if name in self._entries:
            first = self._entries[name]
            raise DuplicateBackendError(
                f"{self.kind} {name!r} registered twice: by plugin {first.plugin!r} "
                f"and by plugin {self.current_plugin!r}"
            )
        self._entries[name] = Registration(name, impl, self.current_plugin)

    def get(self, name: str) -> Any:
        """Return the implementation for ``name`` or raise a helpful :class:`UnknownBackendError`."""
        try:
            return self._entries[name].impl
        except KeyError:
            pass
        available = ", ".join(sorted(self._entries)) or "none"
        msg = f"unknown {self.kind} {name!r}; available: {available}"
        dist = KNOWN_DISTRIBUTIONS.get(self.kind, {}).get(name)
        if dist:
            failed = self.failed_plugins.get(name)
            if failed:
                msg += f"; plugin {name!r} failed to import: {failed}"
            else:
                msg += f"; install it with: pip install {dist}"
        raise UnknownBackendError(msg)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def registrations(self) -> Iterator[Registration]:
        """All registrations in name order."""
        for name in self.names():
            yield self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def builtin_registry(kind: str, plugin_name: str, register: Callable[..., None]) -> Registry:
    """A registry filled by one built-in plugin's hook only (no entry points loaded).

    Used where a caller passes no registry: built-in rings and layers then still resolve, the
    same way the plugin manager would register them.
    """
    reg = Registry(kind)
    reg.current_plugin = plugin_name
    register(registry=reg)
    reg.current_plugin = "?"
    return reg


@functools.cache
def cached_builtin_registry(kind: str, plugin_name: str, register: Callable[..., None]) -> Registry:
    """:func:`builtin_registry`, built once per arguments and shared by every caller.

    For lookups only: callers must not register into it.
    """
    return builtin_registry(kind, plugin_name, register)
