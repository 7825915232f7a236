"""A peer's data directory: the files that give it a stable identity.

Below both :mod:`torus_core.block` (the data-dir claim of a single node) and
:mod:`torus_core.cluster` (a storage peer's UUID), which must not import each other.
"""

from __future__ import annotations

import os
import uuid as uuidlib

from torus_core.errors import ConfigError

__all__ = ["load_or_create_uuid"]


def load_or_create_uuid(data_dir: str) -> str:
    """This peer's UUID from ``<data_dir>/metadata/uuid``, created on first start."""
    path = os.path.join(data_dir, "metadata", "uuid")
    try:
        with open(path, encoding="ascii") as fh:
            value = fh.read().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read peer uuid file {path}: {exc}") from exc
    value = str(uuidlib.uuid4())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(value + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return value
