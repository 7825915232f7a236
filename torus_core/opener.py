"""One way to open the configured metadata backend and block store (torusctl, torusd, torusblk).

The composition root builds the plugin registries once (:func:`torus_core.plugins.load_registries`)
and hands them to an :class:`Opener` with the :class:`~torus_core.config.Config`. The opener
resolves the metadata URL's scheme through what the plugins declared (``etcds://`` selects
``etcd``), checks the options against the declared configuration keys, and turns a missing client
library into the plugin's own install hint. Core knows no plugin name or scheme.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.config import Config
from torus_core.errors import ConfigError
from torus_core.eventlog import MetadataBackend
from torus_core.plugins import Registries
from torus_core.registry import Registry


class Opener:
    """Opens backends named by a :class:`Config` through plugin :class:`Registries`.

    :param registries: the registries of the process (built once at its start).
    :param config: the configuration naming the backends.
    """

    def __init__(self, registries: Registries, config: Config) -> None:
        self.registries = registries
        self.config = config

    def metadata_class(self, url: str | None = None) -> type[MetadataBackend]:
        """The backend class ``url``'s scheme selects (default: the configured URL)."""
        cls: type[MetadataBackend] = self.registries.metadata.get_for_url(url or self.config.metadata)
        return cls

    def metadata_name(self, url: str | None = None) -> str:
        """The registered name of the backend ``url`` selects (``etcds://`` -> ``etcd``)."""
        target = url or self.config.metadata
        return self.registries.metadata.name_for_scheme(target.split("://", 1)[0])

    def open_metadata(self, url: str | None = None) -> MetadataBackend:
        """Open the metadata backend named by ``url`` (default: the configured one)."""
        target = url or self.config.metadata
        name = self.metadata_name(target)
        cls = self.registries.metadata.get(name)
        options = dict(self.config.metadata_options)
        _check_keys(self.registries.metadata, name, options, "metadata_options")
        with _install_hint(self.registries.metadata, name):
            backend: MetadataBackend = cls.from_url(target, options)
        return backend

    def block_store_class(self, name: str | None = None) -> type[BlockStore]:
        """The block store class registered as ``name`` (default: the configured one)."""
        cls: type[BlockStore] = self.registries.block_stores.get(name or self.config.block_store)
        return cls

    def open_block_store(
        self, block_size: int, *, name: str | None = None, path: str | None = None
    ) -> BlockStore:
        """Open the block store with the cluster's block size (at ``<data_dir>/block`` by default)."""
        store_name = name or self.config.block_store
        cls = self.block_store_class(store_name)
        options = dict(self.config.blockstore_options)
        _check_keys(self.registries.block_stores, store_name, options, "blockstore_options")
        with _install_hint(self.registries.block_stores, store_name):
            store: BlockStore = cls.open(
                BlockStoreConfig(
                    block_size=block_size,
                    capacity_bytes=self.config.storage_size,
                    path=path or os.path.join(self.config.data_dir, "block"),
                    options=options,
                )
            )
        return store


def _check_keys(registry: Registry, name: str, options: dict[str, object], section: str) -> None:
    decl = registry.declarations.get(name)
    if decl is None or decl.config_keys is None:
        return
    unknown = sorted(set(options) - set(decl.config_keys))
    if unknown:
        known = ", ".join(decl.config_keys) or "none"
        raise ConfigError(
            f"unknown [{section}] key(s) for {registry.kind} {name!r}: {', '.join(unknown)}; known: {known}"
        )


@contextlib.contextmanager
def _install_hint(registry: Registry, name: str) -> Iterator[None]:
    """Turn an ImportError raised while opening a backend into a ConfigError with the plugin's hint."""
    try:
        yield
    except ImportError as exc:
        hint = registry.install_hint(name)
        msg = f"{registry.kind} {name!r} cannot be used: {exc}"
        if hint:
            msg += f"; install what it needs: {hint}"
        raise ConfigError(msg) from exc
