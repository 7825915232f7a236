"""``torusblk tcmu VOLUME``: a volume of a :class:`~torus_core.daemon.server.Server` as a local
SCSI disk through LIO's ``target_core_user`` and ``tcm_loop``.

:func:`serve_tcmu` opens (and locks) the volume through the server's export provider, the same
:class:`~torus_core.block.nbd_export.VolumeExport` NBD and AoE use (space guard, FUA → sync),
creates the TCMU backstore, starts the ring handler (write-through: see
:class:`~torus_core.tcmu.scsi.ScsiDisk`), creates the ``tcm_loop`` LUN and waits for
``/dev/sdX``. Its stopper (run when the server closes, e.g. on SIGTERM) removes the LUN while the
handler still answers the kernel's final SYNCHRONIZE CACHE, stops the handler, removes the
backstore and closes the volume (sync + unlock).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torus_core.errors import InvalidArgument, TorusError
from torus_core.tcmu.configfs import CONFIGFS_TARGET, LoopbackLun, TcmuBackstore, backstore_name, find_disk
from torus_core.tcmu.scsi import DiskIdentity, ScsiDisk
from torus_core.tcmu.uio import TcmuHandler, UioDevice, find_uio

if TYPE_CHECKING:
    from torus_core.daemon.server import Server

log = logging.getLogger(__name__)

#: HBA index of the original (``user_30``)
DEFAULT_HBA = 30
#: largest command in logical blocks (kernel ``hw_max_sectors``)
DEFAULT_MAX_SECTORS = 1024
LINK_DIR = "/dev/torus"
#: seconds the kernel lets a command wait for the handler before failing it: longer than a
#: restart of ``torusblk tcmu`` (python start-up and volume lock take-over)
DEFAULT_CMD_TIMEOUT = 120


@dataclass
class TcmuDisk:
    """A served TCMU disk: the device node and what :meth:`stop` takes down."""

    volume: str
    device: str
    disk: ScsiDisk
    handler: TcmuHandler
    link: str | None
    stop: Callable[[], None]


def pick_block_size(size: int, requested: int | None) -> int:
    """The SCSI logical block size: ``requested``, else 4096 if it divides ``size``, else 512."""
    if requested is not None:
        if requested not in (512, 1024, 2048, 4096):
            raise InvalidArgument(f"--block-size must be 512, 1024, 2048 or 4096, got {requested}")
        return requested
    for bs in (4096, 512):
        if size % bs == 0:
            return bs
    raise InvalidArgument(f"volume size {size} is not a multiple of 512 bytes: it cannot be a SCSI disk")


def serve_tcmu(
    server: Server,
    volume: str,
    *,
    hba: int = DEFAULT_HBA,
    block_size: int | None = None,
    max_sectors: int = DEFAULT_MAX_SECTORS,
    link_dir: str | None = LINK_DIR,
    root: str = CONFIGFS_TARGET,
    timeout: float = 60.0,
    cmd_timeout: int | None = DEFAULT_CMD_TIMEOUT,
) -> TcmuDisk:
    """Lock ``volume`` and serve it as a local SCSI disk until the server closes.

    If a backstore and LUN of the same name and size exist (``torusblk tcmu`` was killed), the
    handler reattaches to them: commands the kernel queued meanwhile are served, and the
    filesystem above sees no error as long as the restart took less than ``cmd_timeout``
    seconds (the kernel's ``cmd_time_out``; 0 = wait forever, None = the kernel's 30 s).
    That is safe because the disk is write-through (WCE=0): a command completes only once
    its data is durable (one flush per pass over the ring), so a killed handler loses no
    completed write, and the commands it had not completed are run again by the next one.
    """
    if hba < 0:
        raise InvalidArgument(f"--hba must be >= 0, got {hba}")
    if max_sectors < 1:
        raise InvalidArgument(f"--max-sectors must be >= 1, got {max_sectors}")
    if cmd_timeout is not None and cmd_timeout < 0:
        raise InvalidArgument(f"--cmd-timeout must be >= 0, got {cmd_timeout}")
    export = server.exports.open_export(volume)
    undo: list[Callable[[], None]] = [export.close]

    def unwind() -> None:
        while undo:
            fn = undo.pop()
            try:
                fn()
            except TorusError as exc:
                log.error("TCMU teardown of %r: %s", volume, exc)
            except OSError as exc:
                log.error("TCMU teardown of %r: %s", volume, exc)

    try:
        bs = pick_block_size(export.size, block_size)
        disk = ScsiDisk(
            export,
            block_size=bs,
            identity=DiskIdentity(volume),
            max_transfer_blocks=max_sectors,
            write_cache=False,  # completed writes survive a killed handler: see ScsiDisk
        )
        store = TcmuBackstore(hba, backstore_name(volume), f"torus/{volume}", root=root)
        lun = LoopbackLun(store, root=root)
        linked, enabled, dev_size = lun.exists(), store.enabled(), store.dev_size()
        reattach = linked and enabled and dev_size == export.size
        if linked and not reattach:
            # never unlink a LUN that may carry a mounted filesystem with I/O waiting
            raise TorusError(
                f"a disk for volume {volume!r} is still linked at {lun.lun} but cannot be reattached "
                f"(backstore enabled: {enabled}, size {dev_size} vs {export.size}); unmount it and "
                f"remove {lun.lun} and {store.path} first"
            )
        if reattach:
            # a killed handler left the disk (maybe mounted, its I/O waiting in the ring):
            # serve the same uio device again instead of pulling the disk away
            log.info("reattaching to the TCMU backstore %s", store.path)
        else:
            lun.remove()
            store.create(export.size, bs, max_sectors)
            if cmd_timeout is not None:
                store.set_attrib("cmd_time_out", cmd_timeout)
        undo.append(store.remove)
        uio = UioDevice(find_uio(store.uio_name, timeout=timeout))
        handler = TcmuHandler(uio, disk.execute, disk.commit).start()
        undo.append(handler.stop)
        if not reattach:
            lun.create()
        undo.append(lun.remove)
        device = find_disk(disk.identity.wwid, timeout=timeout)
        if cmd_timeout is not None:
            set_disk_timeout(device, cmd_timeout)
        link = None
        if link_dir:
            link = os.path.join(link_dir, volume)
            try:
                os.makedirs(link_dir, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link)
                os.symlink(device, link)
                undo.append(lambda: os.unlink(link) if link and os.path.islink(link) else None)
            except OSError as exc:
                log.warning("cannot link %s to %s: %s", link, device, exc)
                link = None
    except BaseException:
        unwind()
        raise
    served = TcmuDisk(volume, device, disk, handler, link, unwind)
    server.add_stopper(unwind)
    return served


def set_disk_timeout(device: str, cmd_timeout: int, *, sys_block: str = "/sys/block") -> None:
    """Give the SCSI layer's per-command timeout (``device/timeout``, 30 s by default) the
    kernel's ``cmd_time_out`` plus a margin, so that the initiator does not abort and fail the
    commands a restarting handler will still complete (0: a day)."""
    seconds = cmd_timeout + 60 if cmd_timeout > 0 else 86400
    path = os.path.join(sys_block, os.path.basename(device), "device", "timeout")
    try:
        with open(path, "w") as f:
            f.write(str(seconds))
    except OSError as exc:
        log.warning("cannot set %s to %d s: %s", path, seconds, exc)


def serving_line(served: TcmuDisk) -> str:
    """``TCMU SERVING VOLUME /dev/sdX WWID``: printed once the disk exists (tests wait for it)."""
    return f"TCMU SERVING {served.volume} {served.device} {served.disk.identity.wwid}"
