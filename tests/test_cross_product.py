# mypy: allow-untyped-defs
"""The block-volume life cycle over **every installed** metadata backend x block store.

etcd and Redis run live (the session fixtures from ``torus_core.testing.services`` start private
servers on 127.0.0.1; each test gets its own key prefix). Steps: format, create volume, open,
write, sync, close, reopen, read back, snapshot, overwrite, restore, delete.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.block import BlockVolume, create_snapshot, open_snapshot, restore_snapshot
from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.errors import Locked, NotExist
from torus_core.eventlog import MetadataBackend
from torus_core.metadata import MetadataService
from torus_core.plugins import load_registries

BS = 4096
REGISTRIES = load_registries()
COMBOS = [(m, b) for m in REGISTRIES.metadata.names() for b in REGISTRIES.block_stores.names()]
_MARKS = {"etcd": pytest.mark.needs_etcd, "redis": pytest.mark.needs_redis}


def _param(meta: str, block: str):
    marks = [_MARKS[meta]] if meta in _MARKS else []
    return pytest.param(meta, block, id=f"meta={meta}-block={block}", marks=marks)


def _url(meta: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    tag = uuid.uuid4().hex
    if meta == "sqlite":
        return f"sqlite:///{tmp_path}/meta.db"
    if meta == "etcd":
        return f"{request.getfixturevalue('etcd_server').url}?prefix=/torus-xp-{tag}/"
    if meta == "redis":
        return f"{request.getfixturevalue('redis_server').url}?prefix=torus-xp-{tag}:"
    pytest.fail(f"no test URL recipe for metadata backend {meta!r}: add one here")


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataBackend]:
    meta = request.node.callspec.params["meta"]
    b = REGISTRIES.metadata.get(meta).from_url(_url(meta, request, tmp_path))
    yield b
    b.wipe()
    b.close()


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockStore]:
    block = request.node.callspec.params["block"]
    s = REGISTRIES.block_stores.get(block).open(BlockStoreConfig(BS, 16 << 20, str(tmp_path / "block")))
    yield s
    s.close()


def test_every_registered_backend_and_store_is_in_the_product():
    metas = {m for m, _ in COMBOS}
    blocks = {b for _, b in COMBOS}
    assert {"sqlite", "etcd", "redis"} <= metas and {"mem", "file"} <= blocks


@pytest.mark.parametrize(("meta", "block"), [_param(m, b) for m, b in COMBOS])
def test_volume_life_cycle(meta, block, backend, store):
    md = MetadataService(backend, ring_types=REGISTRIES.ring_types)
    md.format(BS, "crc,base")
    md.create_volume("vol", 64 * BS)
    first = os.urandom(5 * BS + 123)

    vol = BlockVolume.open(md, store, "vol", lease_ttl=5, layer_registry=REGISTRIES.blockset_layers)
    vol.write_at(BS // 2, first)
    assert vol.sync() is not None
    vol.close()
    assert not md.lock_status("vol").locked

    with BlockVolume.open(md, store, "vol", lease_ttl=5, layer_registry=REGISTRIES.blockset_layers) as vol:
        assert vol.read_at(BS // 2, len(first)) == first
        assert vol.read_at(0, BS // 2) == bytes(BS // 2)

    create_snapshot(md, "vol@s")
    with BlockVolume.open(md, store, "vol", lease_ttl=5, layer_registry=REGISTRIES.blockset_layers) as vol:
        vol.write_at(0, b"\xff" * 8 * BS)
        with pytest.raises(Locked):
            restore_snapshot(md, "vol@s")
        with pytest.raises(Locked):
            md.delete_volume("vol")

    restore_snapshot(md, "vol@s")
    with BlockVolume.open(md, store, "vol", lease_ttl=5, layer_registry=REGISTRIES.blockset_layers) as vol:
        assert vol.read_at(BS // 2, len(first)) == first
    with open_snapshot(md, store, "vol", "s", layer_registry=REGISTRIES.blockset_layers) as snap:
        assert snap.read_at(BS // 2, len(first)) == first

    md.delete_volume("vol")
    with pytest.raises(NotExist):
        md.get_volume("vol")
    assert md.list_volumes() == []
