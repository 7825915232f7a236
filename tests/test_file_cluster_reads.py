"""File reads over a cluster-like store: read-ahead hints, the no-wait read path."""

from __future__ import annotations

from collections.abc import Iterable

from torus_blockstore_mem.store import MemBlockStore

from torus_core.blockset.base import BaseLayer
from torus_core.file import READ_AHEAD_BLOCKS
from torus_core.refs import BlockRef
from torus_core.testing.files import FileVolume

BS = 4 * 4096
VOL = 11


class RecordingStore(MemBlockStore):
    """A memory store recording every ``prefetch(refs)`` call; declares no prefetching."""

    def __init__(self, block_size: int, capacity: int) -> None:
        super().__init__(block_size, capacity)
        self.prefetched: list[list[BlockRef]] = []

    def prefetch(self, refs: Iterable[BlockRef]) -> int:
        """Record the hint; nothing to fetch in memory."""
        self.prefetched.append(list(refs))
        return 0


class PrefetchingStore(RecordingStore):
    """Declares the Distributor's capability: its ``prefetch(refs)`` hint fetches."""

    prefetches = True


def _volume(
    blocks: int, store_class: type[RecordingStore] = PrefetchingStore
) -> tuple[FileVolume, RecordingStore]:
    store = store_class(BS, 10_000)
    vol = FileVolume(store, VOL, blocks * BS)
    f = vol.open()
    for i in range(blocks):
        if i != 5:  # block 5 stays a hole
            f.write_at(i * BS, bytes([i + 1]) * BS)
    f.sync()
    return vol, store


def _refs(f: object, blocks: range) -> list[BlockRef]:
    base = f.blockset.layers()[-1]  # type: ignore[attr-defined]
    assert isinstance(base, BaseLayer)
    return [r for j in blocks if not (r := base.ref_at(j)).is_zero()]


def test_sequential_reads_name_the_next_stored_blocks_to_prefetch() -> None:
    vol, store = _volume(20)
    f = vol.open()
    assert f.read_at(0, 4096) == bytes([1]) * 4096
    assert f.read_at(4096, BS - 4096) == bytes([1]) * (BS - 4096)
    assert store.prefetched == []  # the first read and reads inside one block are no run yet
    assert f.read_at(BS, BS) == bytes([2]) * BS  # continues into block 1
    assert store.prefetched == [_refs(f, range(2, 2 + READ_AHEAD_BLOCKS))]
    assert len(store.prefetched[0]) == READ_AHEAD_BLOCKS - 1  # block 5 is a hole: skipped
    assert f.read_nowait(2 * BS + 100, 50) == bytes([3]) * 50  # the no-wait path hints too
    assert store.prefetched[-1] == _refs(f, range(3, 3 + READ_AHEAD_BLOCKS))
    f.read_at(17 * BS, 2 * BS)  # a jump: no hint
    assert len(store.prefetched) == 2
    f.read_at(19 * BS, BS)  # continues, but nothing stored lies beyond the last block
    assert len(store.prefetched) == 2


def test_a_store_that_declares_no_prefetching_gets_no_hints() -> None:
    vol, store = _volume(12, RecordingStore)
    f = vol.open()
    for i in range(6):
        f.read_at(i * BS, BS)
    assert store.prefetched == []  # a sequential run, but the store says hints are useless


def test_random_reads_never_prefetch() -> None:
    vol, store = _volume(20)
    f = vol.open()
    for i in (7, 2, 12, 0, 9, 15, 4, 18, 11):
        assert f.read_at(i * BS + 8, 16) == bytes([i + 1]) * 16
        assert f.read_nowait(i * BS + 64, 16) == bytes([i + 1]) * 16
    assert store.prefetched == []


def test_dirty_blocks_are_not_named_to_prefetch() -> None:
    vol, store = _volume(20)
    f = vol.open()
    f.write_at(3 * BS, b"d" * BS)  # dirty in memory
    f.write_at(4 * BS + 10, b"s" * 10)  # staged
    f.read_at(0, 2 * BS)
    f.read_at(2 * BS, 10)
    assert store.prefetched == [_refs(f, range(6, 3 + READ_AHEAD_BLOCKS))]
