"""Helpers shared by the ring types: member-list validation and set operations in ring order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torus_core.errors import AlreadyExists, InvalidArgument, NotExist
from torus_core.ring.base import RingMember

_U32 = 0xFFFF_FFFF


def check_members(members: Iterable[RingMember]) -> tuple[RingMember, ...]:
    """Validate members (non-empty unique UUIDs, non-negative sizes); returns them as a tuple."""
    out = tuple(members)
    seen: set[str] = set()
    for m in out:
        if not isinstance(m, RingMember):
            raise InvalidArgument(f"ring member must be a RingMember, got {type(m).__name__}")
        if not isinstance(m.uuid, str) or not m.uuid:
            raise InvalidArgument("ring member UUID must be a non-empty string")
        if m.uuid in seen:
            raise InvalidArgument(f"duplicate ring member {m.uuid!r}")
        if not isinstance(m.total_blocks, int) or m.total_blocks < 0:
            raise InvalidArgument(f"ring member {m.uuid!r}: total_blocks must be a non-negative integer")
        seen.add(m.uuid)
    return out


def check_version(version: int) -> int:
    """Ring versions are uint32 in the stored form."""
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= _U32:
        raise InvalidArgument(f"ring version must be an integer in [0, 2**32), got {version!r}")
    return version


def check_replication(replication: int) -> int:
    """Replication factors are uint32 in the stored form."""
    if not isinstance(replication, int) or isinstance(replication, bool) or not 0 <= replication <= _U32:
        raise InvalidArgument(f"replication must be an integer in [0, 2**32), got {replication!r}")
    return replication


def union_members(old: Sequence[RingMember], new: Sequence[RingMember]) -> tuple[RingMember, ...]:
    """``old`` followed by the members of ``new`` whose UUID is not in ``old``.

    Raises :class:`AlreadyExists` if nothing would be added (the original's ErrExists).
    """
    have = {m.uuid for m in old}
    added: list[RingMember] = []
    for m in check_members(new):
        if m.uuid not in have:
            have.add(m.uuid)
            added.append(m)
    if not added:
        raise AlreadyExists("all peers are already ring members")
    return (*old, *added)


def remove_members(old: Sequence[RingMember], uuids: Iterable[str]) -> tuple[RingMember, ...]:
    """``old`` without the given UUIDs; raises :class:`NotExist` if none of them is a member."""
    drop = set(uuids)
    out = tuple(m for m in old if m.uuid not in drop)
    if len(out) == len(old):
        raise NotExist("none of the peers to remove is a ring member")
    return out
