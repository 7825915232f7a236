"""Name → implementation registries, one per extension kind, and what plugins declare about them.

Core keeps no table of plugin names, URL schemes or distributions: a plugin registers its
classes (``torus_register_*`` hooks) and declares their URL schemes, configuration keys and
install hint (``torus_declare_backends``). For a name no installed plugin provides, the only
hint core can give is the naming convention of the kind (``torus-<name>`` for metadata
backends, ``torus-blockstore-<name>`` for block stores), which CONTRIBUTING.md documents.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torus_core.errors import DuplicateBackendError, PluginError, UnknownBackendError

T = TypeVar("T")


@dataclass(frozen=True)
class BackendDeclaration:
    """What a plugin says about one backend it registers (returned by ``torus_declare_backends``).

    :param kind: ``"metadata"`` or ``"block store"``.
    :param name: the registered name (``etcd``, ``file``).
    :param url_schemes: metadata URL schemes that select this backend (``("etcd", "etcds")``);
        empty means just ``name``. Ignored for block stores.
    :param config_keys: keys accepted in ``[metadata_options]`` / ``[blockstore_options]``;
        ``None`` means "not declared" (the backend checks its options itself).
    :param install_hint: what to run when the backend cannot be used because something it needs
        is missing, e.g. ``"pip install torus-etcd"``.
    """

    kind: str
    name: str
    url_schemes: tuple[str, ...] = ()
    config_keys: tuple[str, ...] | None = None
    install_hint: str = ""

    def schemes(self) -> tuple[str, ...]:
        """The URL schemes selecting this backend (``name`` when none were declared)."""
        return self.url_schemes or (self.name,)


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
    #: Naming convention of the distributions that provide this kind, used in the install hint
    #: for a name no installed plugin provides (``torus-`` + name); empty: no hint.
    dist_prefix: str = ""
    _entries: dict[str, Registration] = field(default_factory=dict)
    #: Declarations by registered name (filled by the plugin manager from ``torus_declare_backends``).
    declarations: dict[str, BackendDeclaration] = field(default_factory=dict)
    #: URL scheme -> registered name (metadata backends).
    _schemes: dict[str, str] = field(default_factory=dict)
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

    def declare(self, decl: BackendDeclaration, plugin: str) -> None:
        """Attach ``decl`` to the name ``plugin`` registered; its schemes must be free."""
        reg = self._entries.get(decl.name)
        if reg is None or reg.plugin != plugin:
            raise PluginError(f"plugin {plugin!r} declares {self.kind} {decl.name!r} but did not register it")
        if decl.name in self.declarations:
            raise DuplicateBackendError(f"{self.kind} {decl.name!r} declared twice by plugin {plugin!r}")
        self.declarations[decl.name] = decl

    def finish(self) -> None:
        """Build the scheme table from the declarations (undeclared names are their own scheme)."""
        self._schemes.clear()
        for reg in self.registrations():
            decl = self.declarations.get(reg.name)
            for scheme in decl.schemes() if decl is not None else (reg.name,):
                scheme = scheme.lower()
                owner = self._schemes.get(scheme)
                if owner is not None and owner != reg.name:
                    raise DuplicateBackendError(
                        f"URL scheme {scheme!r} claimed by {self.kind} {owner!r} "
                        f"(plugin {self._entries[owner].plugin!r}) and {reg.name!r} (plugin {reg.plugin!r})"
                    )
                self._schemes[scheme] = reg.name

    def get(self, name: str) -> Any:
        """Return the implementation for ``name`` or raise a helpful :class:`UnknownBackendError`."""
        return self.registration(name).impl

    def registration(self, name: str) -> Registration:
        """The registration of ``name`` (implementation and plugin), or :class:`UnknownBackendError`."""
        try:
            return self._entries[name]
        except KeyError:
            pass
        available = ", ".join(self.names()) or "none"
        raise UnknownBackendError(
            f"unknown {self.kind} {name!r}; available: {available}{self._missing_hint(name)}"
        )

    def subclass(self, name: str, base: type[T]) -> type[T]:
        """The class registered as ``name``, which must subclass ``base``.

        :class:`UnknownBackendError` if nothing is registered as ``name``; :class:`PluginError`
        naming the plugin if it registered something else (so callers read ``base``'s declared
        class attributes without probing).
        """
        return self._checked(self.registration(name), base)

    def subclasses(self, base: type[T]) -> list[tuple[str, type[T]]]:
        """(name, class) of every registration, in name order; each must subclass ``base``
        (:class:`PluginError` naming the first plugin that registered something else)."""
        return [(reg.name, self._checked(reg, base)) for reg in self.registrations()]

    def _checked(self, reg: Registration, base: type[T]) -> type[T]:
        impl = reg.impl
        if not (isinstance(impl, type) and issubclass(impl, base)):
            raise PluginError(
                f"plugin {reg.plugin!r} registered {self.kind} {reg.name!r} as {impl!r}, "
                f"which is not a {base.__name__} subclass"
            )
        return impl

    def name_for_scheme(self, scheme: str) -> str:
        """The registered name a URL scheme selects (as declared by its plugin)."""
        name = self._schemes.get(scheme.lower())
        if name is not None:
            return name
        known = ", ".join(sorted(self._schemes)) or "none"
        raise UnknownBackendError(
            f"unknown {self.kind} URL scheme {scheme!r}; known schemes: {known}{self._missing_hint(scheme)}"
        )

    def get_for_url(self, url: str) -> Any:
        """The implementation selected by ``url``'s scheme (``etcds://...`` -> ``etcd``)."""
        scheme = url.split("://", 1)[0] if "://" in url else url
        return self.get(self.name_for_scheme(scheme))

    def schemes(self) -> dict[str, str]:
        """URL scheme -> registered name."""
        return dict(sorted(self._schemes.items()))

    def install_hint(self, name: str) -> str:
        """The install hint the plugin declared for ``name`` ("" if none)."""
        decl = self.declarations.get(name)
        return decl.install_hint if decl is not None else ""

    def _missing_hint(self, name: str) -> str:
        failed = self.failed_plugins.get(name)
        if failed:
            return f"; plugin {name!r} failed to import: {failed}"
        if self.dist_prefix:
            return (
                f"; if a plugin provides it, install it (by convention: pip install {self.dist_prefix}{name})"
            )
        return ""

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

    For tests and tools that load no plugins; the composition roots (the CLIs and daemons)
    always use the plugin manager's registries.
    """
    reg = Registry(kind)
    reg.current_plugin = plugin_name
    register(registry=reg)
    reg.current_plugin = "?"
    return reg


@functools.cache
def cached_builtin_registry(kind: str, plugin_name: str, register: Callable[..., None]) -> Registry:
    """:func:`builtin_registry`, built once per arguments and shared by every caller.

    For lookups only: callers must not register into it (tests and plugin-free tools; see
    :func:`torus_core.blockset.spec.default_layer_registry`).
    """
    return builtin_registry(kind, plugin_name, register)
