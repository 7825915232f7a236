"""Shared command-line plumbing: config flags, backend opening, error reporting."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from torus_core.block.volume import DEFAULT_LEASE_TTL
from torus_core.blockstore import BlockStore
from torus_core.config import Config, load_config
from torus_core.errors import TorusError
from torus_core.eventlog import MetadataBackend
from torus_core.metadata import MetadataService
from torus_core.opener import Opener
from torus_core.plugins import Registries, load_registries

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliContext:
    """Lazily opened resources shared by the subcommands of one invocation."""

    config: Config
    _registries: Registries | None = None
    _backend: MetadataBackend | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def registries(self) -> Registries:
        """Plugin registries (loaded on first use, once per invocation)."""
        if self._registries is None:
            self._registries = load_registries()
        return self._registries

    @property
    def opener(self) -> Opener:
        """The :class:`~torus_core.opener.Opener` of this invocation's config and registries."""
        return Opener(self.registries, self.config)

    def open_backend(self, url: str | None = None) -> MetadataBackend:
        """Open the metadata backend named by ``url`` (default: the configured one)."""
        if url is None and self._backend is not None:
            return self._backend
        backend = self.opener.open_metadata(url)
        self._closers.append(backend.close)
        if url is None:
            self._backend = backend
        return backend

    def open_block_store(
        self, block_size: int, *, name: str | None = None, path: str | None = None
    ) -> BlockStore:
        """Open the configured block store with the cluster's block size."""
        store = self.opener.open_block_store(block_size, name=name, path=path)
        self._closers.append(store.close)
        return store

    def close(self) -> None:
        """Close everything opened, newest first."""
        while self._closers:
            try:
                self._closers.pop()()
            except TorusError:
                pass


def local_volume_options(func: F) -> F:
    """Add the flags of a command that serves one volume from this machine (``torusblk aoe``,
    ``nbd``, ``tcmu``): ``--block-store``, ``--size``, ``--lease-ttl`` and ``--debug``."""
    options = [
        click.option("--block-store", default=None, help="Block store plugin (default: file)."),
        click.option("--size", default=None, help="Capacity of the local block store, e.g. 4GiB."),
        click.option(
            "--lease-ttl",
            default=DEFAULT_LEASE_TTL,
            show_default=True,
            type=float,
            help="Volume lock lease TTL (s).",
        ),
        click.option("--debug", is_flag=True, help="Debug logging."),
    ]
    decorated: Any = func
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def config_options(func: F) -> F:
    """Add the shared ``--config``/``--metadata``/level flags (the original's config flags)."""
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False),
            envvar="TORUS_CONFIG",
            help="TOML config file.",
        ),
        click.option(
            "--metadata",
            "-C",
            "metadata",
            envvar="TORUS_METADATA",
            help=(
                "Metadata URL; its scheme selects the backend (torusctl plugins lists them), "
                "e.g. sqlite:///path.db, etcd://host:2379."
            ),
        ),
        click.option("--data-dir", default=None, help="Data directory (default: torus-data)."),
        click.option("--read-cache-size", default=None, help="Read cache size, e.g. 50MiB."),
        click.option("--read-level", type=click.Choice(["block", "seq", "spread"]), default=None),
        click.option("--write-level", type=click.Choice(["all", "one", "local"]), default=None),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def build_context(config_path: str | None, **overrides: Any) -> CliContext:
    """Load the config with command-line overrides into a :class:`CliContext`."""
    return CliContext(load_config(config_path, overrides=overrides))


def get_ctx() -> CliContext:
    """The :class:`CliContext` of the running command."""
    obj = click.get_current_context().find_root().obj
    assert isinstance(obj, CliContext)
    return obj


def metadata_service() -> MetadataService:
    """A :class:`MetadataService` on the configured backend."""
    ctx = get_ctx()
    return MetadataService(ctx.open_backend(), ring_types=ctx.registries.ring_types)


def handle_errors(func: F) -> F:
    """Turn torus errors into a one-line message and exit status 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TorusError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
