"""The kernel NBD client's ioctls (``linux/nbd.h``): the interface the Go original used.

Kept as the fallback for kernels without the ``nbd`` generic-netlink family. The device is
configured with NBD_SET_BLKSIZE / NBD_SET_SIZE_BLOCKS / NBD_SET_FLAGS / NBD_SET_TIMEOUT, one
NBD_SET_SOCK per connection, and then NBD_DO_IT, which blocks in its caller until the device is
disconnected (NBD_DISCONNECT from anyone, or the server closing the sockets).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path

from torus_core.errors import InvalidArgument
from torus_core.kernel_nbd.netlink import KernelNBDError

NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_SET_SIZE = 0xAB02
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A

_DEVICE = re.compile(r"^/dev/nbd(\d+)$")
SYS_BLOCK = Path("/sys/block")


def device_index(device: str) -> int:
    """N of ``/dev/nbdN``; InvalidArgument for anything else."""
    m = _DEVICE.match(device)
    if m is None:
        raise InvalidArgument(f"not an NBD device path: {device!r} (expected /dev/nbdN)")
    return int(m.group(1))


def device_path(index: int) -> str:
    """``/dev/nbdN``."""
    return f"/dev/nbd{index}"


def device_in_use(index: int) -> bool:
    """True if ``nbdN`` is connected (the kernel shows ``/sys/block/nbdN/pid`` then)."""
    return (SYS_BLOCK / f"nbd{index}" / "pid").exists()


def free_device() -> int:
    """The lowest ``/dev/nbdN`` that is not connected (how the original picked one)."""
    indexes = sorted(
        int(p.name[3:])
        for p in SYS_BLOCK.glob("nbd*")
        if p.name[3:].isdigit() and not device_in_use(int(p.name[3:]))
    )
    if not indexes:
        raise KernelNBDError("no free /dev/nbdN (is the nbd module loaded?)", errno.ENODEV)
    return indexes[0]


def _ioctl(fd: int, request: int, arg: int, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise KernelNBDError(f"{what}: {exc.strerror}", exc.errno or 0) from exc


class IoctlDevice:
    """An open ``/dev/nbdN`` configured through ioctls."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.path = device_path(index)
        try:
            self.fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise KernelNBDError(f"cannot open {self.path}: {exc.strerror}", exc.errno or 0) from exc

    def configure(self, fds: list[int], size: int, block_size: int, flags: int, timeout: int) -> None:
        """Block size, size in blocks, flags, timeout and one socket per connection."""
        if device_in_use(self.index):
            raise KernelNBDError(f"{self.path} is already connected", errno.EBUSY)
        _ioctl(self.fd, NBD_SET_BLKSIZE, block_size, "NBD_SET_BLKSIZE")
        _ioctl(self.fd, NBD_SET_SIZE_BLOCKS, size // block_size, "NBD_SET_SIZE_BLOCKS")
        _ioctl(self.fd, NBD_SET_FLAGS, flags, "NBD_SET_FLAGS")
        if timeout:
            _ioctl(self.fd, NBD_SET_TIMEOUT, timeout, "NBD_SET_TIMEOUT")
        for i, fd in enumerate(fds):
            try:
                _ioctl(self.fd, NBD_SET_SOCK, fd, "NBD_SET_SOCK")
            except KernelNBDError as exc:
                if i == 0 or exc.errno not in (errno.EINVAL, errno.EBUSY):
                    raise
                # kernels before 4.10 take one socket only: serve the rest nothing
                break

    def do_it(self) -> None:
        """NBD_DO_IT: blocks until the device is disconnected (run it in its own thread)."""
        try:
            fcntl.ioctl(self.fd, NBD_DO_IT, 0)
        except OSError as exc:
            # the kernel returns an error when the connection ends other than by NBD_DISCONNECT
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.ENOTCONN):
                raise KernelNBDError(f"NBD_DO_IT: {exc.strerror}", exc.errno or 0) from exc

    def disconnect(self) -> None:
        """NBD_DISCONNECT (the kernel sends NBD_CMD_DISC on each socket)."""
        _ioctl(self.fd, NBD_DISCONNECT, 0, "NBD_DISCONNECT")

    def clear(self) -> None:
        """NBD_CLEAR_QUE + NBD_CLEAR_SOCK after NBD_DO_IT returned (errors ignored: best effort)."""
        for request in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
            try:
                fcntl.ioctl(self.fd, request, 0)
            except OSError:
                pass

    def close(self) -> None:
        """Close the device file."""
        os.close(self.fd)


def disconnect(index: int) -> None:
    """Disconnect ``/dev/nbdN`` through the ioctls (``torusblk nbd -d`` on old kernels)."""
    dev = IoctlDevice(index)
    try:
        dev.disconnect()
        dev.clear()
    finally:
        dev.close()
