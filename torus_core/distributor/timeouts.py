"""Bounds on the distributor's remote operations."""

from __future__ import annotations

from dataclasses import dataclass

from torus_core.errors import InvalidArgument


@dataclass(frozen=True)
class DistributorTimeouts:
    """Bounds on every remote operation, in seconds.

    :param read_peer: deadline of the first GetBlock to one peer.
    :param read_peer_max: cap of the per-peer deadline as ``block`` reads back off (x2 per pass).
    :param read_attempts: passes over the permutation for the ``block`` read level.
    :param read_total: overall bound of one read, whatever the level.
    :param retry_pause: pause before the second pass of a ``block`` read (doubles per pass).
    :param write: deadline of one PutBlocks call (includes the remote flush).
    :param check: deadline of one RebalanceCheck (``has_block``).
    :param repair: deadline of one read-repair write.
    :param suspect: seconds a peer whose call failed is tried after the others (writes hand
        off to the next peer at once instead of waiting on it again).
    :param space_wait: longest a write short of space (every reachable peer full) is retried
        while GC frees room, before it fails with :class:`~torus_core.errors.OutOfSpace`
        (0: fail at once).
    """

    read_peer: float = 0.5
    read_peer_max: float = 2.0
    read_attempts: int = 3
    read_total: float = 10.0
    retry_pause: float = 0.05
    write: float = 5.0
    check: float = 2.0
    repair: float = 5.0
    suspect: float = 2.0
    space_wait: float = 10.0

    def __post_init__(self) -> None:
        for name in ("read_peer", "read_peer_max", "read_total", "write", "check", "repair", "suspect"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise InvalidArgument(f"timeout {name!r} must be a positive number, got {value!r}")
        if not isinstance(self.read_attempts, int) or not 1 <= self.read_attempts <= 10:
            raise InvalidArgument(f"read_attempts must be in [1, 10], got {self.read_attempts!r}")
        if not isinstance(self.retry_pause, int | float) or not 0 <= self.retry_pause <= 5:
            raise InvalidArgument(f"retry_pause must be in [0, 5], got {self.retry_pause!r}")
        if not isinstance(self.space_wait, int | float) or not 0 <= self.space_wait <= 600:
            raise InvalidArgument(f"space_wait must be in [0, 600] seconds, got {self.space_wait!r}")
