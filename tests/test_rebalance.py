"""The rebalancer: blocks end up on exactly their owners, re-replicate after a removal, move to a
new peer, and the last copy is never deleted."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torus_sqlite.backend import SQLiteBackend

from torus_core.cluster import (
    ClusterNode,
    PeerInfo,
    RateLimiter,
    RebalanceOptions,
    Rebalancer,
    parse_peers,
)
from torus_core.cluster.testing import InProcessCluster, open_mem_store, wait_until
from torus_core.distributor import PeerDirectory
from torus_core.errors import InvalidArgument
from torus_core.refs import BlockRef
from torus_core.ring.base import RingMember
from torus_core.ring.codec import make_ring, ring_from_spec
from torus_core.rpc import PeerClientPool, PeerServer

BS = 4096


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[InProcessCluster]:
    url = f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"
    with InProcessCluster(lambda: SQLiteBackend.from_url(url), block_size=BS) as c:
        yield c


def _ring(cluster: InProcessCluster):  # type: ignore[no-untyped-def]
    return ring_from_spec(None, cluster.md.get_ring())


def _write(client: ClusterNode, n: int, volume: int = 7) -> dict[BlockRef, bytes]:
    blocks = {BlockRef(volume, 2, i + 1): os.urandom(64) + bytes(BS - 64) for i in range(n)}
    client.distributor.write_blocks(blocks.items())
    client.distributor.flush()  # write-behind: placed (and durable) once flushed
    return blocks


def _placed_exactly(cluster: InProcessCluster, refs: list[BlockRef]) -> bool:
    ring = _ring(cluster)
    return all(cluster.holders(r) == set(ring.get_peers(r).owners) for r in refs)


def _sync_client(cluster: InProcessCluster, client: ClusterNode) -> None:
    version = cluster.md.get_ring().version
    assert wait_until(lambda: client.distributor.ring.version == version, 2.0)


def _content_intact(cluster: InProcessCluster, blocks: dict[BlockRef, bytes]) -> bool:
    for ref, data in blocks.items():
        for uuid in cluster.holders(ref):
            store = cluster.nodes[uuid].store
            assert store is not None
            if store.get_block(ref) != data:
                return False
    return True


def test_a_fourth_peer_receives_its_share_and_no_block_is_lost(cluster: InProcessCluster) -> None:
    for name in ("a", "b", "c"):
        cluster.add_node(name)
    client = cluster.client()
    _sync_client(cluster, client)
    blocks = _write(client, 240)
    assert _placed_exactly(cluster, list(blocks))
    cluster.add_node("d")
    assert wait_until(lambda: _placed_exactly(cluster, list(blocks)), 20.0)
    share = cluster.nodes["d"].store.used_blocks()  # type: ignore[union-attr]
    # ketama with equal weights: d owns about half the blocks at R=2 over 4 peers
    assert 240 * 2 / 4 * 0.5 < share < 240 * 2 / 4 * 1.6
    assert _content_intact(cluster, blocks)
    for ref, data in list(blocks.items())[:20]:
        client.distributor.cache.clear()
        assert client.distributor.get_block(ref) == data


def test_after_a_forced_removal_survivors_re_replicate_to_the_new_owners(cluster: InProcessCluster) -> None:
    for name in ("a", "b", "c"):
        cluster.add_node(name)
    client = cluster.client()
    _sync_client(cluster, client)
    blocks = _write(client, 150)
    cluster.crash("c")
    ring = _ring(cluster).remove_peers(["c"])
    cluster.md.set_ring(ring.to_spec())
    assert wait_until(lambda: _placed_exactly(cluster, list(blocks)), 20.0)
    assert all(len(cluster.holders(r)) == 2 for r in blocks)
    assert _content_intact(cluster, blocks)

    def all_report_zero() -> bool:
        peers = parse_peers(cluster.md.list_peers())
        return all(
            peers[u].rebalance.ring_version == ring.version
            and peers[u].rebalance.under_replicated == 0
            and peers[u].rebalance.unconfirmed == 0
            for u in ("a", "b")
            if u in peers
        ) and {"a", "b"} <= set(peers)

    assert wait_until(all_report_zero, 10.0)


def test_a_peer_back_from_a_short_outage_keeps_its_blocks(cluster: InProcessCluster) -> None:
    for name in ("a", "b", "c"):
        cluster.add_node(name)
    client = cluster.client()
    _sync_client(cluster, client)
    blocks = _write(client, 60)
    held = {r for r in blocks if "c" in cluster.holders(r)}
    assert held
    cluster.crash("c")  # the store survives, as a file store would
    time.sleep(0.5)
    cluster.add_node("c")
    assert all("c" in cluster.holders(r) for r in held)
    assert wait_until(lambda: _placed_exactly(cluster, list(blocks)), 10.0)


# --- the rebalancer on its own ---------------------------------------------------------------------


def _lonely_rebalancer(
    owners_up: dict[str, PeerServer], members: list[str], *, settle: float = 0.0
) -> tuple[Rebalancer, Callable[[], None]]:
    store = open_mem_store(BS, 64)
    directory = PeerDirectory({u: s.address for u, s in owners_up.items()})
    for m in members:
        if m not in owners_up:
            directory.update({m: "127.0.0.1:1"})
            directory.set_down(m)
    ring = make_ring("ketama", [RingMember(m, 64) for m in members], replication=len(members))
    pool = PeerClientPool()
    reb = Rebalancer("self", store, lambda: ring, directory, pool, RebalanceOptions(settle=settle))

    def close() -> None:
        pool.close()
        store.close()

    return reb, close


def test_last_copy_is_kept_when_no_owner_can_confirm() -> None:
    reb, close = _lonely_rebalancer({}, ["x", "y"])
    try:
        refs = [BlockRef(1, 2, i) for i in range(1, 11)]
        for r in refs:
            reb.store.write_block(r, b"data")
        result = reb.run_pass()
        assert result.complete and result.deleted == 0 and result.unconfirmed == 10
        assert all(reb.store.has_block(r) for r in refs)
    finally:
        close()


def test_copy_is_kept_while_one_of_two_owners_is_down() -> None:
    owner_store = open_mem_store(BS, 64)
    server = PeerServer(owner_store, uuid="x").start()
    reb, close = _lonely_rebalancer({"x": server}, ["x", "y"])
    try:
        refs = [BlockRef(1, 2, i) for i in range(1, 6)]
        for r in refs:
            reb.store.write_block(r, b"data")
        result = reb.run_pass()
        assert result.pushed_blocks == 5 and result.deleted == 0
        assert all(owner_store.has_block(r) and reb.store.has_block(r) for r in refs)
    finally:
        close()
        server.stop()
        owner_store.close()


def test_non_owner_deletes_only_after_every_owner_confirmed_and_the_ring_settled() -> None:
    stores = {u: open_mem_store(BS, 64) for u in ("x", "y")}
    servers = {u: PeerServer(s, uuid=u).start() for u, s in stores.items()}
    reb, close = _lonely_rebalancer(servers, ["x", "y"], settle=0.5)
    try:
        refs = [BlockRef(1, 2, i) for i in range(1, 6)]
        for r in refs:
            reb.store.write_block(r, b"payload")
        first = reb.run_pass()  # ring not settled yet: push but keep
        assert first.pushed_blocks == 10 and first.deleted == 0
        time.sleep(0.6)
        second = reb.run_pass()
        assert second.deleted == 5 and second.pushed_blocks == 0 and second.under_replicated == 0
        assert reb.store.used_blocks() == 0
        for s in stores.values():
            assert all(s.get_block(r)[:7] == b"payload" for r in refs)
        info = reb.info()
        assert info.passes == 2 and not info.rebalancing and info.last_blocks == 0
    finally:
        close()
        for srv in servers.values():
            srv.stop()
        for s in stores.values():
            s.close()


def test_a_ring_change_mid_pass_ends_the_pass_without_deleting() -> None:
    stores = {u: open_mem_store(BS, 256) for u in ("x", "y")}
    servers = {u: PeerServer(s, uuid=u).start() for u, s in stores.items()}
    members = [RingMember("x", 64), RingMember("y", 64)]
    rings = [make_ring("ketama", members, replication=2)]
    store = open_mem_store(BS, 256)
    pool = PeerClientPool()
    directory = PeerDirectory({u: s.address for u, s in servers.items()})
    reb = Rebalancer("self", store, lambda: rings[-1], directory, pool, RebalanceOptions(batch=4, settle=0))
    try:
        for i in range(1, 41):
            store.write_block(BlockRef(1, 2, i), b"z")
        stop = threading.Event()
        original = reb._step

        def step_then_change(*args, **kwargs):  # type: ignore[no-untyped-def]
            original(*args, **kwargs)
            if len(rings) == 1:
                rings.append(rings[0].change_replication(1))

        reb._step = step_then_change  # type: ignore[method-assign]
        result = reb.run_pass(stop)
        assert not result.complete
        assert result.examined == 4
        assert reb.info().passes == 0
    finally:
        pool.close()
        store.close()
        for srv in servers.values():
            srv.stop()
        for s in stores.values():
            s.close()


def test_rate_limiter_paces_bytes() -> None:
    limiter = RateLimiter(400_000)
    t0 = time.monotonic()
    for _ in range(4):
        limiter.consume(100_000)
    assert time.monotonic() - t0 >= 0.9


def test_rebalance_options_reject_nonsense() -> None:
    with pytest.raises(InvalidArgument):
        RebalanceOptions(batch=0)
    with pytest.raises(InvalidArgument):
        RebalanceOptions(rate_bytes=-1)


def test_rebalance_progress_is_published_in_peer_info(cluster: InProcessCluster) -> None:
    cluster.add_node("a")
    assert wait_until(lambda: parse_peers(cluster.md.list_peers())["a"].rebalance.passes > 0, 5.0)
    info: PeerInfo = parse_peers(cluster.md.list_peers())["a"]
    assert info.rebalance.last_finish > 0 and info.total_blocks == cluster.capacity_blocks


def test_handoff_copies_written_while_an_owner_was_down_move_to_it_when_it_returns(
    cluster: InProcessCluster,
) -> None:
    for name in ("a", "b", "c"):
        cluster.add_node(name)
    client = cluster.client()
    _sync_client(cluster, client)
    ring = _ring(cluster)
    cluster.crash("c")  # its lease is not revoked: c stays in the ring, just unreachable
    blocks = _write(client, 40, volume=9)  # write level "all" (the default)
    client.distributor.flush()
    c_owned = [r for r in blocks if "c" in ring.get_peers(r).owners]
    assert c_owned
    for ref in blocks:
        live = [p for p in ring.get_peers(ref).peers if p != "c"]
        assert cluster.holders(ref) == set(live[:2])  # R acks from R distinct live peers
    cluster.add_node("c")  # same store, back in service
    assert wait_until(lambda: _placed_exactly(cluster, list(blocks)), 15.0)
    assert _content_intact(cluster, blocks)
