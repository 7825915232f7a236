"""Ring placement: permutations, replication, versions, known answers and ketama movement."""

from __future__ import annotations

import hashlib
import math
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torus_core.errors import AlreadyExists, InvalidArgument, NotExist, NotSupported
from torus_core.plugins import make_plugin_manager
from torus_core.refs import BlockRef
from torus_core.ring import (
    RingMember,
    RingSpec,
    make_ring,
    marshal_ring,
    ring_from_spec,
    spec_from_bytes,
    unmarshal_ring,
)
from torus_core.ring.builtin import builtin_ring_types
from torus_core.ring.ketama import KetamaRing
from torus_core.ring.mod import ModRing
from torus_core.ring.union import UnionRing

RING_TYPES = builtin_ring_types()

uuids = st.lists(
    st.text(alphabet="0123456789abcdef-", min_size=1, max_size=12), min_size=1, max_size=8, unique=True
)
refs = st.builds(
    BlockRef,
    st.integers(0, 2**40 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)


def members_of(names: list[str], sizes: list[int] | None = None) -> list[RingMember]:
    return [RingMember(u, (sizes[i] if sizes else 1000)) for i, u in enumerate(names)]


# --- an independent, straightforward re-implementation of the Go algorithms -------------------


def reference_ketama(members: list[RingMember], rep: int, ref: BlockRef) -> tuple[list[str], int]:
    """Follows serialx/hashring + torus ketama.go literally (points list with duplicates, linear scan)."""
    g = 0
    for m in members:
        g = math.gcd(g, m.total_blocks)
    weights = {m.uuid: (m.total_blocks // g if g else 1) for m in members}
    total = sum(weights.values())
    ring: dict[int, str] = {}
    keys: list[int] = []
    for m in members:
        factor = math.floor(float(40 * len(members) * weights[m.uuid]) / float(total))
        for j in range(factor):
            d = hashlib.md5(f"{m.uuid}-{j}".encode()).digest()
            for i in range(3):
                k = d[i * 4] | d[i * 4 + 1] << 8 | d[i * 4 + 2] << 16 | d[i * 4 + 3] << 24
                ring[k] = m.uuid
                keys.append(k)
    keys.sort()
    d = hashlib.md5(ref.to_bytes()).digest()
    h = d[0] | d[1] << 8 | d[2] << 16 | d[3] << 24
    pos = 0
    for i, k in enumerate(keys):
        if k > h:
            pos = i
            break
    out: list[str] = []
    for i in range(pos, pos + len(keys)):
        node = ring[keys[i % len(keys)]]
        if node not in out:
            out.append(node)
        if len(out) == len(members):
            break
    for m in members:
        if m.uuid not in out:
            out.append(m.uuid)
    return out, min(max(rep, 1), len(members))


def reference_mod(names: list[str], rep: int, ref: BlockRef) -> tuple[list[str], int]:
    crc = zlib.crc32(ref.to_bytes())
    start = crc % len(names)
    return names[start:] + names[:start], min(max(rep, 1), len(names))


# --- properties --------------------------------------------------------------------------------


@given(names=uuids, rep=st.integers(0, 10), ref=refs, kind=st.sampled_from(["mod", "ketama"]))
def test_every_permutation_is_a_permutation_of_all_members_with_clamped_replication(
    names: list[str], rep: int, ref: BlockRef, kind: str
) -> None:
    ring = make_ring(kind, members_of(names), replication=rep, registry=RING_TYPES)
    perm = ring.get_peers(ref)
    assert sorted(perm.peers) == sorted(names)
    assert len(set(perm.owners)) == len(perm.owners)
    assert perm.replication == min(max(rep, 1), len(names))
    assert ring.members() == names


@given(
    names=uuids,
    sizes=st.lists(st.integers(0, 10**6), min_size=8, max_size=8),
    rep=st.integers(0, 4),
    ref=refs,
)
def test_ketama_matches_straightforward_reimplementation(
    names: list[str], sizes: list[int], rep: int, ref: BlockRef
) -> None:
    members = members_of(names, sizes)
    perm = make_ring("ketama", members, replication=rep, registry=RING_TYPES).get_peers(ref)
    assert (perm.peers, perm.replication) == reference_ketama(members, rep, ref)


@given(names=uuids, rep=st.integers(0, 4), ref=refs)
def test_mod_matches_crc32_rotation_in_ring_order(names: list[str], rep: int, ref: BlockRef) -> None:
    perm = make_ring("mod", members_of(names), replication=rep, registry=RING_TYPES).get_peers(ref)
    assert (perm.peers, perm.replication) == reference_mod(names, rep, ref)


def test_mod_known_answer_follows_unsorted_ring_order() -> None:
    ref = BlockRef(1, 2, 3)
    raw = struct.pack("<QQQ", 1, 2, 3)
    assert ref.to_bytes() == raw
    start = zlib.crc32(raw) % 3
    names = ["c", "a", "b"]  # deliberately unsorted: the original never sorts
    perm = make_ring("mod", members_of(names), replication=2, registry=RING_TYPES).get_peers(ref)
    assert perm.peers == (names * 2)[start : start + 3]
    assert perm.owners == perm.peers[:2]


def test_ketama_known_answer_by_hand_for_one_member_pair() -> None:
    # with two equal members every node gets factor floor(40*2*1/2) = 40 digests
    members = members_of(["peer-a", "peer-b"])
    ring = KetamaRing(members, replication=1)
    assert ring.num_points() <= 2 * 40 * 3
    ref = BlockRef(5, 7, 9)
    h = struct.unpack("<I", hashlib.md5(ref.to_bytes()).digest()[:4])[0]
    points = []
    for u in ("peer-a", "peer-b"):
        for j in range(40):
            d = hashlib.md5(f"{u}-{j}".encode()).digest()
            points += [(struct.unpack("<I", d[i : i + 4])[0], u) for i in (0, 4, 8)]
    points.sort()
    first = next((p for p in points if p[0] > h), points[0])
    perm = ring.get_peers(ref)
    assert perm.peers[0] == first[1]
    assert perm.replication == 1


@given(names=st.lists(st.uuids().map(str), min_size=2, max_size=6, unique=True))
def test_ketama_adding_a_peer_moves_blocks_only_to_the_new_peer(names: list[str]) -> None:
    ring = make_ring("ketama", members_of(names), replication=1, registry=RING_TYPES)
    bigger = ring.add_peers([RingMember("newcomer", 1000)])
    moved = 0
    total = 2000
    for i in range(total):
        ref = BlockRef(1, 1, i)
        before = ring.get_peers(ref).peers
        after = bigger.get_peers(ref).peers
        if before[0] != after[0]:
            assert after[0] == "newcomer"
            moved += 1
        # relative order of the old peers is unchanged: only the newcomer is inserted
        assert [p for p in after if p != "newcomer"] == before
    expected = total / (len(names) + 1)
    assert 0.4 * expected < moved < 1.8 * expected


def test_ketama_tiny_peer_without_points_is_appended_in_ring_order() -> None:
    # regression for original issue #246: huge weights leave the tiny node with factor 0
    members = [RingMember("big-1", 10**9), RingMember("tiny", 1), RingMember("big-2", 10**9)]
    ring = KetamaRing(members, replication=3)
    for i in range(50):
        perm = ring.get_peers(BlockRef(3, 4, i))
        assert perm.peers[-1] == "tiny"
        assert sorted(perm.peers) == ["big-1", "big-2", "tiny"]
        assert perm.replication == 3


def test_replication_above_member_count_is_clamped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        ring = make_ring("ketama", members_of(["a", "b"]), replication=5, registry=RING_TYPES)
    assert ring.get_peers(BlockRef(1, 1, 1)).replication == 2
    assert "exceeds" in caplog.text
    assert ring.to_spec().replication == 5  # configured value is kept for later growth
    grown = ring.add_peers([RingMember("c"), RingMember("d"), RingMember("e"), RingMember("f")])
    assert grown.get_peers(BlockRef(1, 1, 1)).replication == 5


@pytest.mark.parametrize("kind", ["mod", "ketama"])
def test_every_modification_returns_a_new_ring_with_version_plus_one(kind: str) -> None:
    ring = make_ring(kind, members_of(["a", "b"]), replication=2, version=7, registry=RING_TYPES)
    added = ring.add_peers([RingMember("c")])
    removed = added.remove_peers(["a"])
    changed = removed.change_replication(1)
    assert [r.version for r in (ring, added, removed, changed)] == [7, 8, 9, 10]
    assert ring.members() == ["a", "b"]
    assert added.members() == ["a", "b", "c"]
    assert removed.members() == ["b", "c"]
    assert changed.get_peers(BlockRef(1, 1, 1)).replication == 1
    with pytest.raises(AlreadyExists):
        ring.add_peers([RingMember("a")])
    with pytest.raises(NotExist):
        ring.remove_peers(["zzz"])
    with pytest.raises(InvalidArgument):
        ring.change_replication(-1)


def test_single_ring_needs_exactly_one_peer() -> None:
    with pytest.raises(InvalidArgument):
        make_ring("single", [], registry=RING_TYPES)
    with pytest.raises(InvalidArgument):
        make_ring("single", members_of(["a", "b"]), registry=RING_TYPES)
    ring = make_ring("single", members_of(["a"]), registry=RING_TYPES)
    assert ring.get_peers(BlockRef(1, 2, 3)).peers == ["a"]
    assert ring.get_peers(BlockRef(1, 2, 3)).replication == 1
    with pytest.raises(NotSupported):
        ring.add_peers([RingMember("b")])


def test_empty_ring_gives_empty_permutations() -> None:
    ring = make_ring("empty", registry=RING_TYPES)
    perm = ring.get_peers(BlockRef(1, 2, 3))
    assert perm.peers == [] and perm.replication == 0
    with pytest.raises(InvalidArgument):
        make_ring("empty", members_of(["a"]), registry=RING_TYPES)


def test_rings_without_members_give_empty_permutations() -> None:
    for kind in ("mod", "ketama"):
        perm = make_ring(kind, [], registry=RING_TYPES).get_peers(BlockRef(1, 2, 3))
        assert perm.peers == [] and perm.replication == 0


def test_union_ring_lists_old_peers_then_new_extras_with_new_replication_and_version() -> None:
    old = make_ring("mod", members_of(["a", "b"]), replication=1, version=3, registry=RING_TYPES)
    new = make_ring("ketama", members_of(["b", "c", "d"]), replication=3, version=4, registry=RING_TYPES)
    union = UnionRing(old, new)
    ref = BlockRef(9, 9, 9)
    perm = union.get_peers(ref)
    assert perm.peers[:2] == old.get_peers(ref).peers
    assert perm.peers[2:] == [p for p in new.get_peers(ref).peers if p not in ("a", "b")]
    assert perm.replication == 3
    assert union.version == 4
    again = unmarshal_ring(marshal_ring(union), RING_TYPES)
    assert isinstance(again, UnionRing)
    assert again.get_peers(ref) == perm


def test_unknown_ring_type_is_invalid_argument_listing_known_types() -> None:
    with pytest.raises(InvalidArgument, match="ketama"):
        make_ring("rendezvous", [], registry=RING_TYPES)


@given(
    names=uuids,
    rep=st.integers(0, 9),
    version=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["mod", "ketama"]),
    sizes=st.lists(st.integers(0, 2**40), min_size=8, max_size=8),
)
def test_spec_and_bytes_round_trip(
    names: list[str], rep: int, version: int, kind: str, sizes: list[int]
) -> None:
    members = [RingMember(u, sizes[i], f"127.0.0.1:{4000 + i}") for i, u in enumerate(names)]
    ring = make_ring(kind, members, replication=rep, version=version, registry=RING_TYPES)
    spec = ring.to_spec()
    assert ring_from_spec(RING_TYPES, spec).to_spec() == spec
    data = marshal_ring(ring)
    assert spec_from_bytes(data, RING_TYPES) == spec
    again = unmarshal_ring(data, RING_TYPES)
    assert type(again) is type(ring)
    assert again.get_peers(BlockRef(1, 2, 3)) == ring.get_peers(BlockRef(1, 2, 3))


def test_marshal_matches_hand_encoded_models_ring_proto() -> None:
    ring = ModRing([RingMember("ab", 300)], replication=2, version=5)
    peer = b"\x0a\x02ab" + b"\x20\xac\x02"  # uuid="ab", total_blocks=300
    expected = b"\x08\x02" + b"\x10\x05" + b"\x18\x02" + b"\x22" + bytes([len(peer)]) + peer
    assert marshal_ring(ring) == expected


@given(data=st.binary(max_size=64))
def test_garbage_ring_bytes_raise_invalid_argument_or_decode(data: bytes) -> None:
    try:
        unmarshal_ring(data, RING_TYPES)
    except InvalidArgument:
        pass


def test_ring_types_register_through_the_plugin_hook() -> None:
    regs = make_plugin_manager(autoload=False).collect_registries()
    assert {"empty", "single", "mod", "union", "ketama"} <= set(regs.ring_types.names())
    ids = {n: regs.ring_types.get(n).type_id for n in ("empty", "single", "mod", "union", "ketama")}
    assert ids == {"empty": 0, "single": 1, "mod": 2, "union": 3, "ketama": 4}
    ring = ring_from_spec(regs.ring_types, RingSpec("ketama", 1, 2, tuple(members_of(["x", "y"]))))
    assert isinstance(ring, KetamaRing)
