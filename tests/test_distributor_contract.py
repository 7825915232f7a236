"""The shared BlockStore contract, run against a Distributor whose ring holds only itself."""

from __future__ import annotations

import pytest
from hypothesis import settings

from torus_core.distributor import Distributor, PeerDirectory
from torus_core.ring.base import RingMember
from torus_core.ring.mod import ModRing
from torus_core.testing.blockstore import BlockStoreContract, BlockStoreMachine, StoreFactory
from torus_core.testing.distributor import mem_store_factory


def _single_peer(capacity_blocks: int, block_size: int) -> Distributor:
    store = mem_store_factory()(block_size, capacity_blocks)
    ring = ModRing([RingMember("self", capacity_blocks)], replication=1)
    return Distributor("self", store, ring, PeerDirectory(), read_cache_bytes=4 * block_size)


class TestDistributorSinglePeerContract(BlockStoreContract):
    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        return _single_peer


@pytest.mark.parametrize("level", ["all", "one", "local"])
def test_single_peer_distributor_honours_every_write_level(level: str) -> None:
    from torus_core.refs import BlockRef

    dist = _single_peer(4, 512)
    try:
        dist.write_block(BlockRef(1, 1, 1), b"abc", level=level)
        assert dist.local_store is not None
        assert dist.local_store.get_block(BlockRef(1, 1, 1)) == b"abc" + bytes(509)
    finally:
        dist.close()


class SinglePeerDistributorMachine(BlockStoreMachine):
    def open_store(self) -> Distributor:
        return _single_peer(self.capacity_blocks, self.block_size)


TestSinglePeerDistributorMachine = SinglePeerDistributorMachine.TestCase
TestSinglePeerDistributorMachine.settings = settings(
    TestSinglePeerDistributorMachine.settings, stateful_step_count=30
)
