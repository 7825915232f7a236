"""The Distributor over a real in-process cluster: 3 gRPC peers on 127.0.0.1, ketama ring, R=2."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torus_core.distributor import Distributor, DistributorTimeouts, PeerDirectory, ReadLevel, WriteLevel
from torus_core.errors import (
    BlockExists,
    BlockNotExist,
    Closed,
    ConfigError,
    CorruptBlock,
    InvalidArgument,
    NoPeer,
    NoPeersBlock,
    NotSupported,
    ReplicationFailed,
    StaleRing,
)
from torus_core.refs import BlockRef
from torus_core.ring.base import RingMember
from torus_core.ring.ketama import KetamaRing
from torus_core.ring.mod import ModRing
from torus_core.testing.distributor import LocalCluster, mem_store_factory

BS = 4096
PEERS = ["peer-a", "peer-b", "peer-c"]
FAST = DistributorTimeouts(read_peer=0.5, read_peer_max=1.0, read_attempts=3, read_total=4.0, write=2.0)


def data(seed: int) -> bytes:
    return bytes((seed * 7 + i) % 256 for i in range(BS))


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(PEERS, lambda members: KetamaRing(members, replication=2), block_size=BS) as c:
        yield c


def refs_owned(cluster: LocalCluster, n: int, *, first: str | None = None, start: int = 0) -> list[BlockRef]:
    """``n`` refs (optionally only those whose first owner is ``first``)."""
    out: list[BlockRef] = []
    i = start
    while len(out) < n and i < start + 10_000:
        ref = BlockRef(1, 1, i)
        if first is None or cluster.ring.get_peers(ref).owners[0] == first:
            out.append(ref)
        i += 1
    assert len(out) == n
    return out


def owners(cluster: LocalCluster, ref: BlockRef) -> list[str]:
    return cluster.ring.get_peers(ref).owners


# --- writes ------------------------------------------------------------------------------------


def test_write_all_puts_the_block_on_both_owners_and_nowhere_else(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    for i, ref in enumerate(refs_owned(cluster, 12)):
        client.write_block(ref, data(i), level=WriteLevel.ALL)
        assert cluster.holders(ref) == set(owners(cluster, ref))
        assert len(owners(cluster, ref)) == 2


def next_peer(cluster: LocalCluster, ref: BlockRef, skip: str) -> str:
    """The first peer of ``ref``'s permutation after its owners, other than ``skip``."""
    return next(p for p in cluster.ring.get_peers(ref).peers[2:] if p != skip)


def test_write_all_hands_off_to_the_next_peer_when_an_owner_is_down(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, write_level=WriteLevel.ALL)
    ref = refs_owned(cluster, 1, first="peer-b")[0]
    cluster.stop("peer-b")
    start = time.monotonic()
    client.write_block(ref, data(1))
    client.flush()
    assert time.monotonic() - start < 5.0
    other = owners(cluster, ref)[1]
    # R = 2 acknowledgements from 2 distinct live peers: the other owner and the next peer
    assert cluster.holders(ref) == {other, next_peer(cluster, ref, "peer-b")}
    assert client.get_block(ref) == data(1)


def test_write_all_to_a_peer_marked_down_hands_off_without_calling_it(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, write_level=WriteLevel.ALL)
    ref = refs_owned(cluster, 1, first="peer-c")[0]
    client.peers.set_down("peer-c")
    client.write_block(ref, data(5))
    client.flush()
    assert cluster.servers["peer-c"].stats["PutBlocks"] == 0
    assert cluster.servers["peer-c"].stats["Flush"] == 0
    assert cluster.holders(ref) == {owners(cluster, ref)[1], next_peer(cluster, ref, "peer-c")}


def test_write_all_fails_typed_and_retryable_when_fewer_than_r_peers_are_reachable(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST, write_level=WriteLevel.ALL)
    ref = refs_owned(cluster, 1, first="peer-b")[0]
    survivor = owners(cluster, ref)[1]
    for p in PEERS:
        if p != survivor:
            cluster.stop(p)
    start = time.monotonic()
    with pytest.raises(ReplicationFailed) as info:
        client.write_block(ref, data(1))
    assert time.monotonic() - start < 5.0
    assert info.value.retryable
    assert info.value.acked == [survivor]
    assert "peer-b" in info.value.failed and len(info.value.failed) == 2


def test_write_one_succeeds_when_one_owner_is_down(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, write_level=WriteLevel.ONE)
    ref = refs_owned(cluster, 1, first="peer-b")[0]
    cluster.stop("peer-b")
    client.write_block(ref, data(2))
    assert cluster.holders(ref) == {owners(cluster, ref)[1]}


def test_write_one_hands_off_when_every_owner_is_down_and_fails_when_every_peer_is(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST, write_level=WriteLevel.ONE)
    ref, ref2 = refs_owned(cluster, 2)
    for p in owners(cluster, ref):
        cluster.stop(p)
    client.write_block(ref, data(3))
    assert cluster.holders(ref) == set(PEERS) - set(owners(cluster, ref))
    for p in PEERS:
        cluster.stop(p)
    with pytest.raises(ReplicationFailed):
        client.write_block(ref2, data(3))


def test_per_request_level_overrides_the_default(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, write_level=WriteLevel.ONE)
    ref = refs_owned(cluster, 1, first="peer-c")[0]
    cluster.stop("peer-c")
    cluster.stop(next_peer(cluster, ref, "peer-c"))  # only one peer left: "all" cannot be met
    with pytest.raises(ReplicationFailed):
        client.write_block(ref, data(4), level=WriteLevel.ALL)
    client.write_block(ref, data(4))  # default "one" succeeds
    client.write_block(ref, data(4), level="one")


def test_write_local_keeps_the_block_in_the_write_cache_only(cluster: LocalCluster) -> None:
    cache = mem_store_factory()(BS, 8)
    client = cluster.client(local_store=cache, write_level=WriteLevel.LOCAL, timeouts=FAST)
    ref = refs_owned(cluster, 1)[0]
    client.write_block(ref, data(5))
    assert cache.get_block(ref) == data(5)
    assert cluster.holders(ref) == set()
    assert client.get_block(ref) == data(5)
    assert client.used_blocks() == 1


def test_write_local_falls_back_to_owners_when_the_write_cache_is_full(cluster: LocalCluster) -> None:
    cache = mem_store_factory()(BS, 1)
    client = cluster.client(local_store=cache, write_level=WriteLevel.LOCAL, timeouts=FAST)
    first, second = refs_owned(cluster, 2)
    client.write_blocks([(first, data(1)), (second, data(2))])
    assert cache.has_block(first) and not cache.has_block(second)
    assert cluster.holders(first) == set()
    assert cluster.holders(second) and cluster.holders(second) <= set(owners(cluster, second))


def test_write_level_local_without_a_local_store_is_a_config_error(cluster: LocalCluster) -> None:
    with pytest.raises(ConfigError):
        cluster.client(write_level="local")
    client = cluster.client()
    with pytest.raises(InvalidArgument):
        client.write_block(BlockRef(1, 1, 1), data(1), level=WriteLevel.LOCAL)


def test_write_blocks_sends_one_put_per_peer_for_a_batch(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    items = [(ref, data(i)) for i, ref in enumerate(refs_owned(cluster, 30))]
    client.write_blocks(items)
    for uuid, server in cluster.servers.items():
        assert server.stats["PutBlocks"] == 1, uuid
    for ref, d in items:
        assert cluster.holders(ref) == set(owners(cluster, ref))
        assert cluster.stores[owners(cluster, ref)[0]].inner.get_block(ref) == d


def test_peer_distributor_writes_its_own_copy_locally(cluster: LocalCluster) -> None:
    dist = cluster.peer_distributor("peer-a", timeouts=FAST)
    ref = refs_owned(cluster, 1, first="peer-a")[0]
    dist.write_block(ref, data(6))
    assert cluster.holders(ref) == set(owners(cluster, ref))
    assert cluster.servers["peer-a"].stats["PutBlocks"] == 0


def test_conflicting_content_under_an_existing_ref_raises_block_exists(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    ref = refs_owned(cluster, 1)[0]
    client.write_block(ref, data(1))
    client.write_block(ref, data(1))  # identical rewrite is fine
    other = cluster.client("client-2", timeouts=FAST)
    with pytest.raises(BlockExists):
        other.write_block(ref, data(2))


def test_oversized_data_is_rejected_before_any_rpc(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    with pytest.raises(InvalidArgument):
        client.write_block(BlockRef(1, 1, 1), bytes(BS + 1))
    assert all(s.stats["PutBlocks"] == 0 for s in cluster.servers.values())


def test_write_with_an_empty_ring_raises_no_peer(cluster: LocalCluster) -> None:
    client = Distributor("c", None, KetamaRing([], replication=2), PeerDirectory(), block_size=BS)
    try:
        with pytest.raises(NoPeer):
            client.write_block(BlockRef(1, 1, 1), data(1))
    finally:
        client.close()


# --- reads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", list(ReadLevel))
def test_every_read_level_returns_the_written_bytes(cluster: LocalCluster, level: ReadLevel) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0, read_level=level)
    items = [(ref, data(i)) for i, ref in enumerate(refs_owned(cluster, 6))]
    writer.write_blocks(items)
    for ref, d in items:
        assert reader.get_block(ref) == d


@pytest.mark.parametrize("level", list(ReadLevel))
def test_read_falls_back_to_the_second_owner_when_the_first_is_down(
    cluster: LocalCluster, level: ReadLevel
) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1, first="peer-a")[0]
    writer.write_block(ref, data(9))
    cluster.stop("peer-a")
    reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0)
    start = time.monotonic()
    assert reader.get_block(ref, level=level) == data(9)
    assert time.monotonic() - start < 3.0


def test_read_with_every_peer_down_fails_bounded_with_no_peers_block(cluster: LocalCluster) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1)[0]
    writer.write_block(ref, data(1))
    for p in PEERS:
        cluster.stop(p)
    reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0)
    for level in ReadLevel:
        start = time.monotonic()
        with pytest.raises(NoPeersBlock) as info:
            reader.get_block(ref, level=level)
        assert info.value.retryable
        assert time.monotonic() - start <= FAST.read_total + 1.0


def test_read_of_a_block_no_peer_has_raises_block_not_exist(cluster: LocalCluster) -> None:
    reader = cluster.client(timeouts=FAST)
    for level in ReadLevel:
        with pytest.raises(BlockNotExist):
            reader.get_block(BlockRef(5, 5, 5), level=level)


def test_spread_read_when_the_only_owner_is_self_returns_without_hanging() -> None:
    with LocalCluster(PEERS, lambda m: ModRing(m, replication=1), block_size=BS) as cluster:
        ref = refs_owned(cluster, 1, first="peer-a")[0]
        dist = cluster.peer_distributor(
            "peer-a", read_level=ReadLevel.SPREAD, timeouts=FAST, read_cache_bytes=0
        )
        dist.write_block(ref, data(3))
        assert dist.get_block(ref) == data(3)
        missing = refs_owned(cluster, 1, first="peer-a", start=ref.index + 1)[0]
        start = time.monotonic()
        with pytest.raises(BlockNotExist):
            dist.get_block(missing)
        assert time.monotonic() - start < 2.0


def test_cache_hit_avoids_any_rpc(cluster: LocalCluster) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1)[0]
    writer.write_block(ref, data(1))
    reader = cluster.client("reader", timeouts=FAST)
    assert reader.get_block(ref) == data(1)
    calls = sum(s.stats["GetBlock"] for s in cluster.servers.values())
    assert calls == 1
    for _ in range(5):
        assert reader.get_block(ref) == data(1)
    assert sum(s.stats["GetBlock"] for s in cluster.servers.values()) == calls
    assert reader.cache.hits == 5


def test_written_blocks_are_cached_write_through(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    ref = refs_owned(cluster, 1)[0]
    client.write_block(ref, b"abc")
    assert client.get_block(ref) == b"abc" + bytes(BS - 3)
    assert sum(s.stats["GetBlock"] for s in cluster.servers.values()) == 0


def test_peer_marked_down_is_skipped_without_waiting(cluster: LocalCluster) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1, first="peer-b")[0]
    writer.write_block(ref, data(1))
    reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0)
    reader.peers.set_down("peer-b")
    assert reader.get_block(ref) == data(1)
    assert cluster.servers["peer-b"].stats["GetBlock"] == 0


# --- repair ------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", list(ReadLevel))
def test_missing_copy_on_an_owner_is_repaired_by_a_read(cluster: LocalCluster, level: ReadLevel) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1, first="peer-c")[0]
    writer.write_block(ref, data(4))
    cluster.stores["peer-c"].inner.delete_block(ref)
    reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0, read_level=level)
    assert reader.get_block(ref) == data(4)
    assert reader.drain_repairs(5.0)
    assert cluster.stores["peer-c"].inner.get_block(ref) == data(4)
    assert reader.stats.repairs == 1


def test_corrupt_copy_on_an_owner_is_read_around_and_replaced(cluster: LocalCluster) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1, first="peer-a")[0]
    writer.write_block(ref, data(5))
    cluster.stores["peer-a"].corrupt.add(ref)
    reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0)
    assert reader.get_block(ref) == data(5)
    assert reader.drain_repairs(5.0)
    assert ref not in cluster.stores["peer-a"].corrupt  # the bad copy was deleted and rewritten
    assert cluster.stores["peer-a"].get_block(ref) == data(5)


def test_local_corrupt_copy_is_repaired_from_a_remote_owner(cluster: LocalCluster) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1, first="peer-b")[0]
    writer.write_block(ref, data(6))
    cluster.stores["peer-b"].corrupt.add(ref)
    dist = cluster.peer_distributor("peer-b", timeouts=FAST, read_cache_bytes=0)
    assert dist.get_block(ref) == data(6)
    assert dist.drain_repairs(5.0)
    assert cluster.stores["peer-b"].get_block(ref) == data(6)


def test_every_copy_corrupt_raises_corrupt_block(cluster: LocalCluster) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1)[0]
    writer.write_block(ref, data(7))
    for p in owners(cluster, ref):
        cluster.stores[p].corrupt.add(ref)
    reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0)
    with pytest.raises(CorruptBlock):
        reader.get_block(ref)


def test_failed_repair_is_counted_and_the_read_still_succeeds(cluster: LocalCluster) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref = refs_owned(cluster, 1, first="peer-a")[0]
    writer.write_block(ref, data(8))
    store_a = cluster.stores["peer-a"].inner
    store_a.delete_block(ref)
    for i in range(store_a.num_blocks() - store_a.used_blocks()):  # fill peer-a: the repair cannot land
        store_a.write_block(BlockRef(99, 99, i), b"x")
    reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0)
    assert reader.get_block(ref) == data(8)
    assert reader.drain_repairs(10.0)
    assert (reader.stats.repairs, reader.stats.repair_failures) == (0, 1)
    assert not store_a.has_block(ref)


# --- other BlockStore methods, ring handling, lifecycle ----------------------------------------


def test_has_block_asks_the_owners(cluster: LocalCluster) -> None:
    writer = cluster.client("writer", timeouts=FAST)
    ref, absent = refs_owned(cluster, 2)
    writer.write_block(ref, data(1))
    reader = cluster.client("reader", timeouts=FAST)
    assert reader.has_block(ref)
    assert not reader.has_block(absent)
    for p in owners(cluster, absent):
        cluster.stop(p)
    with pytest.raises(NoPeersBlock):
        reader.has_block(absent)


def test_local_operations_act_on_the_local_store_only(cluster: LocalCluster) -> None:
    dist = cluster.peer_distributor("peer-a", timeouts=FAST)
    ref = refs_owned(cluster, 1, first="peer-a")[0]
    dist.write_block(ref, data(1))
    assert dist.num_blocks() == cluster.stores["peer-a"].num_blocks()
    assert dist.used_blocks() == 1
    assert list(dist.iter_refs()) == [ref]
    dist.flush()
    dist.delete_block(ref)
    assert not cluster.stores["peer-a"].has_block(ref)
    assert cluster.holders(ref) == set(owners(cluster, ref)) - {"peer-a"}
    with pytest.raises(BlockNotExist):
        dist.delete_block(ref)


def test_client_without_local_store_reports_no_local_blocks(cluster: LocalCluster) -> None:
    client = cluster.client()
    assert (client.num_blocks(), client.used_blocks(), list(client.iter_refs())) == (0, 0, [])
    client.flush()
    with pytest.raises(BlockNotExist):
        client.delete_block(BlockRef(1, 1, 1))


def test_set_ring_accepts_newer_ignores_equal_and_refuses_older(cluster: LocalCluster) -> None:
    members = [RingMember(u, 1, cluster.addresses[u]) for u in PEERS]
    client = cluster.client()
    v1 = cluster.ring
    v2 = KetamaRing(members[:2], replication=2, version=2)
    v5 = KetamaRing(members, replication=1, version=5)
    assert client.set_ring(v2) is True
    assert client.ring is v2
    assert client.set_ring(KetamaRing(members[:2], replication=2, version=2)) is False
    assert client.ring is v2
    with pytest.raises(StaleRing):
        client.set_ring(v1)
    assert client.ring is v2
    assert client.set_ring(v5) is True  # versions may jump
    assert client.ring.version == 5


def test_new_ring_changes_where_blocks_are_written(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    only_c = ModRing([RingMember("peer-c", 1, cluster.addresses["peer-c"])], replication=1, version=2)
    client.set_ring(only_c)
    ref = BlockRef(3, 3, 3)
    client.write_block(ref, data(1))
    assert cluster.holders(ref) == {"peer-c"}


def test_peer_address_change_drops_the_old_channel(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    ref = refs_owned(cluster, 1)[0]
    client.write_block(ref, data(1))
    old = cluster.addresses["peer-a"]
    assert old in client.pool.addresses()
    client.peers.update({"peer-a": "127.0.0.1:1"})
    assert old not in client.pool.addresses()


def test_closed_distributor_raises_closed(cluster: LocalCluster) -> None:
    client = cluster.client()
    client.close()
    client.close()  # idempotent
    with pytest.raises(Closed):
        client.get_block(BlockRef(1, 1, 1))
    with pytest.raises(Closed):
        client.write_block(BlockRef(1, 1, 1), b"")


def test_constructor_validates_its_configuration() -> None:
    ring = ModRing([], replication=1)
    with pytest.raises(ConfigError):
        Distributor("x", None, ring, PeerDirectory())  # no block size
    with pytest.raises(ConfigError):
        Distributor("x", None, ring, PeerDirectory(), block_size=BS, read_level="fastest")
    store = mem_store_factory()(BS, 1)
    with pytest.raises(ConfigError):
        Distributor("x", store, ring, PeerDirectory(), block_size=BS * 2)
    with pytest.raises(InvalidArgument):
        DistributorTimeouts(read_attempts=0)
    with pytest.raises(NotSupported):
        Distributor.open(None)  # type: ignore[arg-type]
    store.close()


def test_block_level_retries_a_transient_failure_while_seq_gives_up_after_one_pass() -> None:
    with LocalCluster(PEERS, lambda m: ModRing(m, replication=1), block_size=BS) as cluster:
        ref = refs_owned(cluster, 1, first="peer-b")[0]
        cluster.client("writer", timeouts=FAST).write_block(ref, data(1))
        reader = cluster.client("reader", timeouts=FAST, read_cache_bytes=0)
        store_b = cluster.stores["peer-b"]
        store_b.fail_gets = 1
        with pytest.raises(NoPeersBlock):
            reader.get_block(ref, level=ReadLevel.SEQ)
        store_b.fail_gets = 2
        assert reader.get_block(ref, level=ReadLevel.BLOCK) == data(1)
        assert store_b.fail_gets == 0
        store_b.fail_gets = FAST.read_attempts
        with pytest.raises(NoPeersBlock):
            reader.get_block(ref, level=ReadLevel.BLOCK)


def _fill(cluster: LocalCluster, peer: str) -> list[BlockRef]:
    inner = cluster.stores[peer].inner
    filler = [BlockRef(99, 99, i) for i in range(inner.used_blocks(), inner.num_blocks())]
    for r in filler:
        inner.write_block(r, b"x")
    return filler


def test_write_to_full_owners_raises_out_of_space_once_the_space_wait_is_over(cluster: LocalCluster) -> None:
    from dataclasses import replace

    from torus_core.errors import OutOfSpace

    client = cluster.client(timeouts=replace(FAST, space_wait=0.5))
    ref = refs_owned(cluster, 1)[0]
    for p in owners(cluster, ref):
        _fill(cluster, p)
    started = time.monotonic()
    with pytest.raises(OutOfSpace, match=r"after waiting 0\.5 s for space"):
        client.write_block(ref, data(1))
    assert 0.5 <= time.monotonic() - started < 5.0


def test_once_a_write_waited_in_vain_for_space_later_writes_fail_at_once_until_one_fits(
    cluster: LocalCluster,
) -> None:
    """A writer with many writes in flight sees ENOSPC within seconds, not space_wait per write;
    the first write that fits again restores the wait for the next full spell."""
    from dataclasses import replace

    from torus_core.errors import OutOfSpace

    client = cluster.client(timeouts=replace(FAST, space_wait=1.0), read_cache_bytes=0)
    ref, other, third = refs_owned(cluster, 3)
    fillers = {p: _fill(cluster, p) for p in PEERS}
    with pytest.raises(OutOfSpace, match=r"after waiting 1 s for space"):
        client.write_block(ref, data(1))
    started = time.monotonic()
    for _ in range(5):
        with pytest.raises(OutOfSpace, match="already found full"):
            client.write_block(other, data(2))
    assert time.monotonic() - started < 1.0, "each later write waited for space again"
    for p in PEERS:
        cluster.stores[p].inner.delete_block(fillers[p][0])
    client.write_block(other, data(2))  # room again: one attempt is enough
    for p in owners(cluster, other):
        assert cluster.stores[p].inner.get_block(other) == data(2)
    for p in PEERS:
        _fill(cluster, p)
    started = time.monotonic()
    with pytest.raises(OutOfSpace, match=r"after waiting 1 s for space"):
        client.write_block(third, data(3))
    assert time.monotonic() - started >= 0.9


def test_a_write_short_of_space_waits_for_gc_to_free_room_and_then_succeeds(cluster: LocalCluster) -> None:
    """Every peer full (one of them down): the write is retried while room is freed (as GC frees
    superseded blocks) instead of failing at once."""
    import threading
    from dataclasses import replace

    client = cluster.client(timeouts=replace(FAST, space_wait=10.0), read_cache_bytes=0)
    ref = refs_owned(cluster, 1)[0]
    fillers = {p: _fill(cluster, p) for p in PEERS}
    down = next(p for p in PEERS if p not in owners(cluster, ref))
    client.peers.set_down(down)

    def free_room() -> None:
        time.sleep(0.5)
        for p in owners(cluster, ref):
            cluster.stores[p].inner.delete_block(fillers[p][0])

    t = threading.Thread(target=free_room)
    t.start()
    started = time.monotonic()
    client.write_block(ref, data(1))
    t.join(5)
    assert time.monotonic() - started >= 0.4
    for p in owners(cluster, ref):
        assert cluster.stores[p].inner.get_block(ref) == data(1)


def test_full_reachable_peers_with_the_rest_down_is_out_of_space_not_a_replication_failure(
    cluster: LocalCluster,
) -> None:
    from dataclasses import replace

    from torus_core.errors import OutOfSpace

    client = cluster.client(timeouts=replace(FAST, space_wait=0.2))
    ref = refs_owned(cluster, 1)[0]
    first, second = owners(cluster, ref)[:2]
    _fill(cluster, first)
    client.peers.set_down(second)
    with pytest.raises(OutOfSpace):
        client.write_block(ref, data(1))


_volumes = iter(range(1000, 1_000_000))


@given(
    indexes=st.lists(st.integers(0, 10_000), min_size=1, max_size=8, unique=True),
    down=st.sampled_from([None, *PEERS]),
    level=st.sampled_from([WriteLevel.ALL, WriteLevel.ONE]),
)
@settings(max_examples=25)
def test_writes_land_on_the_first_live_peers_of_the_permutation_and_meet_the_level(
    cluster: LocalCluster, indexes: list[int], down: str | None, level: WriteLevel
) -> None:
    volume = next(_volumes)
    client = cluster.client(f"prop-{volume}", timeouts=FAST, read_cache_bytes=0)
    if down is not None:
        client.peers.set_down(down)
    items = [(BlockRef(volume, 1, i), data(i)) for i in indexes]
    client.write_blocks(items, level=level)
    client.flush()
    for ref, d in items:
        perm = cluster.ring.get_peers(ref)
        live = [p for p in perm.peers if p != down]
        holders = cluster.holders(ref)
        assert down not in holders
        if level is WriteLevel.ALL:
            # R distinct peers: the owners, a down owner replaced by the next live peer
            assert holders == set(live[: perm.replication])
        else:
            # "one" aims at the same peers but returns after the first acknowledgement
            assert holders and holders <= set(live[: perm.replication])
        assert client.get_block(ref) == d
    client.close()
