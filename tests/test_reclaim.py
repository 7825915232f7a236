# mypy: allow-untyped-defs
"""Superseded blocks are freed right after the commit that replaced them (issue 11): a
flush-heavy writer keeps the store near its live size, while snapshots and clones keep theirs."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
from torus_blockstore_mem.store import MemBlockStore
from torus_sqlite.backend import SQLiteBackend

from torus_core.block import BlockVolume, clone, create_snapshot, delete_snapshot, open_snapshot
from torus_core.blockset import default_layer_registry
from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.metadata import MetadataService
from torus_core.refs import BlockType
from torus_core.ring.builtin import builtin_ring_types

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

BS = 4096
MiB = 1 << 20
VOL_SIZE = 256 * 1024  # 64 blocks


@pytest.fixture
def md(open_backend: Callable[[], SQLiteBackend]) -> MetadataService:
    m = MetadataService(open_backend(), ring_types=RING_TYPES)
    m.format(BS, "crc,base")
    return m


@pytest.fixture
def store() -> Iterator[BlockStore]:
    s = MemBlockStore.open(BlockStoreConfig(block_size=BS, capacity_bytes=16 * MiB))
    yield s
    s.close()


def flushed_random_writes(vol: BlockVolume, model: bytearray, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        off = rng.randrange(0, VOL_SIZE - 512)
        data = rng.randbytes(rng.randrange(1, 512))
        vol.write_at(off, data)
        model[off : off + len(data)] = data
        vol.sync()


def test_flush_after_every_write_keeps_store_at_live_size(md, store):
    md.create_volume("v", VOL_SIZE)
    model = bytearray(VOL_SIZE)
    with BlockVolume.open(md, store, "v", layer_registry=LAYERS) as vol:
        flushed_random_writes(vol, model, 400, seed=1)
        # 64 data blocks at most are live; each commit also leaves at most 2 INodes' blocks
        data = [r for r in store.iter_refs() if r.type == BlockType.DATA]
        inodes = {r.inode_ref for r in store.iter_refs() if r.type == BlockType.INODE}
        assert len(data) <= VOL_SIZE // BS
        assert len(inodes) <= 2
        assert vol.read_at(0, VOL_SIZE) == bytes(model)
    with BlockVolume.open(md, store, "v", layer_registry=LAYERS) as vol:
        assert vol.read_at(0, VOL_SIZE) == bytes(model)


def test_snapshot_blocks_survive_overwrites_after_the_snapshot(md, store):
    md.create_volume("v", VOL_SIZE)
    model = bytearray(VOL_SIZE)
    with BlockVolume.open(md, store, "v", layer_registry=LAYERS) as vol:
        flushed_random_writes(vol, model, 50, seed=2)
        create_snapshot(md, "v@s1")
        at_snapshot = bytes(model)
        flushed_random_writes(vol, model, 200, seed=3)
    snap = open_snapshot(md, store, "v", "s1", layer_registry=LAYERS)
    try:
        assert snap.read_at(0, VOL_SIZE) == at_snapshot
    finally:
        snap.close()


def test_clone_keeps_its_blocks_after_its_snapshot_is_deleted_and_the_source_rewritten(md, store):
    md.create_volume("src", VOL_SIZE)
    model = bytearray(VOL_SIZE)
    with BlockVolume.open(md, store, "src", layer_registry=LAYERS) as vol:
        flushed_random_writes(vol, model, 50, seed=4)
    create_snapshot(md, "src@base")
    clone(md, store, "src@base", "copy")
    delete_snapshot(md, "src@base")
    cloned = bytes(model)
    with BlockVolume.open(md, store, "src", layer_registry=LAYERS) as vol:
        flushed_random_writes(vol, model, 200, seed=5)
        vol.write_at(0, bytes(VOL_SIZE))  # supersede every block of the source
        vol.sync()
    with BlockVolume.open(md, store, "copy", layer_registry=LAYERS) as c:
        assert c.read_at(0, VOL_SIZE) == cloned


def test_blocks_of_a_clone_source_are_not_freed_by_the_clone(md, store):
    md.create_volume("src", VOL_SIZE)
    model = bytearray(VOL_SIZE)
    with BlockVolume.open(md, store, "src", layer_registry=LAYERS) as vol:
        flushed_random_writes(vol, model, 30, seed=6)
    create_snapshot(md, "src@s")
    clone(md, store, "src@s", "copy")
    with BlockVolume.open(md, store, "copy", layer_registry=LAYERS) as c:
        c.write_at(0, bytes(VOL_SIZE))
        c.sync()
    snap = open_snapshot(md, store, "src", "s", layer_registry=LAYERS)
    try:
        assert snap.read_at(0, VOL_SIZE) == bytes(model)
    finally:
        snap.close()
