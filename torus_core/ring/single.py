"""The ``single`` ring (type 1): exactly one peer that owns every block."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torus_core.errors import InvalidArgument
from torus_core.refs import BlockRef
from torus_core.ring.base import PeerPermutation, Ring, RingMember, RingSpec
from torus_core.ring.members import check_members, check_version

if TYPE_CHECKING:
    from torus_core.registry import Registry


class SingleRing(Ring):
    """One peer, replication 1; not modifiable."""

    name: ClassVar[str] = "single"
    type_id: ClassVar[int] = 1

    def __init__(self, member: RingMember, version: int = 1) -> None:
        (self._member,) = check_members([member])
        self._version = check_version(version)

    @classmethod
    def from_spec(cls, spec: RingSpec, ring_types: Registry) -> SingleRing:
        """Build from a spec; raises InvalidArgument unless it has exactly one member."""
        if len(spec.members) != 1:
            raise InvalidArgument(f"a single ring needs exactly one peer, got {len(spec.members)}")
        return cls(spec.members[0], spec.version)

    def to_spec(self) -> RingSpec:
        """Spec with the one member and replication 1."""
        return RingSpec(type=self.name, version=self._version, replication=1, members=(self._member,))

    @property
    def version(self) -> int:
        """Ring version."""
        return self._version

    def get_peers(self, ref: BlockRef) -> PeerPermutation:
        """``[peer]`` with replication 1."""
        return PeerPermutation([self._member.uuid], 1)

    def members(self) -> list[str]:
        """The single member."""
        return [self._member.uuid]

    def describe(self) -> str:
        """Human-readable description."""
        return f"Ring: Single\nUUID: {self._member.uuid}"
