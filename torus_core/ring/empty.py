"""The ``empty`` ring (type 0): no members; every lookup gives an empty permutation."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torus_core.errors import InvalidArgument
from torus_core.refs import BlockRef
from torus_core.ring.base import PeerPermutation, Ring, RingSpec
from torus_core.ring.members import check_version

if TYPE_CHECKING:
    from torus_core.registry import Registry


class EmptyRing(Ring):
    """A ring with no peers (the default before any storage node joins)."""

    name: ClassVar[str] = "empty"
    type_id: ClassVar[int] = 0

    def __init__(self, version: int = 1) -> None:
        self._version = check_version(version)

    @classmethod
    def from_spec(cls, spec: RingSpec, ring_types: Registry) -> EmptyRing:
        """Build from a spec; an empty ring must not list members."""
        if spec.members:
            raise InvalidArgument("an empty ring cannot have members")
        return cls(spec.version)

    def to_spec(self) -> RingSpec:
        """Spec with no members and replication 0."""
        return RingSpec(type=self.name, version=self._version, replication=0)

    @property
    def version(self) -> int:
        """Ring version."""
        return self._version

    def get_peers(self, ref: BlockRef) -> PeerPermutation:
        """Always the empty permutation with replication 0."""
        return PeerPermutation([], 0)

    def members(self) -> list[str]:
        """No members."""
        return []

    def describe(self) -> str:
        """Human-readable description."""
        return "Ring: Empty"
