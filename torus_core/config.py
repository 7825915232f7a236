"""Configuration: defaults < TOML file < environment (``TORUS_*``) < command-line flags.

The fields mirror the original's ``torus.Config`` (inventory §10) plus the backend choices::

    # torus.toml
    data_dir = "/var/lib/torus"
    storage_size = "10GiB"
    metadata = "sqlite:////var/lib/torus/meta.db"   # scheme names the metadata backend
    block_store = "file"
    read_cache_size = "50MiB"
    read_level = "block"     # block | seq | spread
    write_level = "all"      # all | one | local

    [tls]
    ca_file = "/etc/torus/ca.pem"
    cert_file = "/etc/torus/peer.pem"
    key_file = "/etc/torus/peer.key"

    [metadata_options]       # passed to the metadata backend
    [blockstore_options]     # passed to the block store

Environment variables are the upper-cased field names with a ``TORUS_`` prefix
(``TORUS_METADATA``, ``TORUS_STORAGE_SIZE``, ``TORUS_TLS_CA_FILE``...).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from torus_core.errors import ConfigError, InvalidArgument
from torus_core.units import parse_size

READ_LEVELS = ("block", "seq", "spread")
WRITE_LEVELS = ("all", "one", "local")
DEFAULT_METADATA = "sqlite:///torus-data/metadata.db"


@dataclass(frozen=True)
class TLSConfig:
    """Certificate paths for mutual TLS (metadata, peer RPC, NBD)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def enabled(self) -> bool:
        """True when a certificate or CA is configured."""
        return bool(self.ca_file or self.cert_file)


@dataclass(frozen=True)
class Config:
    """Everything a torus process needs to know; sizes are in bytes."""

    data_dir: str = "torus-data"
    storage_size: int = 1 << 30
    metadata: str = DEFAULT_METADATA
    block_store: str = "file"
    read_cache_size: int = 50 << 20
    read_level: str = "block"
    write_level: str = "all"
    tls: TLSConfig = field(default_factory=TLSConfig)
    metadata_options: Mapping[str, Any] = field(default_factory=dict)
    blockstore_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.read_level not in READ_LEVELS:
            raise ConfigError(f"read_level must be one of {', '.join(READ_LEVELS)}, got {self.read_level!r}")
        if self.write_level not in WRITE_LEVELS:
            raise ConfigError(
                f"write_level must be one of {', '.join(WRITE_LEVELS)}, got {self.write_level!r}"
            )
        if "://" not in self.metadata:
            raise ConfigError(
                f"metadata must be a URL whose scheme names the backend "
                f"(sqlite:///path.db, etcd://host:2379, redis://host:6379/0), got {self.metadata!r}"
            )

    @property
    def metadata_scheme(self) -> str:
        """The metadata URL's scheme; the plugins' declarations map it to a backend
        (:class:`torus_core.opener.Opener`)."""
        return self.metadata.split("://", 1)[0].lower()


_SIZE_FIELDS = {"storage_size", "read_cache_size"}
_SIMPLE_FIELDS = {f.name for f in fields(Config)} - {"tls", "metadata_options", "blockstore_options"}


def _coerce(values: Mapping[str, Any], origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key == "tls":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: [tls] must be a table")
            unknown = set(value) - {"ca_file", "cert_file", "key_file"}
            if unknown:
                raise ConfigError(f"{origin}: unknown key(s) in [tls]: {', '.join(sorted(unknown))}")
            for name, path in value.items():
                if not isinstance(path, str) or not path:
                    raise ConfigError(f"{origin}: [tls] {name} must be a file path (a string), got {path!r}")
            out["tls"] = TLSConfig(**value)
        elif key in ("metadata_options", "blockstore_options"):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: [{key}] must be a table")
            out[key] = dict(value)
        elif key in _SIMPLE_FIELDS:
            if key in _SIZE_FIELDS:
                try:
                    value = parse_size(value)
                except InvalidArgument as exc:
                    raise ConfigError(f"{origin}: {key}: {exc}") from exc
            elif not isinstance(value, str):
                raise ConfigError(f"{origin}: {key} must be a string")
            out[key] = value
        else:
            raise ConfigError(f"{origin}: unknown configuration key {key!r}")
    return out


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings from ``TORUS_*`` environment variables."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in _SIMPLE_FIELDS:
        var = f"TORUS_{name.upper()}"
        if env.get(var):
            values[name] = env[var]
    tls = {}
    for key in ("ca_file", "cert_file", "key_file"):
        if env.get(f"TORUS_TLS_{key.upper()}"):
            tls[key] = env[f"TORUS_TLS_{key.upper()}"]
    if tls:
        values["tls"] = tls
    return _coerce(values, "environment")


def from_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a TOML file; a missing or malformed file is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return _coerce(data, str(path))


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build a :class:`Config` from defaults, ``path`` (or ``$TORUS_CONFIG``), env and overrides.

    ``overrides`` are command-line values; ``None`` entries are ignored.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    cfg_path = path or env.get("TORUS_CONFIG")
    if cfg_path:
        merged.update(from_file(cfg_path))
    merged.update(from_env(env))
    if overrides:
        merged.update(_coerce({k: v for k, v in overrides.items() if v is not None}, "command line"))
    cfg = Config()
    if "data_dir" in merged and "metadata" not in merged:
        # Keep the embedded default next to the data it describes.
        merged["metadata"] = f"sqlite:///{Path(merged['data_dir']) / 'metadata.db'}"
    return replace(cfg, **merged)
