"""File-store specifics: geometry changes, locking, options, corruption and crash images."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from torus_blockstore_file import FileBlockStore
from torus_blockstore_file.layout import (
    DURABLE_OFFSET,
    HEADER_SIZE,
    RECORD_SIZE,
    STATIC_COPY_OFFSET,
    record_offset,
)
from torus_blockstore_file.store import DATA_FILE, INDEX_FILE

from torus_core.blockstore import BlockStoreConfig
from torus_core.errors import (
    BlockNotExist,
    BlockStoreLocked,
    CorruptBlock,
    InvalidArgument,
    OutOfSpace,
)
from torus_core.refs import BlockRef

BS = 512


def _open(path: Path, capacity: int = 8, block_size: int = BS, **options: Any) -> FileBlockStore:
    return FileBlockStore.open(
        BlockStoreConfig(
            block_size=block_size, capacity_bytes=capacity * block_size, path=str(path), options=options
        )
    )


def _ref(i: int) -> BlockRef:
    return BlockRef(2, 3, i)


def _data(i: int) -> bytes:
    return bytes((i * 31 + k) % 251 for k in range(BS))


def _slot_of(store: FileBlockStore, ref: BlockRef) -> int:
    return store._entries[ref].slot  # structural check of the allocator


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _snapshot(src: Path, dst: Path) -> Path:
    """Copy the store files as they are now: exactly what a SIGKILL would leave behind."""
    dst.mkdir()
    for name in (DATA_FILE, INDEX_FILE):
        shutil.copyfile(src / name, dst / name)
    return dst


# --- geometry --------------------------------------------------------------------------------


def test_new_store_creates_sparse_files_of_the_configured_size(tmp_path: Path) -> None:
    with _open(tmp_path / "s", capacity=1000):
        pass
    data = os.stat(tmp_path / "s" / DATA_FILE)
    assert data.st_size == 1000 * BS
    assert data.st_blocks * 512 < 1000 * BS  # sparse
    assert os.stat(tmp_path / "s" / INDEX_FILE).st_size == HEADER_SIZE + 1000 * RECORD_SIZE


def test_reopen_with_larger_capacity_grows_and_keeps_blocks(tmp_path: Path) -> None:
    with _open(tmp_path, capacity=2) as s:
        s.write_block(_ref(0), _data(0))
        s.write_block(_ref(1), _data(1))
        with pytest.raises(OutOfSpace):
            s.write_block(_ref(2), _data(2))
    with _open(tmp_path, capacity=4) as s:
        assert s.num_blocks() == 4
        assert s.get_block(_ref(0)) == _data(0)
        s.write_block(_ref(2), _data(2))
        s.write_block(_ref(3), _data(3))
    assert os.stat(tmp_path / DATA_FILE).st_size == 4 * BS
    with _open(tmp_path, capacity=4) as s:
        assert sorted(s.iter_refs()) == [_ref(i) for i in range(4)]


def test_reopen_with_smaller_capacity_compacts_blocks_into_low_slots(tmp_path: Path) -> None:
    with _open(tmp_path, capacity=8) as s:
        for i in range(8):
            s.write_block(_ref(i), _data(i))
        for i in range(5):
            s.delete_block(_ref(i))  # survivors sit in slots 5..7
    with _open(tmp_path, capacity=3) as s:
        assert s.num_blocks() == 3
        assert all(_slot_of(s, _ref(i)) < 3 for i in range(5, 8))
        for i in range(5, 8):
            assert s.get_block(_ref(i)) == _data(i)
    assert os.stat(tmp_path / DATA_FILE).st_size == 3 * BS
    assert os.stat(tmp_path / INDEX_FILE).st_size == record_offset(3)
    with _open(tmp_path, capacity=3) as s:
        for i in range(5, 8):
            assert s.get_block(_ref(i)) == _data(i)


def test_shrinking_below_used_raises_and_leaves_the_store_intact(tmp_path: Path) -> None:
    with _open(tmp_path, capacity=4) as s:
        for i in range(3):
            s.write_block(_ref(i), _data(i))
    with pytest.raises(InvalidArgument, match="shrink"):
        _open(tmp_path, capacity=2)
    with _open(tmp_path, capacity=4) as s:
        for i in range(3):
            assert s.get_block(_ref(i)) == _data(i)


def test_reopen_with_a_different_block_size_is_rejected(tmp_path: Path) -> None:
    with _open(tmp_path):
        pass
    with pytest.raises(InvalidArgument, match="block size"):
        _open(tmp_path, block_size=BS * 2)


# --- configuration ---------------------------------------------------------------------------


def test_missing_path_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        FileBlockStore.open(BlockStoreConfig(block_size=BS, capacity_bytes=BS))


@pytest.mark.parametrize("options", [{"fsycn": True}, {"fsync": "yes"}])
def test_bad_options_are_rejected(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        _open(tmp_path, **options)


def test_a_garbage_index_file_is_rejected_not_overwritten(tmp_path: Path) -> None:
    garbage = os.urandom(HEADER_SIZE + 10 * RECORD_SIZE)
    (tmp_path / INDEX_FILE).write_bytes(garbage)
    with pytest.raises(InvalidArgument):
        _open(tmp_path)
    assert (tmp_path / INDEX_FILE).read_bytes() == garbage


# --- locking ---------------------------------------------------------------------------------


def test_second_open_in_the_same_process_is_refused_until_close(tmp_path: Path) -> None:
    first = _open(tmp_path)
    with pytest.raises(BlockStoreLocked):
        _open(tmp_path)
    first.close()
    _open(tmp_path).close()


def test_open_from_another_process_is_refused(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from torus_blockstore_file import FileBlockStore\n"
        "from torus_core.blockstore import BlockStoreConfig\n"
        "from torus_core.errors import BlockStoreLocked\n"
        f"cfg = BlockStoreConfig(block_size={BS}, capacity_bytes={8 * BS}, path={str(tmp_path)!r})\n"
        "try:\n"
        "    FileBlockStore.open(cfg)\n"
        "except BlockStoreLocked:\n"
        "    sys.exit(7)\n"
    )
    with _open(tmp_path):
        proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 7


# --- corruption ------------------------------------------------------------------------------


def test_flipped_data_bytes_raise_corrupt_block_even_after_reopen(tmp_path: Path) -> None:
    with _open(tmp_path) as s:
        s.write_block(_ref(0), _data(0))
        s.write_block(_ref(1), _data(1))
        slot = _slot_of(s, _ref(1))
        s.flush()
        _flip(tmp_path / DATA_FILE, slot * BS + 100)
        with pytest.raises(CorruptBlock):
            s.get_block(_ref(1))
        assert s.get_block(_ref(0)) == _data(0)
    with _open(tmp_path) as s:
        assert s.has_block(_ref(1))
        with pytest.raises(CorruptBlock):
            s.get_block(_ref(1))


def test_rewriting_a_corrupt_block_with_its_true_content_repairs_it(tmp_path: Path) -> None:
    with _open(tmp_path) as s:
        s.write_block(_ref(1), _data(1))
        s.flush()
        _flip(tmp_path / DATA_FILE, _slot_of(s, _ref(1)) * BS + 7)
        s.write_block(_ref(1), _data(1))
        assert s.get_block(_ref(1)) == _data(1)


def test_flipped_index_bytes_never_make_the_store_return_wrong_data(tmp_path: Path) -> None:
    rng = random.Random(7)
    base = tmp_path / "base"
    with _open(base, capacity=16) as s:
        for i in range(12):
            s.write_block(_ref(i), _data(i))
    expected = {_ref(i): _data(i) for i in range(12)}
    for trial in range(40):
        img = tmp_path / f"img{trial}"
        shutil.copytree(base, img)
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.3:
                offset = rng.choice([0, 8, 20, DURABLE_OFFSET, DURABLE_OFFSET + 3])  # header
            else:
                offset = record_offset(rng.randrange(12)) + rng.randrange(RECORD_SIZE)
            _flip(img / INDEX_FILE, offset)
        with _open(img, capacity=16) as s:
            for ref in s.iter_refs():
                assert ref in expected
                try:
                    assert s.get_block(ref) == expected[ref]
                except CorruptBlock:
                    pass
            for ref in expected:
                if not s.has_block(ref):
                    with pytest.raises(BlockNotExist):
                        s.get_block(ref)
            s.write_block(_ref(100), b"still writable")
            assert s.get_block(_ref(100))[:14] == b"still writable"


def test_a_damaged_primary_header_falls_back_to_its_copy(tmp_path: Path) -> None:
    with _open(tmp_path) as s:
        s.write_block(_ref(1), _data(1))
    _flip(tmp_path / INDEX_FILE, 12)
    with _open(tmp_path) as s:
        assert s.get_block(_ref(1)) == _data(1)
    _flip(tmp_path / INDEX_FILE, STATIC_COPY_OFFSET + 12)
    with _open(tmp_path) as s:  # the primary was rewritten from the copy at the last open
        assert s.get_block(_ref(1)) == _data(1)
    _flip(tmp_path / INDEX_FILE, 12)
    with pytest.raises(InvalidArgument, match="corrupt"):  # both copies damaged: typed error
        _open(tmp_path)


# --- crash images (what a power loss could leave on disk) ------------------------------------


def test_unflushed_record_whose_data_never_reached_disk_is_dropped(tmp_path: Path) -> None:
    live = tmp_path / "live"
    s = _open(live, capacity=4)
    try:
        s.write_block(_ref(0), _data(0))
        s.flush()
        s.write_block(_ref(1), _data(1))  # not flushed
        slot = _slot_of(s, _ref(1))
        img = _snapshot(live, tmp_path / "img")
    finally:
        s.close()
    with open(img / DATA_FILE, "r+b") as f:  # the data write was lost, the record was not
        f.seek(slot * BS)
        f.write(bytes(BS))
    with _open(img, capacity=4) as r:
        assert r.get_block(_ref(0)) == _data(0)
        assert not r.has_block(_ref(1))
        for i in range(2, 5):
            r.write_block(_ref(i), _data(i))  # the dropped slot is reusable
        assert r.used_blocks() == 4


def test_unflushed_intact_block_survives_a_crash(tmp_path: Path) -> None:
    live = tmp_path / "live"
    s = _open(live)
    try:
        s.write_block(_ref(1), _data(1))
        img = _snapshot(live, tmp_path / "img")
    finally:
        s.close()
    with _open(img) as r:
        assert r.get_block(_ref(1)) == _data(1)


def test_deleted_slot_is_not_reused_before_the_delete_is_durable(tmp_path: Path) -> None:
    live = tmp_path / "live"
    s = _open(live, capacity=2)
    try:
        s.write_block(_ref(0), _data(0))
        old_slot = _slot_of(s, _ref(0))
        s.flush()
        with open(live / INDEX_FILE, "rb") as f:
            f.seek(record_offset(old_slot))
            old_record = f.read(RECORD_SIZE)
        s.delete_block(_ref(0))
        s.write_block(_ref(1), _data(1))
        assert _slot_of(s, _ref(1)) != old_slot
        img = _snapshot(live, tmp_path / "img")
    finally:
        s.close()
    with open(img / INDEX_FILE, "r+b") as f:  # the un-fsynced zeroing of the record was lost
        f.seek(record_offset(old_slot))
        f.write(old_record)
    with _open(img, capacity=2) as r:
        assert r.get_block(_ref(0)) == _data(0)  # the old block is back intact, not overwritten
        assert r.get_block(_ref(1)) == _data(1)


def test_full_store_reuses_a_deleted_slot_and_the_old_block_never_returns(tmp_path: Path) -> None:
    with _open(tmp_path, capacity=1) as s:
        s.write_block(_ref(0), _data(0))
        s.flush()
        s.delete_block(_ref(0))
        s.write_block(_ref(1), _data(1))
        img = _snapshot(tmp_path, tmp_path / "img")
    with _open(img, capacity=1) as r:
        assert not r.has_block(_ref(0))
        assert r.get_block(_ref(1)) == _data(1)


def test_duplicate_records_for_one_ref_resolve_to_the_newest(tmp_path: Path) -> None:
    live = tmp_path / "live"
    s = _open(live, capacity=3)
    try:
        s.write_block(_ref(0), b"old content")
        old_slot = _slot_of(s, _ref(0))
        s.flush()
        with open(live / INDEX_FILE, "rb") as f:
            f.seek(record_offset(old_slot))
            old_record = f.read(RECORD_SIZE)
        s.delete_block(_ref(0))
        s.write_block(_ref(0), b"new content")
        img = _snapshot(live, tmp_path / "img")
    finally:
        s.close()
    with open(img / INDEX_FILE, "r+b") as f:
        f.seek(record_offset(old_slot))
        f.write(old_record)
    with _open(img, capacity=3) as r:
        assert r.get_block(_ref(0))[:11] == b"new content"
        assert r.used_blocks() == 1
    with _open(img, capacity=3) as r:
        assert r.used_blocks() == 1


# --- allocation ------------------------------------------------------------------------------


def test_free_space_of_a_huge_store_is_a_few_runs_not_a_per_slot_list(tmp_path: Path) -> None:
    capacity = 1 << 20
    with _open(tmp_path, capacity=capacity, fsync=False) as s:
        for i in range(100):
            s.write_block(_ref(i), b"x")
        for i in range(0, 100, 2):
            s.delete_block(_ref(i))
        s.flush()
        stats = s._free.get_statistics()
        assert stats["cardinality"] == capacity - 50
        assert stats["n_bytes_run_containers"] + stats["n_bytes_array_containers"] < 4096
        s.write_block(_ref(1000), b"y")
        assert _slot_of(s, _ref(1000)) == 0  # lowest free slot, found without a scan


def test_read_block_range_returns_exactly_the_requested_bytes(tmp_path: Path) -> None:
    store = _open(tmp_path)
    store.write_block(_ref(1), _data(1))
    assert store.read_block_range(_ref(1), 0, BS) == _data(1)
    assert store.read_block_range(_ref(1), 100, 37) == _data(1)[100:137]
    assert store.read_block_range(_ref(1), BS, 0) == b""
    with pytest.raises(BlockNotExist):
        store.read_block_range(_ref(2), 0, 10)
    for start, length in ((-1, 4), (0, BS + 1), (BS - 2, 3), (0, -1)):
        with pytest.raises(InvalidArgument):
            store.read_block_range(_ref(1), start, length)
    store.close()


def test_read_block_range_does_not_check_and_leaves_that_to_the_caller(tmp_path: Path) -> None:
    store = _open(tmp_path)
    store.write_block(_ref(1), _data(1))
    store.flush()
    offset = _slot_of(store, _ref(1)) * BS + 10
    _flip(tmp_path / DATA_FILE, offset)
    assert store.read_block_range(_ref(1), 10, 1) != _data(1)[10:11]  # raw bytes, as documented
    with pytest.raises(CorruptBlock):
        store.get_block(_ref(1))  # the full read still verifies
    store.close()


def test_a_caller_supplied_crc_is_recorded_and_a_wrong_one_fails_reads(tmp_path: Path) -> None:
    import zlib

    store = _open(tmp_path)
    store.write_block_crc32(_ref(1), _data(1), zlib.crc32(_data(1)))
    assert store.get_block(_ref(1)) == _data(1)
    store.write_block_crc32(_ref(2), _data(2), zlib.crc32(_data(2)) ^ 1)
    with pytest.raises(CorruptBlock):
        store.get_block(_ref(2))
    store.close()
