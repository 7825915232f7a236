"""The ``ketama`` ring (type 4, the default): weighted consistent hashing.

Bit-compatible with the Go original (``serialx/hashring@75d57fa`` as used by torus):

* weight of a member = ``total_blocks / gcd(all total_blocks)``;
* each member gets ``factor = floor(40 * N * weight / total_weight)`` digests
  ``md5("<uuid>-<j>")`` for ``j in range(factor)``, each giving three points: the little-endian
  uint32s of digest bytes 0:4, 4:8 and 8:12. On a collision the later member (in ring order)
  wins — the Go code iterated a map here, so collisions were nondeterministic anyway;
* lookup: ``h = LE-uint32(md5(ref bytes)[0:4])``; start at the first point strictly greater
  than ``h`` (wrapping to 0) and walk clockwise collecting distinct members;
* members without points (tiny weights, original issue #246) are appended in ring order.

Points are computed once per ring; lookups are ``md5 + bisect`` plus a walk whose result is
cached per starting point.
"""

from __future__ import annotations

import hashlib
import math
import struct
from bisect import bisect_right
from collections.abc import Sequence
from typing import ClassVar

from torus_core.refs import BlockRef
from torus_core.ring.base import PeerPermutation, RingMember
from torus_core.ring.modifiable import ModifiableRing

_THREE_U32 = struct.Struct("<III")
_ONE_U32 = struct.Struct("<I")
#: Cache walk results per starting point only while that costs at most this many list slots.
_CACHE_SLOTS = 4_000_000


def ketama_weights(members: Sequence[RingMember]) -> list[int]:
    """Weights as the original computes them: total_blocks divided by their gcd.

    All-zero sizes (undefined in the original, a division by zero) count as weight 1 each.
    """
    g = 0
    for m in members:
        g = math.gcd(g, m.total_blocks)
    if g == 0:
        return [1] * len(members)
    return [m.total_blocks // g for m in members]


def ketama_points(members: Sequence[RingMember]) -> dict[int, int]:
    """Map point → index of the owning member (later members overwrite on collision)."""
    weights = ketama_weights(members)
    total = sum(weights)
    n = len(members)
    points: dict[int, int] = {}
    if total == 0:
        return points
    for idx, (m, w) in enumerate(zip(members, weights, strict=True)):
        # float arithmetic on purpose: identical to Go's math.Floor(float64(...) / float64(...))
        factor = math.floor(float(40 * n * w) / float(total))
        prefix = m.uuid + "-"
        for j in range(factor):
            a, b, c = _THREE_U32.unpack_from(hashlib.md5((prefix + str(j)).encode()).digest())
            points[a] = idx
            points[b] = idx
            points[c] = idx
    return points


class KetamaRing(ModifiableRing):
    """Weighted consistent hashing; adding a peer moves blocks only to that peer."""

    name: ClassVar[str] = "ketama"
    type_id: ClassVar[int] = 4

    def __init__(self, members: Sequence[RingMember], replication: int = 2, version: int = 1) -> None:
        super().__init__(members, replication, version)
        owners = ketama_points(self._members)
        self._points: list[int] = sorted(owners)
        self._owner_of: list[int] = [owners[p] for p in self._points]
        n = len(self._members)
        have = set(self._owner_of)
        #: members that got no point at all, appended to every permutation in ring order (#246)
        self._pointless: tuple[int, ...] = tuple(i for i in range(n) if i not in have)
        self._walks: dict[int, tuple[str, ...]] = {}
        self._cache_walks = len(self._points) * n <= _CACHE_SLOTS

    def _walk(self, pos: int) -> tuple[str, ...]:
        n = len(self._members)
        want = n - len(self._pointless)
        owner_of = self._owner_of
        npoints = len(owner_of)
        seen: set[int] = set()
        order: list[int] = []
        for k in range(npoints):
            idx = owner_of[(pos + k) % npoints]
            if idx not in seen:
                seen.add(idx)
                order.append(idx)
                if len(order) == want:
                    break
        order.extend(self._pointless)
        uuids = self._uuids
        return tuple(uuids[i] for i in order)

    def start_position(self, ref: BlockRef) -> int:
        """Index into the sorted points where the walk for ``ref`` starts."""
        (h,) = _ONE_U32.unpack_from(hashlib.md5(ref.to_bytes()).digest())
        pos = bisect_right(self._points, h)
        return 0 if pos == len(self._points) else pos

    def get_peers(self, ref: BlockRef) -> PeerPermutation:
        """The clockwise walk from the ref's hash; replication ``min(rep, N)``."""
        if not self._points:
            # no members at all (a member set with all points missing is impossible)
            return PeerPermutation(list(self._uuids), self._rep)
        pos = self.start_position(ref)
        walk = self._walks.get(pos)
        if walk is None:
            walk = self._walk(pos)
            if self._cache_walks:
                self._walks[pos] = walk
        return PeerPermutation(list(walk), self._rep)

    def num_points(self) -> int:
        """Number of distinct points on the ring (for diagnostics)."""
        return len(self._points)
