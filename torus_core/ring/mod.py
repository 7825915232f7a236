"""The ``mod`` ring (type 2): ``crc32(ref bytes) mod N`` picks where the member list is rotated."""

from __future__ import annotations

import zlib
from typing import ClassVar

from torus_core.refs import BlockRef
from torus_core.ring.base import PeerPermutation
from torus_core.ring.modifiable import ModifiableRing


class ModRing(ModifiableRing):
    """Placement: the member list in ring order (not sorted) rotated left by ``crc32 % N``.

    Every membership change reshuffles almost every block; use ketama for real clusters.
    """

    name: ClassVar[str] = "mod"
    type_id: ClassVar[int] = 2

    def get_peers(self, ref: BlockRef) -> PeerPermutation:
        """The rotated member list; replication ``min(rep, N)``. Empty ring → empty permutation."""
        uuids = self._uuids
        n = len(uuids)
        if n == 0:
            return PeerPermutation([], 0)
        start = zlib.crc32(ref.to_bytes()) % n
        return PeerPermutation([*uuids[start:], *uuids[:start]], self._rep)
