"""LIO configuration in configfs: a ``user_N`` (TCMU) backstore and a ``tcm_loop`` LUN on it.

Written directly (a dozen mkdir/write/symlink calls) rather than through rtslib-fb, which would
add an untyped dependency that needs pyudev and libudev for what is here::

    core/user_HBA/NAME/control   dev_config=torus/VOLUME,dev_size=BYTES,hw_block_size=B,hw_max_sectors=N
    core/user_HBA/NAME/enable    1             -> /dev/uioN appears, named tcm-user/HBA/NAME/CONFIG
    loopback/naa.T/tpgt_1/nexus  naa.I         -> a SCSI host
    loopback/naa.T/tpgt_1/lun/lun_0/NAME -> core/user_HBA/NAME   -> the kernel scans LUN 0: /dev/sdX

The kernel sends INQUIRY, READ CAPACITY etc. while the LUN link is being created, so the ring
handler must already run then (and while the LUN is removed: the disk is synced on removal).
Teardown is the reverse; every step tolerates what is already gone.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from torus_core.errors import InvalidArgument, NotExist, NotSupported, TorusError

log = logging.getLogger(__name__)

CONFIGFS_TARGET = "/sys/kernel/config/target"
SYS_BLOCK = "/sys/block"
_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]")


def backstore_name(volume: str) -> str:
    """A configfs-safe backstore name for a volume (``torus_`` + the name, odd chars as ``_``)."""
    return "torus_" + _NAME_OK.sub("_", volume)[:48]


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise TorusError(f"writing {text!r} to {path}: {exc.strerror or exc}") from exc


def _naa(seed: str) -> str:
    return "naa.6001405" + hashlib.sha256(seed.encode()).hexdigest()[:9]


@dataclass
class TcmuBackstore:
    """A TCMU backstore ``core/user_HBA/NAME`` (create with :meth:`create`)."""

    hba: int
    name: str
    config: str
    root: str = CONFIGFS_TARGET

    @property
    def path(self) -> str:
        """The backstore's configfs directory."""
        return os.path.join(self.root, "core", f"user_{self.hba}", self.name)

    @property
    def uio_name(self) -> str:
        """The name the kernel gives the backstore's uio device."""
        return f"tcm-user/{self.hba}/{self.name}/{self.config}"

    def enabled(self) -> bool:
        """True if the backstore exists and is enabled (e.g. left by a handler that was killed)."""
        try:
            with open(os.path.join(self.path, "enable")) as f:
                return f.read().strip() == "1"
        except OSError:
            return False

    def dev_size(self) -> int | None:
        """The size in bytes the kernel has for an existing backstore (from its ``info``)."""
        try:
            with open(os.path.join(self.path, "info")) as f:
                m = re.search(r"\bSize: (\d+)", f.read())  # not SectorSize
        except OSError:
            return None
        return int(m.group(1)) if m else None

    def set_attrib(self, name: str, value: int) -> None:
        """Write a device attribute (``attrib/NAME``); only before the LUN exists for some."""
        _write(os.path.join(self.path, "attrib", name), str(value))

    def create(self, size: int, block_size: int, max_sectors: int) -> None:
        """Create, configure and enable the backstore (a stale one of the same name is removed)."""
        core = os.path.join(self.root, "core")
        if not os.path.isdir(core):
            raise NotSupported(
                f"{core} does not exist: TCMU needs configfs mounted on /sys/kernel/config "
                "and the kernel modules target_core_user and tcm_loop loaded"
            )
        if os.path.isdir(self.path):
            log.warning("removing the stale TCMU backstore %s", self.path)
            self.remove()
        try:
            os.makedirs(self.path)
        except OSError as exc:
            raise TorusError(f"cannot create the TCMU backstore {self.path}: {exc.strerror or exc}") from exc
        try:
            _write(
                os.path.join(self.path, "control"),
                f"dev_config={self.config},dev_size={size},hw_block_size={block_size},hw_max_sectors={max_sectors}",
            )
            _write(os.path.join(self.path, "enable"), "1")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove the backstore and its HBA directory if that became empty."""
        with contextlib.suppress(FileNotFoundError):
            _rmdir(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.path))


def _collect(errors: list[TorusError], fn: Callable[..., None], *args: str) -> None:
    """Run one teardown step; keep its error and go on with the next."""
    try:
        fn(*args)
    except TorusError as exc:
        errors.append(exc)


def _rmdir(path: str, attempts: int = 50) -> None:
    """rmdir, retrying EBUSY for a moment (the kernel may still hold the item)."""
    for i in range(attempts):
        try:
            os.rmdir(path)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or i == attempts - 1:
                raise TorusError(f"cannot remove {path}: {exc.strerror or exc}") from exc
            time.sleep(0.1)


@dataclass
class LoopbackLun:
    """A ``tcm_loop`` target with LUN 0 linked to a backstore: the local SCSI disk."""

    backstore: TcmuBackstore
    root: str = CONFIGFS_TARGET

    def __post_init__(self) -> None:
        self.wwn = _naa("target:" + self.backstore.name)
        self.initiator = _naa("initiator:" + self.backstore.name)

    @property
    def tpg(self) -> str:
        """The target portal group directory."""
        return os.path.join(self.root, "loopback", self.wwn, "tpgt_1")

    @property
    def lun(self) -> str:
        """The LUN 0 directory."""
        return os.path.join(self.tpg, "lun", "lun_0")

    def exists(self) -> bool:
        """True if LUN 0 is linked to the backstore (e.g. left by a handler that was killed)."""
        return os.path.islink(os.path.join(self.lun, self.backstore.name))

    def create(self) -> None:
        """Create the target, its nexus and LUN 0 (the kernel probes the disk meanwhile)."""
        if os.path.isdir(os.path.dirname(self.tpg)):
            log.warning("removing the stale tcm_loop target %s", os.path.dirname(self.tpg))
            self.remove()
        try:
            os.makedirs(self.lun)
        except OSError as exc:
            raise NotSupported(
                f"cannot create the tcm_loop LUN {self.lun} ({exc.strerror or exc}): is tcm_loop loaded?"
            ) from exc
        try:
            _write(os.path.join(self.tpg, "nexus"), self.initiator)
            os.symlink(self.backstore.path, os.path.join(self.lun, self.backstore.name))
        except OSError as exc:
            self.remove()
            raise TorusError(
                f"cannot link {self.backstore.path} to {self.lun}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Unlink the LUN, drop the nexus, remove the target (each step only if present)."""
        target = os.path.dirname(self.tpg)
        if not os.path.isdir(target):
            return
        errors: list[TorusError] = []
        for lun in glob.glob(os.path.join(self.tpg, "lun", "lun_*")):
            for link in os.listdir(lun):
                if os.path.islink(os.path.join(lun, link)):
                    try:
                        os.unlink(os.path.join(lun, link))
                    except OSError as exc:
                        errors.append(TorusError(f"cannot unlink the LUN {lun}/{link}: {exc}"))
            _collect(errors, _rmdir, lun)
        nexus = os.path.join(self.tpg, "nexus")
        current = ""
        with contextlib.suppress(OSError), open(nexus) as f:
            current = f.read().strip()
        if current not in ("", "NULL"):
            _collect(errors, _write, nexus, "NULL")
        if os.path.isdir(self.tpg):
            _collect(errors, _rmdir, self.tpg)
        _collect(errors, _rmdir, target)
        for later in errors[1:]:
            log.error("tcm_loop teardown: %s", later)
        if errors:
            raise errors[0]


def find_disk(wwid: str, *, sys_block: str = SYS_BLOCK, timeout: float = 30.0) -> str:
    """``/dev/sdX`` of the SCSI disk whose ``device/wwid`` is ``wwid``; waits up to ``timeout``."""
    if not wwid:
        raise InvalidArgument("empty wwid")
    deadline = time.monotonic() + timeout
    while True:
        for disk in sorted(glob.glob(os.path.join(sys_block, "sd*"))):
            try:
                with open(os.path.join(disk, "device", "wwid")) as f:
                    if f.read().strip() == wwid:
                        return "/dev/" + os.path.basename(disk)
            except OSError:
                continue
        if time.monotonic() >= deadline:
            raise NotExist(f"no SCSI disk with wwid {wwid} appeared under {sys_block} within {timeout:.0f}s")
        time.sleep(0.1)
