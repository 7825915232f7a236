"""Whole-block writes past a full cache: store writes outside the file lock, refs installed under it."""

from __future__ import annotations

import threading

from torus_blockstore_mem.store import MemBlockStore

from torus_core.blockstore import BlockStore
from torus_core.refs import BlockRef, BlockType
from torus_core.testing.files import FileVolume

BS = 4 * 4096
VOL = 7
N_BLOCKS = 12


class GatedStore(MemBlockStore):
    """A memory store whose data-block writes wait on ``gate`` while ``gated`` is set."""

    def __init__(self) -> None:
        super().__init__(BS, 10_000)
        self.gated = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write_block_crc32(self, ref: BlockRef, data: bytes | bytearray | memoryview, crc32: int) -> None:
        if self.gated and ref.type == BlockType.DATA:
            self.entered.set()
            assert self.gate.wait(10)
        super().write_block_crc32(ref, data, crc32)


def _data_refs(store: BlockStore) -> set[BlockRef]:
    return {r for r in store.iter_refs() if r.type == BlockType.DATA}  # type: ignore[attr-defined]


def _run(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)


def test_a_whole_block_store_write_does_not_hold_the_file_lock() -> None:
    store = GatedStore()
    vol = FileVolume(store, VOL, N_BLOCKS * BS)
    f = vol.open(cache_bytes=BS)
    f.write_at(0, b"a" * BS)  # fills the one-block cache
    store.gated = True
    w = threading.Thread(target=f.write_at, args=(BS, b"b" * BS))
    w.start()
    assert store.entered.wait(10)
    try:
        # the writer sits in the store: the file lock is free and the old content is visible
        assert f.read_nowait(BS, 4) == bytes(4)
        assert f.read_nowait(0, 4) == b"aaaa"
    finally:
        store.gate.set()
        w.join(10)
    assert not w.is_alive()
    assert f.read_at(BS, BS) == b"b" * BS


def test_concurrent_whole_block_writers_leak_no_blocks_and_last_install_wins() -> None:
    store = MemBlockStore(BS, 10_000)
    vol = FileVolume(store, VOL, N_BLOCKS * BS)
    f = vol.open(cache_bytes=BS)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for rnd in range(6):
                for i in range(N_BLOCKS):  # every writer hits every block: contended slots
                    f.write_at(i * BS, bytes([k * 16 + rnd]) * BS)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    _run([threading.Thread(target=writer, args=(k,)) for k in range(4)])
    assert not errors
    slots = f.blockset.get_all_block_refs()
    # every replaced block was deleted: the store holds exactly the blocks the slots name
    assert _data_refs(store) == set(slots) and len(slots) <= N_BLOCKS
    f.sync()
    g = vol.open()
    for i in range(N_BLOCKS):
        got = g.read_at(i * BS, BS)
        assert got in {bytes([k * 16 + 5]) * BS for k in range(4)}  # some writer's last round
        assert got == f.read_at(i * BS, BS)


def test_syncs_during_concurrent_whole_block_writes_commit_consistent_readable_inodes() -> None:
    store = MemBlockStore(BS, 10_000)
    vol = FileVolume(store, VOL, N_BLOCKS * BS)
    f = vol.open(cache_bytes=BS)
    committed = []
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for rnd in range(8):
                for i in range(k, N_BLOCKS, 3):  # disjoint blocks per writer
                    f.write_at(i * BS, bytes([rnd * 16 + i]) * BS)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def syncer() -> None:
        try:
            for _ in range(10):
                ref = f.sync()
                if ref is not None:
                    committed.append(ref)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    _run([*(threading.Thread(target=writer, args=(k,)) for k in range(3)), threading.Thread(target=syncer)])
    assert not errors
    f.sync()
    # every committed INode names only blocks that exist and pass their CRC, each a whole write
    for ref in committed:
        g = vol.open(ref)
        for i in range(N_BLOCKS):
            got = g.read_at(i * BS, BS)
            assert got == bytes(BS) or got == bytes([got[0]]) * BS
    final = vol.open()
    for i in range(N_BLOCKS):
        assert final.read_at(i * BS, BS) == bytes([7 * 16 + i]) * BS
