"""Strict-but-available writes: deferred remote flushes, flush-time re-replication, boot ids.

3 in-process gRPC peers on 127.0.0.1 (mem stores), ketama ring, R = 2.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from torus_core.distributor import DistributorTimeouts, WriteLevel
from torus_core.errors import ReplicationFailed
from torus_core.refs import BlockRef
from torus_core.ring.ketama import KetamaRing
from torus_core.rpc.server import PeerServer
from torus_core.testing.distributor import LocalCluster

BS = 4096
PEERS = ["peer-a", "peer-b", "peer-c"]
FAST = DistributorTimeouts(read_peer=0.5, read_peer_max=1.0, read_attempts=2, read_total=3.0, write=2.0)


def data(seed: int) -> bytes:
    return bytes((seed * 13 + i) % 256 for i in range(BS))


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(PEERS, lambda members: KetamaRing(members, replication=2), block_size=BS) as c:
        yield c


def refs_first(cluster: LocalCluster, first: str, n: int = 1) -> list[BlockRef]:
    out = [
        BlockRef(3, 1, i) for i in range(5000) if cluster.ring.get_peers(BlockRef(3, 1, i)).owners[0] == first
    ]
    return out[:n]


def third(cluster: LocalCluster, ref: BlockRef) -> str:
    return cluster.ring.get_peers(ref).peers[2]


def test_writes_are_not_flushed_remotely_until_flush_which_flushes_exactly_the_peers_written(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST)
    ref = refs_first(cluster, "peer-a")[0]
    client.write_block(ref, data(1))
    owners = set(cluster.ring.get_peers(ref).owners)
    assert cluster.holders(ref) == owners
    assert all(s.stats["Flush"] == 0 for s in cluster.servers.values())
    client.flush()
    flushed = {u for u, s in cluster.servers.items() if s.stats["Flush"] == 1}
    assert flushed == owners
    client.flush()  # nothing new: no further Flush calls
    assert sum(s.stats["Flush"] for s in cluster.servers.values()) == 2


def test_durable_mode_flushes_on_every_put_and_needs_no_flush_rpc(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, defer_flush=False)
    ref = refs_first(cluster, "peer-b")[0]
    client.write_block(ref, data(2))
    client.flush()
    assert sum(s.stats["Flush"] for s in cluster.servers.values()) == 0
    assert cluster.holders(ref) == set(cluster.ring.get_peers(ref).owners)


def test_a_peer_lost_between_write_and_flush_has_its_blocks_rewritten_to_the_next_peer(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST)
    refs = refs_first(cluster, "peer-c", 5)
    client.write_blocks([(r, data(i)) for i, r in enumerate(refs)])
    cluster.stop("peer-c")  # its copies were never flushed: they do not count
    client.flush()
    assert client.stats.flush_rewrites == len(refs)
    for ref in refs:
        survivors = cluster.holders(ref) - {"peer-c"}
        assert survivors == {cluster.ring.get_peers(ref).owners[1], third(cluster, ref)}
    # the rewrite was durable: the third peer flushed before acknowledging (PutBlocks without defer)
    assert client.get_block(refs[0]) == data(0)


def test_a_peer_restarted_between_write_and_flush_does_not_count_for_the_old_writes(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST)
    ref = refs_first(cluster, "peer-a")[0]
    client.write_block(ref, data(3))
    old = cluster.servers["peer-a"]
    port = old.port
    old.stop(grace=0)
    # same store, same address, new process incarnation (new boot id)
    cluster.servers["peer-a"] = PeerServer(
        cluster.stores["peer-a"], uuid="peer-a", address=f"127.0.0.1:{port}"
    ).start()
    client.flush()
    assert client.stats.flush_rewrites == 1
    assert third(cluster, ref) in cluster.holders(ref)


def test_a_failed_flush_keeps_the_writes_pending_and_a_retry_completes_them(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, write_level=WriteLevel.ALL)
    ref = refs_first(cluster, "peer-b")[0]
    client.write_block(ref, data(4))
    second = cluster.ring.get_peers(ref).owners[1]
    for p in ("peer-b", second):
        client.peers.set_down(p)  # both owners unreachable now: only one peer is left
    with pytest.raises(ReplicationFailed):
        client.flush()
    for p in ("peer-b", second):
        client.peers.set_down(p, False)
    client.flush()  # the owners are back and flush their copies
    assert cluster.servers["peer-b"].stats["Flush"] >= 1
    assert {"peer-b", second} <= cluster.holders(ref)


def test_unflushed_bytes_beyond_the_bound_force_a_flush(cluster: LocalCluster) -> None:
    client = cluster.client(timeouts=FAST, max_unflushed_bytes=4 * BS)
    for i in range(6):
        client.write_block(BlockRef(4, 1, i), data(i))
    assert sum(s.stats["Flush"] for s in cluster.servers.values()) >= 2


# --- write-behind ------------------------------------------------------------------------------


def test_write_behind_batches_one_put_per_peer_and_flush_makes_every_block_placed(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST, write_behind=True)
    items = [(BlockRef(5, 1, i), data(i)) for i in range(40)]
    for ref, d in items:  # one block per call, like a volume evicting dirty blocks
        client.write_block(ref, d)
        assert client.get_block(ref) == d  # readable while queued or in flight
    client.flush()
    for ref, _ in items:
        assert cluster.holders(ref) == set(cluster.ring.get_peers(ref).owners)
    # far fewer PutBlocks than blocks x R: queued blocks travel together
    assert sum(s.stats["PutBlocks"] for s in cluster.servers.values()) < len(items) * 2


def test_write_behind_reports_replication_failure_at_flush_and_keeps_the_blocks_for_a_retry(
    cluster: LocalCluster,
) -> None:
    client = cluster.client(timeouts=FAST, write_behind=True, read_cache_bytes=0)
    ref = refs_first(cluster, "peer-a")[0]
    for p in ("peer-a", "peer-b"):
        client.peers.set_down(p)  # only peer-c is reachable: R = 2 cannot be met
    client.write_block(ref, data(6))  # accepted into the queue
    with pytest.raises(ReplicationFailed):
        client.flush()
    assert client.get_block(ref) == data(6)  # still held, still readable
    for p in ("peer-a", "peer-b"):
        client.peers.set_down(p, False)
    client.flush()
    assert len(cluster.holders(ref)) >= 2
