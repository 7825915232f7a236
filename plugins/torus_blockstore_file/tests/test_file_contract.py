"""The file block store against the shared contract and state machine."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from torus_blockstore_file import FileBlockStore

from torus_core.blockstore import BlockStoreConfig
from torus_core.plugins import make_plugin_manager
from torus_core.testing.blockstore import BlockStoreMachine, PersistentBlockStoreContract, StoreFactory


class TestFilePersistentBlockStoreContract(PersistentBlockStoreContract):
    #: Store options of every store this class opens.
    OPTIONS: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> StoreFactory:
        def make(capacity_blocks: int, block_size: int) -> FileBlockStore:
            return FileBlockStore.open(
                BlockStoreConfig(
                    block_size=block_size,
                    capacity_bytes=capacity_blocks * block_size,
                    path=str(tmp_path / "store"),
                    options=self.OPTIONS,
                )
            )

        return make


class TestFilePersistentBlockStoreContractNoFsync(TestFilePersistentBlockStoreContract):
    OPTIONS: ClassVar[dict[str, Any]] = {"fsync": False}


class FileMachine(BlockStoreMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="torus-fbs-")

    def open_store(self) -> FileBlockStore:
        return FileBlockStore.open(
            BlockStoreConfig(
                block_size=self.block_size,
                capacity_bytes=self.capacity_blocks * self.block_size,
                path=self.dir,
                options={"fsync": False},
            )
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


TestFileMachine = FileMachine.TestCase
TestFileMachine.settings = settings(TestFileMachine.settings, stateful_step_count=40)


def test_file_store_is_registered_under_file_via_entry_point() -> None:
    regs = make_plugin_manager().collect_registries()
    assert regs.block_stores.get("file") is FileBlockStore
