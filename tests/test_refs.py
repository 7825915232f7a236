"""BlockRef / INodeRef byte formats (inventory §5.1)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torus_core.errors import InvalidArgument
from torus_core.refs import VOLUME_MAX, ZERO_BLOCKREF, BlockRef, BlockType, INodeRef

vols = st.integers(0, VOLUME_MAX)
u64 = st.integers(0, 2**64 - 1)
types = st.sampled_from(list(BlockType))


@given(vol=vols, inode=u64, index=u64, btype=types)
def test_blockref_round_trips_through_24_little_endian_bytes(
    vol: int, inode: int, index: int, btype: BlockType
) -> None:
    ref = BlockRef(vol, inode, index, btype)
    raw = ref.to_bytes()
    assert len(raw) == 24
    assert raw == struct.pack("<QQQ", (int(btype) << 40) | vol, inode, index)
    assert BlockRef.from_bytes(raw) == ref
    assert BlockRef.from_bytes(memoryview(raw)) == ref


@given(vol=vols, inode=u64, index=u64, btype=types)
def test_block_type_lives_in_the_high_24_bits_of_the_volume_word(
    vol: int, inode: int, index: int, btype: BlockType
) -> None:
    word = struct.unpack_from("<Q", BlockRef(vol, inode, index, btype).to_bytes())[0]
    assert word >> 40 == int(btype)
    assert word & VOLUME_MAX == vol


@given(vol=vols, inode=u64)
def test_inoderef_round_trips_through_16_bytes(vol: int, inode: int) -> None:
    ref = INodeRef(vol, inode)
    raw = ref.to_bytes()
    assert raw == struct.pack("<QQ", vol, inode)
    assert INodeRef.from_bytes(raw) == ref


@pytest.mark.parametrize("bad", [-1, VOLUME_MAX + 1, 2**64])
def test_volume_outside_40_bits_is_invalid(bad: int) -> None:
    with pytest.raises(InvalidArgument):
        BlockRef(bad, 1, 1)
    with pytest.raises(InvalidArgument):
        INodeRef(bad, 1)


def test_volume_max_is_accepted() -> None:
    assert BlockRef(VOLUME_MAX, 0, 0).volume == VOLUME_MAX
    assert INodeRef(VOLUME_MAX, 0).volume == VOLUME_MAX


@given(data=st.binary(max_size=40).filter(lambda b: len(b) != 24))
def test_blockref_from_wrong_length_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        BlockRef.from_bytes(data)


@given(data=st.binary(max_size=40).filter(lambda b: len(b) != 16))
def test_inoderef_from_wrong_length_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        INodeRef.from_bytes(data)


def test_unknown_block_type_bits_are_invalid() -> None:
    raw = struct.pack("<QQQ", (7 << 40) | 5, 1, 1)
    with pytest.raises(InvalidArgument):
        BlockRef.from_bytes(raw)


@given(btype=types)
def test_zero_ref_is_the_hole_marker_regardless_of_type(btype: BlockType) -> None:
    assert BlockRef(0, 0, 0, btype).is_zero()
    assert ZERO_BLOCKREF.to_bytes() == bytes(24)
    assert not BlockRef(0, 0, 1).is_zero()
