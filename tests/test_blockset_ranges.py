"""Partial block reads: the crc layer checks every returned byte page by page, over real stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torus_blockstore_file import FileBlockStore
from torus_blockstore_file.store import DATA_FILE
from torus_blockstore_mem.store import MemBlockStore

from torus_core.blockset import create_blockset, default_layer_registry
from torus_core.blockset.crc import PAGE_SIZE
from torus_core.blockstore import BlockStoreConfig
from torus_core.errors import BlockNotExist, CorruptBlock, InvalidArgument
from torus_core.refs import INodeRef

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

BS = 4 * PAGE_SIZE
INODE = INodeRef(3, 7)


def _block(seed: int) -> bytes:
    return bytes((k * 13 + seed) % 251 for k in range(BS))


def _file_store(path: Path) -> FileBlockStore:
    return FileBlockStore.open(BlockStoreConfig(block_size=BS, capacity_bytes=16 * BS, path=str(path)))


def _flip_byte(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("spec", ["crc,base", "base", "rep=2,crc,base"])
@given(start=st.integers(0, BS), length=st.integers(0, BS))
def test_range_reads_equal_slices_of_the_block(spec: str, start: int, length: int) -> None:
    length = min(length, BS - start)
    bset = create_blockset(spec, MemBlockStore(BS, 64), LAYERS)
    bset.truncate(3)
    bset.put_block(INODE, 0, _block(1))
    for _ in range(2):  # first read fills the page table, the second uses it
        assert bset.get_block_range(0, start, length) == _block(1)[start : start + length]
        assert bset.get_block_range(1, start, length) == bytes(length)  # a hole


def test_a_corrupt_page_is_detected_by_range_reads_after_the_table_was_built(tmp_path: Path) -> None:
    store = _file_store(tmp_path)
    bset = create_blockset("crc,base", store, LAYERS)
    bset.truncate(1)
    bset.put_block(INODE, 0, _block(2))
    assert bset.get_block_range(0, 5, 10) == _block(2)[5:15]  # verified full read, table built
    [ref] = bset.get_all_block_refs()
    slot = store._entries[ref].slot  # where the block lives in data.blk
    _flip_byte(tmp_path / DATA_FILE, slot * BS + 2 * PAGE_SIZE + 7)
    # pages 0, 1 and 3 are intact and still readable on their own
    assert bset.get_block_range(0, 0, 2 * PAGE_SIZE) == _block(2)[: 2 * PAGE_SIZE]
    assert bset.get_block_range(0, 3 * PAGE_SIZE, PAGE_SIZE) == _block(2)[3 * PAGE_SIZE :]
    with pytest.raises(CorruptBlock):
        bset.get_block_range(0, 2 * PAGE_SIZE + 100, 1)
    with pytest.raises(CorruptBlock):
        bset.get_block_range(0, PAGE_SIZE, 2 * PAGE_SIZE)
    store.close()


def test_a_rewritten_slot_is_checked_against_its_new_content(tmp_path: Path) -> None:
    store = _file_store(tmp_path)
    bset = create_blockset("crc,base", store, LAYERS)
    bset.truncate(1)
    bset.put_block(INODE, 0, _block(3))
    assert bset.get_block_range(0, 0, 8) == _block(3)[:8]
    bset.put_block(INODE, 0, _block(4))
    assert bset.get_block_range(0, 0, 8) == _block(4)[:8]
    bset.trim(0, 1)
    assert bset.get_block_range(0, 0, 8) == bytes(8)
    store.close()


def test_bad_ranges_raise_invalid_argument() -> None:
    bset = create_blockset("crc,base", MemBlockStore(BS, 4), LAYERS)
    bset.truncate(1)
    for start, length in ((-1, 1), (0, BS + 1), (BS, 1)):
        with pytest.raises(InvalidArgument):
            bset.get_block_range(0, start, length)
    with pytest.raises(BlockNotExist):
        bset.get_block_range(1, 0, 1)


def test_replaced_blocks_of_an_unwritten_inode_are_deleted_only_while_reclaiming() -> None:
    store = MemBlockStore(BS, 64)
    bset = create_blockset("rep=2,crc,base", store, LAYERS)
    bset.truncate(2)
    bset.set_reclaim(INODE)
    for k in range(5):
        bset.put_block(INODE, 0, _block(k))
    assert store.used_blocks() == 2  # primary + one copy of the last version
    bset.put_block(INODE, 1, _block(9))
    bset.trim(1, 2)
    assert store.used_blocks() == 2
    bset.set_reclaim(None)
    bset.put_block(INODE, 0, _block(7))
    assert store.used_blocks() == 4  # the replaced pair may be named by a written INode: kept
    other = INodeRef(3, 8)
    bset.set_reclaim(other)
    bset.put_block(other, 0, _block(8))
    assert store.used_blocks() == 6  # refs of another INode are never reclaimed
    assert bset.get_block(0) == _block(8)


def test_full_block_reads_are_checked_once_by_the_crc_layer_and_still_catch_corruption(
    tmp_path: Path,
) -> None:
    store = _file_store(tmp_path)
    bset = create_blockset("crc,base", store, LAYERS)
    bset.truncate(2)
    bset.put_block(INODE, 0, _block(5))
    assert bset.get_block(0) == _block(5)
    assert bset.get_block(1) == bytes(BS)
    [ref] = bset.get_all_block_refs()
    _flip_byte(tmp_path / DATA_FILE, store._entries[ref].slot * BS + BS - 1)
    with pytest.raises(CorruptBlock):
        bset.get_block(0)
    with pytest.raises(CorruptBlock):
        store.get_block(ref)  # the store's own checksum (recorded from the crc layer's CRC)
    store.close()


class _StaleRangeStore(MemBlockStore):
    """A store whose unverified range reads return a bad copy (like a corrupt local replica)
    while its verified ``get_block`` path finds a good one (like another replica)."""

    def __init__(self, block_size: int, capacity: int) -> None:
        super().__init__(block_size, capacity)
        self.bad_ranges = 0
        self.verified_reads = 0

    def read_block_range(self, ref: object, start: int, length: int) -> bytes:  # type: ignore[override]
        self.bad_ranges += 1
        good = super().get_block(ref)  # type: ignore[arg-type]
        return bytes(b ^ 0x5A for b in good[start : start + length])

    def get_block(self, ref: object) -> bytes:  # type: ignore[override]
        self.verified_reads += 1
        return super().get_block(ref)  # type: ignore[arg-type]


def test_a_crc_mismatch_is_retried_once_through_the_verified_get_block_path() -> None:
    store = _StaleRangeStore(BS, 16)
    bset = create_blockset("crc,base", store, LAYERS)
    bset.truncate(1)
    bset.put_block(INODE, 0, _block(4))
    assert bset.get_block(0) == _block(4)  # bad unverified read, good verified one
    assert (store.bad_ranges, store.verified_reads) == (1, 1)
    assert bset.get_block_range(0, 5, 10) == _block(4)[5:15]  # first range read: full block
    assert bset.get_block_range(0, PAGE_SIZE + 3, 100) == _block(4)[PAGE_SIZE + 3 : PAGE_SIZE + 103]
    assert store.verified_reads == 3  # the page-checked range read was retried too


def test_a_block_bad_on_every_path_still_raises_corrupt_block(tmp_path: Path) -> None:
    store = _file_store(tmp_path)
    bset = create_blockset("crc,base", store, LAYERS)
    bset.truncate(1)
    bset.put_block(INODE, 0, _block(6))
    [ref] = bset.get_all_block_refs()
    bad = bytes(b ^ 1 for b in _block(6))
    store.delete_block(ref)
    store.write_block(ref, bad)  # the store's own check passes, the INode's CRC does not
    with pytest.raises(CorruptBlock):
        bset.get_block(0)
    with pytest.raises(CorruptBlock):
        bset.get_block_range(0, 0, 10)
    store.close()
