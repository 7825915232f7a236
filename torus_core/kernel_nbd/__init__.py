"""Kernel NBD attach: serve an export to this machine's kernel as ``/dev/nbdN``.

Public API: :class:`KernelAttachment` and :func:`detach` (attach.py), the netlink and ioctl
interfaces (netlink.py, ioctl.py) and :class:`KernelNBDError`. Used by ``torusblk nbd``.
Linux: netlink from 4.12 (several connections, dead-connection timeout), ioctls before.
"""

from __future__ import annotations

from torus_core.kernel_nbd.attach import KernelAttachment, detach
from torus_core.kernel_nbd.netlink import KernelNBDError, NoNetlink

__all__ = ["KernelAttachment", "KernelNBDError", "NoNetlink", "detach"]
