"""The ``union`` ring (type 3): the old ring's placement followed by the new ring's extras.

Meant for ring transitions: reads find blocks on old holders while data migrates. Its spec
stores both rings, marshalled in the ``models.Ring`` format, under ``attrs["old"]`` and
``attrs["new"]``. Version and replication come from the new ring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torus_core.errors import InvalidArgument
from torus_core.refs import BlockRef
from torus_core.ring.base import PeerPermutation, Ring, RingSpec

if TYPE_CHECKING:
    from torus_core.registry import Registry


class UnionRing(Ring):
    """Union of an old and a new ring; not modifiable."""

    name: ClassVar[str] = "union"
    type_id: ClassVar[int] = 3

    def __init__(self, old: Ring, new: Ring) -> None:
        if not isinstance(old, Ring) or not isinstance(new, Ring):
            raise InvalidArgument("a union ring needs two rings")
        self.old = old
        self.new = new

    @classmethod
    def from_spec(cls, spec: RingSpec, ring_types: Registry) -> UnionRing:
        """Build from ``attrs["old"]`` and ``attrs["new"]``, resolved through ``ring_types``
        (so either side may be a ring type registered by a plugin)."""
        from torus_core.ring.codec import unmarshal_ring

        try:
            old_b, new_b = spec.attrs["old"], spec.attrs["new"]
        except KeyError as exc:
            raise InvalidArgument(f"union ring spec lacks attrs[{exc.args[0]!r}]") from None
        return cls(unmarshal_ring(old_b, ring_types), unmarshal_ring(new_b, ring_types))

    def to_spec(self) -> RingSpec:
        """Spec carrying both rings in attrs."""
        from torus_core.ring.codec import marshal_ring

        return RingSpec(
            type=self.name,
            version=self.version,
            replication=self.new.to_spec().replication,
            attrs={"old": marshal_ring(self.old), "new": marshal_ring(self.new)},
        )

    @property
    def version(self) -> int:
        """The new ring's version."""
        return self.new.version

    def get_peers(self, ref: BlockRef) -> PeerPermutation:
        """Old permutation, then the new one's peers not in it; the new ring's replication."""
        old = self.old.get_peers(ref)
        new = self.new.get_peers(ref)
        have = set(old.peers)
        return PeerPermutation([*old.peers, *(p for p in new.peers if p not in have)], new.replication)

    def members(self) -> list[str]:
        """New members, then old members not in the new ring (the original's order)."""
        new = self.new.members()
        have = set(new)
        return [*new, *(m for m in self.old.members() if m not in have)]

    def describe(self) -> str:
        """Both rings' descriptions."""
        return f"Union Ring:\nOld:\n{self.old.describe()}\nNew:\n{self.new.describe()}"
