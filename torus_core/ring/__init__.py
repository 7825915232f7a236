"""Rings: pure functions from a BlockRef to an ordered list of peer UUIDs.

Public API: :class:`Ring`, :class:`RingSpec`, :class:`RingMember`, :class:`PeerPermutation`,
:func:`make_ring`, :func:`ring_from_spec`, :func:`marshal_ring`, :func:`unmarshal_ring`.
"""

from torus_core.ring.base import PeerPermutation, Ring, RingMember, RingSpec
from torus_core.ring.codec import (
    make_ring,
    marshal_ring,
    ring_class,
    ring_from_spec,
    spec_from_bytes,
    spec_to_bytes,
    unmarshal_ring,
)

__all__ = [
    "PeerPermutation",
    "Ring",
    "RingMember",
    "RingSpec",
    "make_ring",
    "marshal_ring",
    "ring_class",
    "ring_from_spec",
    "spec_from_bytes",
    "spec_to_bytes",
    "unmarshal_ring",
]
