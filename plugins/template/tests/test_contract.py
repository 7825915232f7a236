"""The template store against the shipped block-store contract and state machine."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from torus_template import plugin
from torus_template.store import DirBlockStore

from torus_core.blockstore import BlockStoreConfig
from torus_core.errors import ConfigError, InvalidArgument
from torus_core.plugins import TorusPluginManager
from torus_core.testing.blockstore import BlockStoreMachine, PersistentBlockStoreContract, StoreFactory


def _open(path: Path | str, capacity_blocks: int, block_size: int, **options: object) -> DirBlockStore:
    return DirBlockStore.open(
        BlockStoreConfig(
            block_size=block_size,
            capacity_bytes=capacity_blocks * block_size,
            path=str(path),
            options=options or {"fsync": False},
        )
    )


class TestTemplateStoreContract(PersistentBlockStoreContract):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> StoreFactory:
        return lambda capacity_blocks, block_size: _open(tmp_path / "store", capacity_blocks, block_size)


class TemplateMachine(BlockStoreMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="torus-template-")

    def open_store(self) -> DirBlockStore:
        return _open(self.dir, self.capacity_blocks, self.block_size)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


TestTemplateMachine = TemplateMachine.TestCase
TestTemplateMachine.settings = settings(TestTemplateMachine.settings, stateful_step_count=30, max_examples=30)


def test_plugin_registers_and_declares_its_store_through_the_hooks() -> None:
    pm = TorusPluginManager()
    pm.register(plugin, name="template")
    regs = pm.collect_registries()
    assert regs.block_stores.get(DirBlockStore.name) is DirBlockStore
    assert regs.block_stores.declarations[DirBlockStore.name].config_keys == ("fsync",)


def test_flush_with_fsync_keeps_blocks_across_reopen(tmp_path: Path) -> None:
    from torus_core.refs import BlockRef

    store = _open(tmp_path, 4, 64, fsync=True)
    store.write_block(BlockRef(1, 2, 3), b"x")
    store.flush()
    store.close()
    assert _open(tmp_path, 4, 64).get_block(BlockRef(1, 2, 3)) == b"x" + bytes(63)


def test_reopening_with_another_block_size_is_refused(tmp_path: Path) -> None:
    _open(tmp_path, 4, 64).close()
    with pytest.raises(InvalidArgument, match="64-byte blocks"):
        _open(tmp_path, 4, 128)


def test_unknown_option_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        _open(tmp_path, 4, 64, nope=1)
