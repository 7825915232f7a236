"""Block volumes: locked volumes over a File, snapshots and clones, dump/load, NBD export.

Public API:

* :class:`BlockVolume` (``BlockVolume.open(md, store, name, ...)``), :func:`resize_volume`
* :func:`open_snapshot`, :func:`open_target`, :func:`clone`, :func:`parse_target`,
  :func:`create_snapshot`, :func:`list_snapshots`, :func:`delete_snapshot`, :func:`restore_snapshot`
* :func:`dump`, :func:`load`
* :class:`VolumeExportProvider`, :class:`VolumeExport` (NBD)

The daemon (:class:`torus_core.daemon.server.Server`, ``torusd`` / ``torusblk nbdserve``) is
wiring above this package, in :mod:`torus_core.daemon`.
"""

from torus_core.block.nbd_export import VolumeExport, VolumeExportProvider
from torus_core.block.snapshots import (
    clone,
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    open_snapshot,
    open_target,
    parse_target,
    restore_snapshot,
)
from torus_core.block.transfer import dump, load
from torus_core.block.volume import DEFAULT_LEASE_TTL, BlockVolume, resize_volume

__all__ = [
    "DEFAULT_LEASE_TTL",
    "BlockVolume",
    "VolumeExport",
    "VolumeExportProvider",
    "clone",
    "create_snapshot",
    "delete_snapshot",
    "dump",
    "list_snapshots",
    "load",
    "open_snapshot",
    "open_target",
    "parse_target",
    "resize_volume",
    "restore_snapshot",
]
