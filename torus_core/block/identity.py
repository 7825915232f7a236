"""Who holds a volume lock: a server's peer identity, its incarnation, and the claim proving both.

A volume lock names its holder with :func:`~torus_core.metadata.format_owner`:
``peer=<data-dir identity> boot=<incarnation> host=<host> pid=<pid>``. The peer identity is the
UUID stored in ``<data_dir>/metadata/uuid`` (the cluster peer UUID; a single node has one too),
the incarnation :data:`BOOT_ID` is random per process.

A server may claim its data directory's identity only while it holds an exclusive ``flock`` on
``<data_dir>/metadata/holder.lock`` (:class:`DataDirClaim`). The kernel drops that lock when the
process dies, however it dies, so whoever holds it knows every earlier incarnation with the same
peer identity has exited: it may break their volume locks at once
(:meth:`~torus_core.metadata.MetadataService.take_over_volume`) instead of waiting for their
leases to expire. A process that cannot get the claim (another live process owns the data
directory) runs with an anonymous owner and never breaks a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import uuid
from dataclasses import dataclass

from torus_core.datadir import load_or_create_uuid, open_private, private_dir
from torus_core.errors import ConfigError
from torus_core.metadata import format_owner

log = logging.getLogger(__name__)

#: This process's incarnation id (random, fixed for the life of the process).
BOOT_ID = uuid.uuid4().hex[:16]

#: File under ``<data_dir>/metadata`` whose exclusive flock proves ownership of the identity.
CLAIM_FILE = "holder.lock"


@dataclass(frozen=True)
class HolderIdentity:
    """A lock holder's peer identity and incarnation."""

    peer: str
    boot: str = BOOT_ID

    @property
    def owner(self) -> str:
        """The lock-owner string naming this holder (``format_owner``)."""
        return format_owner(self.peer, self.boot)


class DataDirClaim:
    """An exclusive, process-lifetime ``flock`` on a data directory's identity.

    Use :meth:`acquire`; :meth:`release` (idempotent) drops it, as does the process's death.
    """

    def __init__(self, data_dir: str, fd: int, identity: HolderIdentity) -> None:
        self.data_dir = data_dir
        self.identity = identity
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: str) -> DataDirClaim | None:
        """Claim ``data_dir``'s identity, or ``None`` (logged) if another process holds it."""
        meta = os.path.join(data_dir, "metadata")
        path = os.path.join(meta, CLAIM_FILE)
        try:
            private_dir(meta)
            fd = open_private(path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise ConfigError(f"cannot open {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            log.warning(
                "%s is locked by another process: volume locks will not be taken over from "
                "earlier incarnations of this peer",
                path,
            )
            return None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot lock {path}: {exc}") from exc
        try:
            identity = HolderIdentity(load_or_create_uuid(data_dir))
            os.ftruncate(fd, 0)
            os.write(fd, f"{identity.owner}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return cls(data_dir, fd, identity)

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the flock (closing the descriptor). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"<DataDirClaim {self.data_dir!r} {self.identity.owner!r} held={self.held}>"
