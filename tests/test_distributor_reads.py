"""Distributor read paths: ranged reads (cache, local store, one peer), reads that must not
block, prefetch and sequential read-ahead -- over 3 real gRPC peers on 127.0.0.1, R=2."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from torus_core.blockstore import nonblocking_reads, reads_may_block
from torus_core.distributor import DistributorTimeouts
from torus_core.distributor.reads import HOT_RANGED_READS
from torus_core.errors import BlockNotExist, InvalidArgument, WouldBlock
from torus_core.refs import BlockRef
from torus_core.ring.ketama import KetamaRing
from torus_core.testing.distributor import LocalCluster

BS = 4096
PEERS = ["peer-a", "peer-b", "peer-c"]
FAST = DistributorTimeouts(read_peer=0.5, read_peer_max=1.0, read_attempts=2, read_total=3.0, write=2.0)


def data(seed: int) -> bytes:
    return bytes((seed * 7 + i) % 256 for i in range(BS))


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(PEERS, lambda members: KetamaRing(members, replication=2), block_size=BS) as c:
        yield c


def seed_blocks(cluster: LocalCluster, refs: list[BlockRef]) -> None:
    """Store each ref on its owners directly (no distributor cache involved)."""
    for i, ref in enumerate(refs):
        for uuid in cluster.ring.get_peers(ref).owners:
            cluster.stores[uuid].write_block(ref, data(i))


def get_calls(cluster: LocalCluster) -> int:
    return sum(s.stats["GetBlock"] for s in cluster.servers.values())


def not_on(cluster: LocalCluster, uuid: str, n: int) -> list[BlockRef]:
    """``n`` refs that ``uuid`` does not own."""
    refs = [BlockRef(1, 1, i) for i in range(400)]
    out = [r for r in refs if uuid not in cluster.ring.get_peers(r).owners][:n]
    assert len(out) == n
    return out


def test_a_ranged_read_with_a_full_cache_fetches_only_the_range(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=BS)
    ref, other = BlockRef(1, 1, 5), BlockRef(1, 1, 50)
    seed_blocks(cluster, [ref, other])
    client.get_block(other)  # the cache is now full
    assert client.read_block_range(ref, 100, 200) == data(0)[100:300]
    assert client.stats.ranged_reads == 1
    assert client.reads.prefetcher.started == 0  # no whole-block fetch behind it
    assert ref not in client.cache


def test_a_random_ranged_read_with_room_in_the_cache_still_fetches_only_the_range(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=16 * BS)
    ref = BlockRef(1, 1, 5)
    seed_blocks(cluster, [ref])
    assert client.read_block_range(ref, 100, 200) == data(0)[100:300]
    assert client.read_block_range(ref, 2000, 10) == data(0)[2000:2010]  # not where it ended
    assert client.stats.ranged_reads == 2 and client.stats.remote_read_bytes == 210
    assert client.reads.prefetcher.started == 0 and ref not in client.cache


def test_a_block_read_by_range_often_is_pulled_into_the_cache(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=16 * BS)
    ref = BlockRef(1, 1, 5)
    seed_blocks(cluster, [ref])
    for k in range(HOT_RANGED_READS - 1):
        client.read_block_range(ref, 1000 - 100 * k, 10)
    assert client.reads.prefetcher.started == 0
    client.read_block_range(ref, 3000, 10)
    assert client.reads.prefetcher.started == 1
    end = time.monotonic() + 4
    while time.monotonic() < end and ref not in client.cache:
        time.sleep(0.01)
    calls = get_calls(cluster)
    assert client.read_block_range(ref, 2000, 10) == data(0)[2000:2010]
    assert get_calls(cluster) == calls


def test_a_large_range_reads_and_caches_the_whole_block(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=16 * BS)
    ref = BlockRef(1, 1, 6)
    seed_blocks(cluster, [ref])
    assert client.read_block_range(ref, 0, BS // 2) == data(0)[: BS // 2]
    assert ref in client.cache and client.stats.ranged_reads == 0
    calls = get_calls(cluster)
    assert client.read_block_range(ref, BS // 2, BS // 2) == data(0)[BS // 2 :]
    assert get_calls(cluster) == calls  # the second half came from the cache


def test_a_ranged_read_of_a_local_block_asks_no_peer(cluster: LocalCluster) -> None:
    dist = cluster.peer_distributor("peer-a", timeouts=FAST, read_cache_bytes=0)
    refs = [
        r for r in (BlockRef(1, 2, i) for i in range(100)) if "peer-a" in cluster.ring.get_peers(r).owners
    ]
    seed_blocks(cluster, refs[:3])
    calls = get_calls(cluster)
    for i, ref in enumerate(refs[:3]):
        assert dist.read_block_range(ref, 8, 64) == data(i)[8:72]
    assert get_calls(cluster) == calls
    assert dist.stats.local_reads == 3


def test_a_whole_block_range_is_a_verified_get_block(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    ref = BlockRef(1, 1, 7)
    seed_blocks(cluster, [ref])
    assert client.read_block_range(ref, 0, BS) == data(0)
    assert ref in client.cache


@pytest.mark.parametrize("start,length", [(-1, 1), (0, 0), (BS - 1, 2), (0, BS + 1)])
def test_a_range_outside_the_block_is_invalid(cluster: LocalCluster, start: int, length: int) -> None:
    client = cluster.client(timeouts=FAST)
    with pytest.raises(InvalidArgument):
        client.read_block_range(BlockRef(1, 1, 1), start, length)


def test_a_ranged_read_of_a_block_no_peer_has_is_block_not_exist(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    with pytest.raises(BlockNotExist):
        client.read_block_range(BlockRef(7, 7, 7), 0, 10)


def test_reads_that_need_a_peer_raise_would_block_inside_nonblocking_reads(cluster: LocalCluster) -> None:
    dist = cluster.peer_distributor("peer-a", timeouts=FAST)
    remote = not_on(cluster, "peer-a", 1)[0]
    local = next(
        r for r in (BlockRef(1, 3, i) for i in range(100)) if "peer-a" in cluster.ring.get_peers(r).owners
    )
    seed_blocks(cluster, [remote, local])
    calls = get_calls(cluster)
    assert reads_may_block()
    with nonblocking_reads():
        assert not reads_may_block()
        with pytest.raises(WouldBlock):
            dist.get_block(remote)
        with pytest.raises(WouldBlock):
            dist.read_block_range(remote, 0, 16)
        assert dist.get_block(local) == data(1)  # the local copy needs no peer
        assert dist.read_block_range(local, 4, 4) == data(1)[4:8]
    assert reads_may_block()
    assert get_calls(cluster) == calls  # nothing was asked of a peer
    assert dist.get_block(remote) == data(0)  # outside the block the same read goes to a peer


def test_prefetch_fills_the_cache_so_later_reads_ask_no_peer(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=64 * BS, readahead=4)
    refs = [BlockRef(2, 1, i) for i in range(6)]
    seed_blocks(cluster, refs)
    assert client.prefetch(refs) == 6  # 2 x readahead may be in flight
    assert client.prefetch(refs) == 0  # in flight or cached: nothing new
    end = time.monotonic() + 5
    while time.monotonic() < end and not all(r in client.cache for r in refs):
        time.sleep(0.01)
    assert all(r in client.cache for r in refs)
    calls = get_calls(cluster)
    assert [client.get_block(r) for r in refs] == [data(i) for i in range(6)]
    assert get_calls(cluster) == calls


def test_prefetch_of_a_missing_block_fails_quietly_and_the_read_reports_it(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST)
    missing = BlockRef(3, 3, 3)
    assert client.prefetch([missing]) == 1
    with pytest.raises(BlockNotExist):
        client.get_block(missing)


def test_sequential_remote_misses_read_ahead_the_next_refs(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=64 * BS, readahead=3)
    refs = [BlockRef(4, 9, i) for i in range(1, 12)]
    seed_blocks(cluster, refs)
    client.get_block(refs[0])
    client.get_block(refs[1])  # a run of two misses: refs 3..5 are fetched ahead
    end = time.monotonic() + 5
    while time.monotonic() < end and not all(r in client.cache for r in refs[2:5]):
        time.sleep(0.01)
    assert all(r in client.cache for r in refs[2:5])
    assert refs[6] not in client.cache


def test_random_misses_do_not_read_ahead(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=64 * BS, readahead=3)
    refs = [BlockRef(5, 9, i) for i in (1, 40, 7, 90, 3)]
    seed_blocks(cluster, refs)
    for ref in refs:
        client.get_block(ref)
    assert client.reads.prefetcher.started == 0


# --- flush of a lone small write ----------------------------------------------------------------


def test_a_write_followed_by_a_flush_is_written_durably_by_the_flush_in_one_round(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST, write_behind=True)
    assert client.replication.write_behind is not None
    client.replication.write_behind.linger = 5.0  # the workers leave a lone block queued; the flush takes it
    for server in cluster.servers.values():
        server.stats.reset()
    ref = BlockRef(6, 1, 1)
    client.write_block(ref, data(3))
    client.flush()
    stats = [s.stats.snapshot() for s in cluster.servers.values()]
    assert sum(s.get("PutBlocks", 0) for s in stats) == 2  # one durable put per owner
    assert sum(s.get("Flush", 0) for s in stats) == 0  # and no deferred put + Flush round
    assert cluster.holders(ref) == set(cluster.ring.get_peers(ref).owners)


def test_a_batch_larger_than_the_linger_threshold_is_replicated_without_a_flush(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST, write_behind=True)
    assert client.replication.write_behind is not None
    client.replication.write_behind.linger = 5.0
    client.replication.write_behind.batch_bytes = 2 * BS  # two queued blocks fill a batch: no lingering
    refs = [BlockRef(6, 2, i) for i in range(2)]
    client.write_blocks([(r, data(i)) for i, r in enumerate(refs)])
    end = time.monotonic() + 4
    while time.monotonic() < end and client.replication.write_behind.pending_bytes:
        time.sleep(0.01)
    assert client.replication.write_behind.pending_bytes == 0
    assert all(cluster.holders(r) == set(cluster.ring.get_peers(r).owners) for r in refs)


def test_without_a_read_cache_nothing_is_fetched_ahead(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=0, readahead=3)
    refs = [BlockRef(8, 1, i) for i in range(1, 6)]
    seed_blocks(cluster, refs)
    calls = get_calls(cluster)
    assert [client.get_block(r) for r in refs] == [data(i) for i in range(5)]
    assert client.prefetch(refs) == 0
    assert client.reads.prefetcher.started == 0
    assert get_calls(cluster) - calls == 5  # one GetBlock per read, none wasted


def test_the_read_cache_holds_only_blocks_this_peer_does_not_store(cluster: LocalCluster) -> None:
    dist = cluster.peer_distributor("peer-a", timeouts=FAST, read_cache_bytes=64 * BS)
    refs = [BlockRef(9, 1, i) for i in range(60)]
    mine = [r for r in refs if "peer-a" in cluster.ring.get_peers(r).owners][:3]
    theirs = [r for r in refs if "peer-a" not in cluster.ring.get_peers(r).owners][:3]
    dist.write_blocks([(r, data(i)) for i, r in enumerate(mine + theirs)])
    assert not any(r in dist.cache for r in mine)  # read back from the local store
    assert all(r in dist.cache for r in theirs)
    dist.cache.clear()
    local = next(
        r for r in (BlockRef(9, 3, i) for i in range(60)) if "peer-a" in cluster.ring.get_peers(r).owners
    )
    remote = not_on(cluster, "peer-a", 1)[0]
    seed_blocks(cluster, [local, remote])
    dist.get_block(local)
    dist.get_block(remote)
    assert local not in dist.cache and remote in dist.cache


def test_with_a_full_cache_a_block_read_by_range_twice_is_pulled_into_the_cache(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST, read_cache_bytes=BS)
    ref, other = BlockRef(10, 1, 5), BlockRef(10, 1, 50)
    seed_blocks(cluster, [ref, other])
    client.get_block(other)  # the cache is now full
    client.read_block_range(ref, 0, 16)
    assert client.reads.prefetcher.started == 0  # once: stays ranged
    client.read_block_range(ref, 16, 16)
    assert client.reads.prefetcher.started == 1  # again: worth caching
    end = time.monotonic() + 4
    while time.monotonic() < end and ref not in client.cache:
        time.sleep(0.01)
    assert ref in client.cache and other not in client.cache
