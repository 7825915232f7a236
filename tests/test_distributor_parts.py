"""The distributor's parts on their own: the peer-call helper and the local replica."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from torus_core.distributor.local import LocalReplica
from torus_core.distributor.peercalls import PeerCalls
from torus_core.errors import BlockNotExist, PeerUnavailable
from torus_core.refs import BlockRef
from torus_core.ring.ketama import KetamaRing
from torus_core.testing.distributor import LocalCluster, mem_store_factory

BS = 4096
PEERS = ["a", "b"]


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(PEERS, lambda members: KetamaRing(members, replication=2), block_size=BS) as c:
        yield c


def test_a_call_reaches_the_peer_by_uuid(cluster: LocalCluster) -> None:
    calls = PeerCalls(cluster.directory(), cluster.pool, suspect_seconds=5.0)
    assert calls.call("a", lambda c: c.ping(timeout=2.0)).uuid == "a"
    assert not calls.is_suspect("a")


def test_a_peer_without_an_address_fails_fast_without_dialing(cluster: LocalCluster) -> None:
    calls = PeerCalls(cluster.directory(), cluster.pool, suspect_seconds=5.0)
    before = cluster.pool.addresses()
    with pytest.raises(PeerUnavailable, match="no known address"):
        calls.call("nobody", lambda c: c.ping(timeout=2.0))
    assert not calls.dialable("nobody") and calls.dialable("a")
    assert cluster.pool.addresses() == before


def test_an_unreachable_peer_drops_its_channel_and_becomes_suspect(cluster: LocalCluster) -> None:
    calls = PeerCalls(cluster.directory(), cluster.pool, suspect_seconds=0.3)
    calls.call("b", lambda c: c.ping(timeout=2.0))
    assert cluster.addresses["b"] in cluster.pool.addresses()
    cluster.stop("b")
    with pytest.raises(PeerUnavailable):
        calls.call("b", lambda c: c.ping(timeout=1.0))
    assert cluster.addresses["b"] not in cluster.pool.addresses()  # the next call dials again
    assert calls.is_suspect("b")
    assert calls.healthy_first(["b", "a"]) == ["a", "b"]
    time.sleep(0.35)
    assert not calls.is_suspect("b")  # the memory is short
    assert calls.healthy_first(["b", "a"]) == ["b", "a"]


def test_a_peer_answering_with_an_error_is_not_suspect(cluster: LocalCluster) -> None:
    calls = PeerCalls(cluster.directory(), cluster.pool, suspect_seconds=5.0)
    with pytest.raises(BlockNotExist):
        calls.call("a", lambda c: c.get_block(BlockRef(1, 1, 1), timeout=2.0))
    assert not calls.is_suspect("a")
    assert cluster.addresses["a"] in cluster.pool.addresses()


def test_a_local_flush_happens_only_when_a_write_is_not_covered() -> None:
    store = mem_store_factory()(BS, 16)
    flushes = 0
    real_flush = store.flush

    def counting_flush() -> None:
        nonlocal flushes
        flushes += 1
        real_flush()

    store.flush = counting_flush  # type: ignore[method-assign]
    local = LocalReplica(store)
    assert not local.dirty
    local.write([(BlockRef(1, 1, 1), bytes(BS))])
    assert local.dirty
    local.flush()
    assert not local.dirty and flushes == 1


def test_writes_until_full_return_what_did_not_fit() -> None:
    local = LocalReplica(mem_store_factory()(BS, 2))
    batch = [(BlockRef(1, 1, i), bytes([i]) * BS) for i in range(1, 5)]
    assert local.write_until_full(batch) == batch[2:]
    assert local.dirty
