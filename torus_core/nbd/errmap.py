"""Mapping of torus errors to NBD wire error codes."""

from __future__ import annotations

from torus_core import errors
from torus_core.nbd.constants import Errno


def errno_for(exc: BaseException) -> Errno:
    """The NBD error value to report for an exception raised by an export."""
    if isinstance(exc, errors.OutOfSpace):
        return Errno.ENOSPC
    if isinstance(exc, errors.InvalidArgument):
        return Errno.EINVAL
    if isinstance(exc, errors.NotSupported):
        return Errno.ENOTSUP
    if isinstance(exc, errors.Closed):
        return Errno.ESHUTDOWN
    if isinstance(exc, errors.Locked):
        # The volume lock was lost: writing is no longer permitted.
        return Errno.EPERM
    if isinstance(exc, PermissionError):
        return Errno.EPERM
    if isinstance(exc, MemoryError):
        return Errno.ENOMEM
    return Errno.EIO
