"""Shared machinery for the rings that support add/remove/change-replication (mod, ketama)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from torus_core.errors import InvalidArgument
from torus_core.ring.base import Ring, RingMember, RingSpec
from torus_core.ring.members import (
    check_members,
    check_replication,
    check_version,
    remove_members,
    union_members,
)

if TYPE_CHECKING:
    from torus_core.registry import Registry

log = logging.getLogger(__name__)


class ModifiableRing(Ring):
    """A ring over a member list with a configured replication factor.

    The configured factor is what is stored (so adding peers later can raise the effective
    replication); :attr:`replication` is the effective one, ``min(configured, N)``. A configured
    factor of 0 means 1, as in the original. A warning is logged once per ring when the
    configured factor exceeds the number of members (original issue #219).
    """

    def __init__(self, members: Sequence[RingMember], replication: int = 2, version: int = 1) -> None:
        self._members = check_members(members)
        self._version = check_version(version)
        rep = check_replication(replication)
        self._configured_rep = rep if rep > 0 else 1
        n = len(self._members)
        self._rep = min(self._configured_rep, n)
        self._uuids: tuple[str, ...] = tuple(m.uuid for m in self._members)
        if n and self._configured_rep > n:
            log.warning(
                "%s ring v%d: replication %d exceeds the %d member(s); using %d",
                self.name,
                self._version,
                self._configured_rep,
                n,
                n,
            )

    @classmethod
    def from_spec(cls, spec: RingSpec, ring_types: Registry) -> Self:
        """Build from a spec (attrs are ignored by these ring types)."""
        if spec.type != cls.name:
            raise InvalidArgument(f"spec is for a {spec.type!r} ring, not {cls.name!r}")
        return cls(spec.members, spec.replication, spec.version)

    def to_spec(self) -> RingSpec:
        """The spec, with the configured replication factor."""
        return RingSpec(
            type=self.name, version=self._version, replication=self._configured_rep, members=self._members
        )

    @property
    def version(self) -> int:
        """Ring version."""
        return self._version

    @property
    def replication(self) -> int:
        """Effective replication: ``min(configured, number of members)``."""
        return self._rep

    def members(self) -> list[str]:
        """Member UUIDs in ring order."""
        return list(self._uuids)

    def member_infos(self) -> tuple[RingMember, ...]:
        """Members with their stored sizes, in ring order."""
        return self._members

    def describe(self) -> str:
        """Human-readable description (type, replication, peers)."""
        lines = [f"Ring: {self.name.capitalize()}", f"Version: {self._version}", f"Replication: {self._rep}"]
        lines.append("Peers:")
        lines.extend(
            f"\t{m.uuid} ({m.total_blocks} blocks){' ' + m.address if m.address else ''}"
            for m in self._members
        )
        return "\n".join(lines)

    def _next(self, members: Sequence[RingMember], replication: int) -> Self:
        if self._version >= 0xFFFF_FFFF:
            raise InvalidArgument("ring version would overflow uint32")
        return type(self)(members, replication, self._version + 1)

    def change_replication(self, replication: int) -> Self:
        """A new ring (version + 1) with another configured replication factor."""
        return self._next(self._members, check_replication(replication))

    def add_peers(self, peers: Sequence[RingMember]) -> Self:
        """A new ring (version + 1) with new peers appended; AlreadyExists if none is new."""
        return self._next(union_members(self._members, peers), self._configured_rep)

    def remove_peers(self, uuids: Sequence[str]) -> Self:
        """A new ring (version + 1) without ``uuids``; NotExist if none is a member."""
        return self._next(remove_members(self._members, uuids), self._configured_rep)
