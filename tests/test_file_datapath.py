"""File data path: staged partial writes, reclaiming replaced blocks, the no-wait fast paths."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torus_blockstore_mem.store import MemBlockStore

from torus_core.errors import MetadataUnavailable
from torus_core.refs import BlockType, INodeRef
from torus_core.testing.files import FileVolume

BS = 4 * 4096
VOL = 9


class Vol(FileVolume):
    """INode counter + committed pointer, like the metadata service."""

    def __init__(self, blocks: int = 16) -> None:
        super().__init__(MemBlockStore(BS, 10_000), VOL, blocks * BS)

    def data_blocks(self) -> int:
        return sum(1 for r in self.store.iter_refs() if r.type == BlockType.DATA)


def test_partial_writes_are_staged_without_touching_the_store_until_sync() -> None:
    vol = Vol()
    f = vol.open(cache_bytes=BS, staging_bytes=16 * BS)
    for i in range(16):
        f.write_at(i * BS + 100 * i + 1, bytes([i + 1]) * 5000)
    assert f.dirty_blocks() == 16
    assert vol.store.used_blocks() == 0
    for i in range(16):
        assert f.read_at(i * BS + 100 * i, 5002) == b"\0" + bytes([i + 1]) * 5000 + b"\0"
    f.sync()
    assert f.dirty_blocks() == 0 and vol.data_blocks() == 16
    g = vol.open()
    for i in range(16):
        assert g.read_at(i * BS + 100 * i + 1, 5000) == bytes([i + 1]) * 5000


def test_the_staging_bound_flushes_the_least_recently_written_block() -> None:
    vol = Vol()
    f = vol.open(cache_bytes=BS, staging_bytes=2 * BS)
    for i in range(5):
        f.write_at(i * BS + 7, b"x" * 10)
        assert f.dirty_blocks() <= 2
    assert vol.data_blocks() == 3
    assert f.read_at(7, 10) == b"x" * 10  # flushed block 0 reads back from the store


def test_blocks_replaced_before_a_sync_do_not_pile_up_in_the_store() -> None:
    vol = Vol()
    f = vol.open(cache_bytes=BS)  # one cached block: the others go straight to the store
    for k in range(10):
        for i in range(4):
            f.write_at(i * BS, bytes([k]) * BS)
        f.write_at(5 * BS + 3, b"partial")
    f.trim(2 * BS, BS)
    f.sync()
    assert vol.data_blocks() == 4  # blocks 0, 1, 3 and 5: nothing left over from the rewrites
    assert vol.open().read_at(0, BS) == bytes([9]) * BS


def test_blocks_named_by_a_written_inode_survive_a_failed_commit() -> None:
    vol = Vol()
    f = vol.open(cache_bytes=BS)
    f.write_at(0, b"a" * BS)
    vol.fail_next_commit = True
    with pytest.raises(MetadataUnavailable):
        f.sync()
    written = INodeRef(VOL, vol.counter)
    for _ in range(3):
        f.write_at(0, b"b" * BS)
        f.write_at(BS, b"c" * BS)
    f.sync()
    assert vol.open().read_at(0, 2 * BS) == b"b" * BS + b"c" * BS
    # the INode whose commit failed (it may have been applied) still reads back whole
    assert vol.open(written, read_only=True).read_at(0, BS) == b"a" * BS


def test_write_nowait_only_does_writes_that_need_no_metadata_or_store_io() -> None:
    vol = Vol()
    f = vol.open(cache_bytes=BS, staging_bytes=2 * BS)
    assert not f.write_nowait(0, b"x")  # not write-open: needs an INode number
    assert f.read_at(0, 1) == b"\0"
    f.write_at(0, b"y")
    assert f.write_nowait(10, b"z" * 100)  # same staged block
    assert f.write_nowait(BS, b"z")  # a second staged block fits
    assert not f.write_nowait(2 * BS, b"w")  # a third would flush one
    assert f.write_nowait(3 * BS, b"q" * BS)  # a whole block fits the memory cache
    assert not f.write_nowait(4 * BS, b"q" * BS)  # ... a second would go to the store
    assert not f.write_nowait(f.size - 1, b"ab")  # past the end: left to write_at's errors
    assert f.read_at(10, 100) == b"z" * 100 and f.read_at(BS, 1) == b"z"
    assert f.read_at(2 * BS, 1) == b"\0" and f.read_at(4 * BS, 1) == b"\0"
    assert vol.data_blocks() == 0


def test_nowait_calls_give_up_while_another_thread_holds_the_file() -> None:
    vol = Vol()
    f = vol.open()
    f.write_at(0, b"data")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with f._lock:  # what a worker running a long sync looks like
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        assert f.read_nowait(0, 4) is None
        assert not f.write_nowait(0, b"DATA")
    finally:
        release.set()
        t.join(10)
    assert f.read_nowait(0, 4) == b"data"
    assert f.write_nowait(0, b"DATA") and f.read_at(0, 4) == b"DATA"


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "sync", "reopen", "trim"]),
        st.integers(0, 6 * BS),
        st.integers(0, 2 * BS),
        st.integers(1, 255),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, staged=st.integers(1, 3))
def test_file_matches_a_bytearray_under_mixed_partial_and_whole_block_io(
    ops: list[tuple[str, int, int, int]], staged: int
) -> None:
    vol = Vol(blocks=6)
    size = vol.size
    f = vol.open(cache_bytes=BS, staging_bytes=staged * BS)
    model = bytearray(size)
    committed = bytes(model)
    for op, offset, length, seed in ops:
        offset = min(offset, size)
        length = min(length, size - offset)
        if op == "write":
            data = bytes((seed + k) % 256 for k in range(length))
            f.write_at(offset, data)
            model[offset : offset + length] = data
        elif op == "read":
            assert f.read_at(offset, length) == bytes(model[offset : offset + length])
        elif op == "trim":
            f.trim(offset, length)
            model[offset : offset + length] = bytes(length)
        elif op == "sync":
            f.sync()
            committed = bytes(model)
        else:
            f.close()
            f = vol.open(cache_bytes=BS, staging_bytes=staged * BS)
            model = bytearray(committed)
    assert f.read_at(0, size) == bytes(model)
    f.sync()
    assert vol.open().read_at(0, size) == bytes(model)


def test_concurrent_whole_block_and_partial_writers_with_syncs_all_land() -> None:
    vol = Vol(blocks=16)
    f = vol.open(cache_bytes=BS)  # the cache holds one block: the rest go straight to the store
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for rnd in range(5):
                for i in range(k, 16, 4):
                    f.write_at(i * BS, bytes([16 * rnd + i]) * BS)
                    f.write_at(i * BS + 5, b"p")  # a partial write on top, staged
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    syncer = threading.Thread(target=lambda: [f.sync() for _ in range(5)])
    for t in [*threads, syncer]:
        t.start()
    for t in [*threads, syncer]:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in [*threads, syncer])
    f.sync()
    g = vol.open()
    for i in range(16):
        want = bytearray([64 + i]) * BS
        want[5:6] = b"p"
        assert g.read_at(i * BS, BS) == bytes(want)
