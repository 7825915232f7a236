"""The mem block store against the shared contract and state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from torus_blockstore_mem import MemBlockStore

from torus_core.blockstore import BlockStoreConfig
from torus_core.errors import InvalidArgument
from torus_core.plugins import make_plugin_manager
from torus_core.testing.blockstore import BlockStoreContract, BlockStoreMachine, StoreFactory


def _make(capacity_blocks: int, block_size: int) -> MemBlockStore:
    return MemBlockStore.open(
        BlockStoreConfig(block_size=block_size, capacity_bytes=capacity_blocks * block_size)
    )


class TestMemBlockStoreContract(BlockStoreContract):
    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        return _make


class MemMachine(BlockStoreMachine):
    def open_store(self) -> MemBlockStore:
        return _make(self.capacity_blocks, self.block_size)


TestMemMachine = MemMachine.TestCase
TestMemMachine.settings = settings(TestMemMachine.settings, stateful_step_count=40)


def test_mem_store_is_registered_under_mem_via_entry_point() -> None:
    regs = make_plugin_manager().collect_registries()
    assert regs.block_stores.get("mem") is MemBlockStore


def test_capacity_rounds_down_to_whole_blocks() -> None:
    store = MemBlockStore.open(BlockStoreConfig(block_size=100, capacity_bytes=1050))
    assert store.num_blocks() == 10


@pytest.mark.parametrize("block_size", [0, -1])
def test_non_positive_block_size_is_rejected(block_size: int) -> None:
    with pytest.raises(InvalidArgument):
        MemBlockStore.open(BlockStoreConfig(block_size=block_size, capacity_bytes=100))


def test_negative_capacity_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        MemBlockStore.open(BlockStoreConfig(block_size=16, capacity_bytes=-16))
