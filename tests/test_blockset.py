"""Blockset layers: put/get, holes, content formats, marshal round trips, CRC and rep recovery."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torus_blockstore_mem.store import MemBlockStore

from torus_core.blockset import (
    create_blockset,
    default_layer_registry,
    format_spec,
    parse_spec,
    unmarshal_blockset,
)
from torus_core.blockset.base import BaseLayer
from torus_core.blockset.rep import RepLayer
from torus_core.errors import BlockNotExist, BlockUnavailable, CorruptBlock, InvalidArgument
from torus_core.plugins import make_plugin_manager
from torus_core.refs import BlockRef, INodeRef

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

BS = 64
INODE = INodeRef(3, 17)
SPECS = ["base", "crc,base", "rep,base", "rep=3,crc,base", "r=2,crc"]


def store() -> MemBlockStore:
    return MemBlockStore(BS, 10_000)


def block(seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(BS))


@pytest.mark.parametrize("spec", SPECS)
def test_put_then_get_returns_the_data_and_holes_read_as_zeros(spec: str) -> None:
    bs = create_blockset(spec, store(), LAYERS)
    bs.truncate(3)
    assert bs.get_block(1) == bytes(BS)
    assert bs.is_hole(1)
    bs.put_block(INODE, 1, block(1))
    bs.put_block(INODE, 3, block(3))  # i == length appends
    assert bs.length == 4
    assert bs.get_block(1) == block(1) and bs.get_block(3) == block(3)
    assert not bs.is_hole(1) and bs.is_hole(0)
    bs.put_block(INODE, 1, block(9))  # overwrite goes to a new ref
    assert bs.get_block(1) == block(9)
    with pytest.raises(BlockNotExist):
        bs.put_block(INODE, 9, block(0))
    with pytest.raises(BlockNotExist):
        bs.get_block(4)
    with pytest.raises(InvalidArgument):
        bs.get_block(-1)


def test_short_data_is_zero_padded_and_long_data_rejected() -> None:
    bs = create_blockset("crc,base", store(), LAYERS)
    bs.put_block(INODE, 0, b"abc")
    assert bs.get_block(0) == b"abc" + bytes(BS - 3)
    with pytest.raises(InvalidArgument):
        bs.put_block(INODE, 0, bytes(BS + 1))


def test_base_mints_sequential_refs_for_the_writing_inode() -> None:
    st_ = store()
    bs = create_blockset("base", st_, LAYERS)
    for i in range(3):
        bs.put_block(INODE, i, block(i))
    assert bs.get_all_block_refs() == [BlockRef(3, 17, 1), BlockRef(3, 17, 2), BlockRef(3, 17, 3)]
    assert bs.content() == b"".join(BlockRef(3, 17, n).to_bytes() for n in (1, 2, 3))
    assert sorted(st_.iter_refs()) == sorted(bs.get_all_block_refs())


def test_crc_content_is_le_u32_per_block_with_zero_block_crc_for_holes() -> None:
    bs = create_blockset("crc,base", store(), LAYERS)
    bs.truncate(2)
    bs.put_block(INODE, 1, block(5))
    (crc_kind, crc_content), (base_kind, base_content) = bs.marshal()
    assert (crc_kind, base_kind) == (1, 0)
    assert crc_content == struct.pack("<II", zlib.crc32(bytes(BS)), zlib.crc32(block(5)))
    assert base_content == bytes(24) + BlockRef(3, 17, 1).to_bytes()


def test_rep_content_format_keeps_every_copy_list_in_step() -> None:
    bs = create_blockset("rep=3,base", store(), LAYERS)
    bs.put_block(INODE, 0, block(0))
    bs.truncate(3)  # the original padded only the first copy list for rep > 2
    rep_content = bs.marshal()[0][1]
    (rep,) = struct.unpack_from("<i", rep_content)
    assert rep == 3
    pos = 4
    for _ in range(2):
        (count,) = struct.unpack_from("<i", rep_content, pos)
        assert count == 3
        pos += 4 + count * 24
    assert pos == len(rep_content)
    again = unmarshal_blockset(bs.marshal(), bs.store, LAYERS)
    assert again.marshal() == bs.marshal()
    assert isinstance(again, RepLayer) and again.rep == 3


def test_crc_mismatch_raises_corrupt_block() -> None:
    st_ = store()
    bs = create_blockset("crc,base", st_, LAYERS)
    bs.put_block(INODE, 0, block(1))
    ref = bs.get_all_block_refs()[0]
    st_.delete_block(ref)
    st_.write_block(ref, block(2))  # silently different bytes under the same ref
    with pytest.raises(CorruptBlock):
        bs.get_block(0)
    assert issubclass(CorruptBlock, BlockUnavailable)


def test_rep_reads_a_copy_when_the_primary_block_is_missing() -> None:
    st_ = store()
    bs = create_blockset("rep=2,crc,base", st_, LAYERS)
    bs.put_block(INODE, 0, block(7))
    primary = bs.layers()[-1]
    assert isinstance(primary, BaseLayer)
    st_.delete_block(primary.ref_at(0))
    assert bs.get_block(0) == block(7)


def test_rep_skips_a_corrupt_copy_and_uses_a_verified_one() -> None:
    st_ = store()
    bs = create_blockset("rep=3,crc,base", st_, LAYERS)
    bs.put_block(INODE, 0, block(7))
    assert isinstance(bs, RepLayer)
    base = bs.layers()[-1]
    assert isinstance(base, BaseLayer)
    primary, copy1 = base.ref_at(0), bs.copy_refs(0)[0]
    for ref in (primary, copy1):
        st_.delete_block(ref)
        st_.write_block(ref, block(8))  # corrupt primary and first copy
    assert bs.get_block(0) == block(7)
    for ref in bs.copy_refs(0)[1:]:
        st_.delete_block(ref)
    with pytest.raises(BlockUnavailable):
        bs.get_block(0)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 6), st.integers(0, 250)),
        st.tuples(st.just("truncate"), st.integers(0, 6), st.just(0)),
        st.tuples(st.just("trim"), st.integers(0, 6), st.integers(0, 6)),
    ),
    max_size=20,
)


@given(spec=st.sampled_from(SPECS), ops=ops)
def test_marshal_unmarshal_round_trip_preserves_contents(spec: str, ops: list[tuple[str, int, int]]) -> None:
    st_ = store()
    bs = create_blockset(spec, st_, LAYERS)
    model: list[bytes] = []
    for op, a, b in ops:
        if op == "put" and a <= len(model):
            bs.put_block(INODE, a, block(b))
            if a == len(model):
                model.append(block(b))
            else:
                model[a] = block(b)
        elif op == "truncate":
            bs.truncate(a)
            model = (model + [bytes(BS)] * a)[:a]
        elif op == "trim":
            bs.trim(a, b)
            for i in range(a, min(b, len(model))):
                model[i] = bytes(BS)
    again = unmarshal_blockset(bs.marshal(), st_, LAYERS)
    assert again.marshal() == bs.marshal()
    assert again.describe() == bs.describe()
    assert [again.get_block(i) for i in range(again.length)] == model
    assert [again.is_hole(i) for i in range(again.length)] == [bs.is_hole(i) for i in range(bs.length)]


def test_live_inodes_are_the_inodes_of_non_hole_refs() -> None:
    bs = create_blockset("rep=2,crc,base", store(), LAYERS)
    bs.put_block(INodeRef(3, 5), 0, block(0))
    bs.put_block(INodeRef(3, 9), 1, block(1))
    bs.put_block(INodeRef(3, 11), 2, block(1))
    bs.trim(2, 3)
    assert list(bs.get_live_inodes()) == [5, 9]
    assert len(bs.get_all_block_refs()) == 4  # 2 primaries + 2 copies


def test_spec_parsing_appends_base_and_resolves_aliases() -> None:
    assert format_spec(parse_spec("crc", LAYERS)) == "crc,base"
    assert format_spec(parse_spec("r=3,crc,base", LAYERS)) == "rep=3,crc,base"
    assert format_spec(parse_spec("", LAYERS)) == "base"
    with pytest.raises(InvalidArgument, match="known layers: base, crc, rep"):
        parse_spec("crc,zstd,base", LAYERS)
    with pytest.raises(InvalidArgument):
        parse_spec("base,crc,base", LAYERS)
    with pytest.raises(InvalidArgument):
        create_blockset("rep=zero,base", store(), LAYERS)
    with pytest.raises(InvalidArgument):
        create_blockset("rep=0,base", store(), LAYERS)


@given(kind=st.sampled_from([0, 1, 2]), content=st.binary(max_size=80))
def test_garbage_layer_content_is_rejected_with_invalid_argument(kind: int, content: bytes) -> None:
    layers = [(kind, content)] if kind == 0 else [(kind, content), (0, bytes(24))]
    try:
        bs = unmarshal_blockset(layers, store(), LAYERS)
    except InvalidArgument:
        return
    assert bs.marshal()[0][0] == kind


def test_stored_layers_must_end_in_exactly_one_base() -> None:
    with pytest.raises(InvalidArgument):
        unmarshal_blockset([(1, b"")], store(), LAYERS)
    with pytest.raises(InvalidArgument):
        unmarshal_blockset([(0, b""), (0, b"")], store(), LAYERS)
    with pytest.raises(InvalidArgument):
        unmarshal_blockset([(9, b""), (0, b"")], store(), LAYERS)
    with pytest.raises(InvalidArgument):
        unmarshal_blockset([], store(), LAYERS)


def test_layers_register_through_the_plugin_hook() -> None:
    regs = make_plugin_manager(autoload=False).collect_registries()
    kinds = {n: regs.blockset_layers.get(n).kind for n in regs.blockset_layers.names()}
    assert kinds == {"base": 0, "crc": 1, "rep": 2}
    bs = create_blockset("r,crc", store(), regs.blockset_layers)
    assert bs.describe() == "rep,crc,base"
