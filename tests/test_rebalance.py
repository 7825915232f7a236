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

from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.cli.peer_cmds import peer_settled
from torus_core.cluster import (
    ClusterNode,
    PeerInfo,
    RateLimiter,
    RebalanceOptions,
    Rebalancer,
    parse_peers,
)
from torus_core.cluster.membership import Membership
from torus_core.distributor import PeerDirectory
from torus_core.errors import InvalidArgument
from torus_core.gc import LiveSet
from torus_core.refs import BlockRef
from torus_core.ring.base import RingMember
from torus_core.ring.builtin import builtin_ring_types
from torus_core.ring.codec import make_ring, ring_from_spec
from torus_core.rpc import PeerClientPool, PeerServer
from torus_core.testing.cluster import (
    InProcessCluster,
    commit_blocks,
    ensure_volumes,
    open_mem_store,
    wait_until,
)

RING_TYPES = builtin_ring_types()

BS = 4096


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[InProcessCluster]:
    url = f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"
    with InProcessCluster(lambda: SQLiteBackend.from_url(url), block_size=BS) as c:
        yield c


def _ring(cluster: InProcessCluster):  # type: ignore[no-untyped-def]
    return ring_from_spec(cluster.md.ring_types, cluster.md.get_ring())


def _write(client: ClusterNode, n: int, volume: int = 7) -> dict[BlockRef, bytes]:
    ensure_volumes(client.md, volume)  # peers refuse blocks of volumes that do not exist
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
    owners_up: dict[str, PeerServer],
    members: list[str],
    *,
    settle: float = 0.0,
    live: LiveSet | None = None,
    idle_max: float = 30.0,
) -> tuple[Rebalancer, Callable[[], None]]:
    store = open_mem_store(BS, 64)
    directory = PeerDirectory({u: s.address for u, s in owners_up.items()})
    for m in members:
        if m not in owners_up:
            directory.update({m: "127.0.0.1:1"})
            directory.set_down(m)
    ring = make_ring(
        "ketama", [RingMember(m, 64) for m in members], replication=len(members), registry=RING_TYPES
    )
    pool = PeerClientPool()
    options = RebalanceOptions(settle=settle, idle_max=idle_max)
    reb = Rebalancer("self", store, lambda: ring, directory, pool, options, live_fn=lambda: live)

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
    rings = [make_ring("ketama", members, replication=2, registry=RING_TYPES)]
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
    seen: list[PeerInfo] = []

    def published() -> bool:
        # .get: on a loaded machine the 0.6 s test lease may lapse between two heartbeats
        info = parse_peers(cluster.md.list_peers()).get("a")
        if info is not None and info.rebalance.passes > 0:
            seen.append(info)
        return bool(seen)

    assert wait_until(published, 5.0)
    info = seen[0]
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


# --- garbage and an idle cluster (issue 11) ----------------------------------------------------------


class _OwnersWriter(BlockStore):
    """Writes every block straight into the stores of its ring owners (placement exact by
    construction, unlike a distributor write that may hand a block off under load)."""

    def __init__(self, cluster: InProcessCluster) -> None:
        self.cluster = cluster
        self.ring = _ring(cluster)

    @classmethod
    def open(cls, config: BlockStoreConfig) -> BlockStore:
        raise NotImplementedError

    @property
    def block_size(self) -> int:
        return BS

    def _owners(self, ref: BlockRef) -> list[BlockStore]:
        return [self.cluster.stores[u] for u in self.ring.get_peers(ref).owners]

    def has_block(self, ref: BlockRef) -> bool:
        return all(s.has_block(ref) for s in self._owners(ref))

    def get_block(self, ref: BlockRef) -> bytes:
        return self._owners(ref)[0].get_block(ref)

    def write_block(self, ref: BlockRef, data: bytes | bytearray | memoryview) -> None:
        for store in self._owners(ref):
            store.write_block(ref, data)

    def delete_block(self, ref: BlockRef) -> None:
        for store in self._owners(ref):
            store.delete_block(ref)

    def num_blocks(self) -> int:
        return 0

    def used_blocks(self) -> int:
        return 0

    def iter_refs(self) -> Iterator[BlockRef]:
        return iter(())

    def flush(self) -> None:
        for store in self.cluster.stores.values():
            store.flush()

    def close(self) -> None:
        pass


def _maintenance_counters(cluster: InProcessCluster) -> tuple[int, int, int]:
    """(GC deletions, blocks pushed, copies dropped by rebalancers) summed over the running peers."""
    gc = pushed = dropped = 0
    for node in cluster.nodes.values():
        if node.gc is not None:
            gc += node.gc.total_deleted
        if node.rebalancer is not None:
            info = node.rebalancer.info()
            pushed += info.pushed_blocks_total
            dropped += info.deleted_total
    return gc, pushed, dropped


def test_gc_and_rebalancers_of_the_owners_do_not_move_dead_blocks_back_and_forth(
    cluster: InProcessCluster,
) -> None:
    # GC timers out of phase (as after a peer restarted with fresh candidates): the owner that
    # deletes a dead block last still holds it while the other owner has already dropped it
    for name, grace in (("a", 0.0), ("b", 0.6), ("c", 1.2)):
        cluster.add_node(name, gc_grace=grace)
    version = cluster.md.get_ring().version
    # every peer on the final ring first: a pass on an older ring would legitimately move blocks
    assert wait_until(lambda: all(n.distributor.ring.version == version for n in cluster.nodes.values()), 5.0)
    md = cluster.md
    vol = md.create_volume("v", 64 * BS)
    writer = _OwnersWriter(cluster)  # exact placement: no handoff copy on a loaded machine
    dead: list[BlockRef] = []
    for round_ in range(4):  # each commit supersedes the previous one's blocks
        _, refs = commit_blocks(md, writer, "v", [bytes([round_, i]) * 8 for i in range(24)])
        dead += refs
    md.allocate_inode_index(vol.id)  # the writer's next session: the last INode is below highwater
    live = set(refs)
    dead = [r for r in dead if r not in live]
    # every dead copy is deleted exactly once (R copies of each dead data block and of each of
    # the 3 superseded one-block INodes) and nothing has to be pushed
    copies = 2 * (len(dead) + 3)
    assert wait_until(
        lambda: not any(cluster.holders(r) for r in dead) and _maintenance_counters(cluster)[0] >= copies,
        15.0,
    )
    before = _maintenance_counters(cluster)
    assert before == (copies, 0, 0)
    # converged: from now on nobody deletes or pushes anything
    time.sleep(1.5)  # ~15 maintenance rounds at the test's 0.1 s interval
    assert _maintenance_counters(cluster) == before
    assert not any(cluster.holders(r) for r in dead)
    assert _placed_exactly(cluster, list(live))

    def reported_clean() -> bool:
        peers = parse_peers(cluster.md.list_peers())
        version = cluster.md.get_ring().version
        return all(u in peers and peer_settled(peers[u], version) for u in ("a", "b", "c"))

    assert wait_until(reported_clean, 10.0)


def test_dead_blocks_are_neither_pushed_nor_counted_as_under_replicated() -> None:
    owner_store = open_mem_store(BS, 64)
    server = PeerServer(owner_store, uuid="x").start()
    live_refs = [BlockRef(1, 3, i) for i in range(1, 4)]
    dead_refs = [BlockRef(1, 2, i) for i in range(1, 6)]  # an older INode of volume 1
    live = LiveSet(started=time.time(), refs=set(live_refs), highwater={1: 4}, max_volume_id=1)
    reb, close = _lonely_rebalancer({"x": server}, ["x"], live=live)
    try:
        for r in live_refs + dead_refs:
            reb.store.write_block(r, b"data")
        result = reb.run_pass()
        assert result.complete and result.live_known
        assert result.pushed_blocks == len(live_refs) and result.under_replicated == len(live_refs)
        assert result.dead_skipped == len(dead_refs) and result.examined == 8
        assert not any(owner_store.has_block(r) for r in dead_refs)
        assert all(reb.store.has_block(r) for r in dead_refs)  # GC's job, not the rebalancer's
        assert reb.info().under_replicated == len(live_refs) and reb.info().dead_skipped == len(dead_refs)
    finally:
        close()
        server.stop()
        owner_store.close()


def test_without_a_live_set_every_block_is_pushed_and_the_count_is_unknown() -> None:
    owner_store = open_mem_store(BS, 64)
    server = PeerServer(owner_store, uuid="x").start()
    reb, close = _lonely_rebalancer({"x": server}, ["x"])
    try:
        for i in range(1, 4):
            reb.store.write_block(BlockRef(1, 2, i), b"data")
        result = reb.run_pass()
        assert result.pushed_blocks == 3 and not result.live_known
        assert reb.info().under_replicated == -1  # may include garbage: shown as unknown
    finally:
        close()
        server.stop()
        owner_store.close()


def test_an_idle_rebalancer_backs_off_and_a_poke_wakes_it() -> None:
    owner_store = open_mem_store(BS, 64)
    server = PeerServer(owner_store, uuid="x").start()
    live = LiveSet(started=time.time(), max_volume_id=0)  # volume 1 is newer: its blocks are alive
    reb, close = _lonely_rebalancer({"x": server}, ["self", "x"], live=live, idle_max=0.8)
    try:
        reb.store.write_block(BlockRef(1, 2, 1), b"data")
        first = reb.run_pass()
        assert first.pushed_blocks == 1 and not first.clean
        assert reb.due() and not reb.idle  # work was done: look again at once
        assert reb.info().rebalancing is False
        second = reb.run_pass()
        assert second.clean and reb.info().under_replicated == 0
        assert not reb.due() and reb.idle and reb.maybe_run_pass() is None
        reb.poke()
        assert reb.due() and not reb.idle
        third = reb.run_pass()
        assert third.clean and not reb.due()
        assert wait_until(reb.due, 2.0)  # the wait is bounded by idle_max
        reb.ring_changed(reb._ring_version + 1)
        reb.run_pass()
        assert reb.due() is False
        reb.ring_changed(reb._ring_version + 1)  # a new ring wakes it too
        assert reb.due()
    finally:
        close()
        server.stop()
        owner_store.close()


def test_membership_reports_a_peer_that_restarted_left_or_joined() -> None:
    changes: list[int] = []
    membership = Membership(PeerDirectory(), "self", on_change=lambda: changes.append(1))
    a = PeerInfo("a", address="127.0.0.1:1", boot_id="one")
    b = PeerInfo("b", address="127.0.0.1:2", boot_id="two")
    membership.apply({"a": a, "b": b})
    membership.apply({"a": a, "b": PeerInfo("b", address="127.0.0.1:2", boot_id="two")})
    assert changes == []  # the first heartbeat and an unchanged one
    membership.apply({"a": a, "b": PeerInfo("b", address="127.0.0.1:2", boot_id="three")})
    assert len(changes) == 1  # b restarted
    membership.apply({"a": a})
    assert len(changes) == 2  # b left
    membership.apply({"a": a, "b": b})
    assert len(changes) == 3  # b is back


def test_peer_list_counts_a_peer_as_settled_only_after_a_clean_pass_on_the_current_ring() -> None:
    info = PeerInfo("a", address="127.0.0.1:1")
    assert not peer_settled(info, 1)  # no pass yet
    info.rebalance.passes, info.rebalance.ring_version, info.rebalance.under_replicated = 3, 1, 0
    assert peer_settled(info, 1)
    assert not peer_settled(info, 2)  # the ring moved on since
    info.rebalance.under_replicated = -1
    assert not peer_settled(info, 1)  # unknown (no live set)
    info.rebalance.under_replicated, info.rebalance.unconfirmed = 0, 4
    assert not peer_settled(info, 1)
    info.rebalance.unconfirmed, info.rebalance.rebalancing = 0, True
    assert not peer_settled(info, 1)


def test_a_pass_that_keeps_an_unowned_copy_until_the_ring_settles_does_not_back_off() -> None:
    stores = {u: open_mem_store(BS, 64) for u in ("x", "y")}
    servers = {u: PeerServer(s, uuid=u).start() for u, s in stores.items()}
    live = LiveSet(started=time.time(), max_volume_id=0)  # volume 1 is newer: alive
    reb, close = _lonely_rebalancer(servers, ["x", "y"], settle=0.5, live=live)
    try:
        reb.store.write_block(BlockRef(1, 2, 1), b"payload")
        for s in stores.values():
            s.write_block(BlockRef(1, 2, 1), b"payload")  # every owner already has it
        first = reb.run_pass()
        assert first.pushed_blocks == 0 and first.under_replicated == 0 and first.kept == 1
        assert not first.clean and reb.due()  # the copy still has to go: no back-off
        assert wait_until(lambda: reb.run_pass().deleted == 1, 3.0)
        assert reb.store.used_blocks() == 0
        assert reb.run_pass().clean and not reb.due()
    finally:
        close()
        for srv in servers.values():
            srv.stop()
        for s in stores.values():
            s.close()
