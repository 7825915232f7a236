"""Cluster volume journals: the Journal* RPCs and RemoteJournalReplicas.

3 in-process gRPC peers on 127.0.0.1, each with a real JournalStore in tmp_path, ketama ring R=2.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from torus_core.errors import InvalidArgument, NotSupported, ReplicationFailed, StaleEpoch
from torus_core.journal.record import Extent, encode_record
from torus_core.journal.remote import RemoteJournalReplicas, journal_ref
from torus_core.journal.replicas import select_replay
from torus_core.journal.store import JournalStore
from torus_core.rpc.server import PeerServer
from torus_core.testing.journal import JournalCluster

#: the built-in blockset layers (tests use no plugin layers)

PEERS = ["peer-a", "peer-b", "peer-c"]
VOL = 7


def rec(seq: int, epoch: int = 1, vol: int = VOL) -> bytes:
    return encode_record(vol, epoch, seq, [Extent(seq * 4096, 4096, bytes([seq % 256]) * 4096)])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[JournalCluster]:
    with JournalCluster(tmp_path, PEERS, replication=2, timeout=2.0) as c:
        yield c


def others(cluster: JournalCluster, volume_id: int = VOL) -> list[str]:
    owners = cluster.ring.get_peers(journal_ref(volume_id)).owners
    return [u for u in PEERS if u not in owners]


def test_append_lands_on_exactly_the_two_replica_peers_durably(
    cluster: JournalCluster, tmp_path: Path
) -> None:
    r = cluster.replicas("client")
    assert r.fence(VOL, 1) == 0
    r.append(VOL, 1, [rec(1), rec(2), rec(3)])
    owners = r.replicas(VOL)
    assert owners == cluster.ring.get_peers(journal_ref(VOL)).owners and len(owners) == 2
    for uuid in owners:
        assert cluster.stored_seqs(uuid, VOL) == [1, 2, 3]
        assert cluster.servers[uuid].stats["JournalAppend"] == 1
    for uuid in others(cluster):
        assert cluster.stored_seqs(uuid, VOL) == []
        assert cluster.servers[uuid].stats["JournalAppend"] == 0
    # durable: a fresh store over the same files (as after a restart) finds every record
    for uuid in owners:
        fresh = JournalStore(tmp_path / uuid / "journal")
        try:
            assert [x.seq for x in fresh.read(VOL, 0)] == [1, 2, 3]
            assert fresh.fence(VOL, 1) == 3
        finally:
            fresh.close()


def test_a_replica_peer_appends_to_its_own_store_without_an_rpc_to_itself(cluster: JournalCluster) -> None:
    me, other = cluster.ring.get_peers(journal_ref(VOL)).owners
    r = cluster.replicas(me)
    r.fence(VOL, 1)
    r.append(VOL, 1, [rec(1)])
    assert cluster.servers[me].stats["JournalAppend"] == 0
    assert cluster.servers[other].stats["JournalAppend"] == 1
    assert cluster.stored_seqs(me, VOL) == [1] and cluster.stored_seqs(other, VOL) == [1]
    assert cluster.servers[me].stats["JournalFence"] == 0  # fence of its own replica: direct too


def test_stale_epoch_append_is_refused_after_a_newer_fence_and_nothing_is_appended(
    cluster: JournalCluster,
) -> None:
    old = cluster.replicas("client")
    assert old.fence(VOL, 1) == 0
    old.append(VOL, 1, [rec(1, epoch=1)])
    new = cluster.replicas(PEERS[0])
    assert new.fence(VOL, 2) == 1  # the new writer continues after the old one's last record
    with pytest.raises(StaleEpoch):
        old.append(VOL, 1, [rec(2, epoch=1)])
    for uuid in PEERS:
        assert 2 not in cluster.stored_seqs(uuid, VOL)
    with pytest.raises(StaleEpoch):
        old.fence(VOL, 1)
    with pytest.raises(StaleEpoch):
        old.trim(VOL, 1, 1)
    new.append(VOL, 2, [rec(2, epoch=2)])
    assert [x.seq for x in select_replay(new.read(VOL, 0), 0)] == [1, 2]


def test_stale_epoch_crosses_the_wire_as_its_own_type(cluster: JournalCluster) -> None:
    client = cluster.pool.get(cluster.addresses[PEERS[0]])
    assert client.journal_fence(VOL, 5) == 0
    with pytest.raises(StaleEpoch) as info:
        client.journal_fence(VOL, 4)
    assert "epoch" in str(info.value)
    with pytest.raises(StaleEpoch):
        client.journal_append(VOL, 4, [rec(1, epoch=4)])
    with pytest.raises(StaleEpoch):
        client.journal_trim(VOL, 4, 10)
    assert client.journal_read(VOL, 0) == []


def test_dead_replica_hands_the_record_to_the_next_peer_and_read_still_finds_every_record(
    cluster: JournalCluster,
) -> None:
    perm = cluster.ring.get_peers(journal_ref(VOL)).peers
    r = cluster.replicas("client")
    r.fence(VOL, 1)
    r.append(VOL, 1, [rec(1)])
    cluster.stop(perm[1])  # not marked down: its port refuses the connection
    r.append(VOL, 1, [rec(2)])
    assert cluster.stored_seqs(perm[0], VOL) == [1, 2]
    assert cluster.stored_seqs(perm[2], VOL) == [2]  # the handoff copy
    assert cluster.stored_seqs(perm[1], VOL) == [1]
    # the failed peer is a suspect now: the next append goes straight to the live peers
    r.append(VOL, 1, [rec(3)])
    assert cluster.stored_seqs(perm[2], VOL) == [2, 3]
    records = r.read(VOL, 0)
    assert [x.seq for x in select_replay(records, 0)] == [1, 2, 3]
    assert r.fence(VOL, 1) == 3


def test_a_replica_marked_down_is_skipped_without_dialling(cluster: JournalCluster) -> None:
    perm = cluster.ring.get_peers(journal_ref(VOL)).peers
    cluster.directory.set_down(perm[0])
    r = cluster.replicas("client")
    r.fence(VOL, 1)
    r.append(VOL, 1, [rec(1)])
    assert cluster.servers[perm[0]].stats["JournalAppend"] == 0
    assert cluster.stored_seqs(perm[1], VOL) == [1] and cluster.stored_seqs(perm[2], VOL) == [1]


def test_fewer_reachable_peers_than_replication_raises_replication_failed(cluster: JournalCluster) -> None:
    perm = cluster.ring.get_peers(journal_ref(VOL)).peers
    r = cluster.replicas("client")
    r.fence(VOL, 1)
    cluster.stop(perm[0])
    cluster.stop(perm[2])
    with pytest.raises(ReplicationFailed) as info:
        r.append(VOL, 1, [rec(1)])
    assert info.value.acked == [perm[1]]
    # fence and read cannot be sure to meet every replica set with one of three members
    with pytest.raises(ReplicationFailed):
        r.fence(VOL, 1)
    with pytest.raises(ReplicationFailed):
        r.read(VOL, 0)


def test_read_returns_duplicates_from_every_replica_and_select_replay_merges_them(
    cluster: JournalCluster,
) -> None:
    r = cluster.replicas("client")
    r.fence(VOL, 1)
    r.append(VOL, 1, [rec(1), rec(2)])
    r.append(VOL, 1, [rec(3)])
    records = r.read(VOL, 0)
    assert sorted(x.seq for x in records) == [1, 1, 2, 2, 3, 3]
    replay = select_replay(records, 0)
    assert [x.seq for x in replay] == [1, 2, 3]
    assert replay[2].extents[0].data == bytes([3]) * 4096
    assert [x.seq for x in select_replay(r.read(VOL, 1), 1)] == [2, 3]


def test_trim_drops_the_records_on_every_reachable_peer(cluster: JournalCluster) -> None:
    perm = cluster.ring.get_peers(journal_ref(VOL)).peers
    r = cluster.replicas("client")
    r.fence(VOL, 1)
    r.append(VOL, 1, [rec(1)])
    cluster.directory.set_down(perm[0])
    r.append(VOL, 1, [rec(2)])  # handed off to perm[2]
    cluster.directory.set_down(perm[0], False)
    r.trim(VOL, 1, 2)
    for uuid in PEERS:
        assert cluster.stored_seqs(uuid, VOL) == []
    r.append(VOL, 1, [rec(3)])
    assert [x.seq for x in select_replay(r.read(VOL, 2), 2)] == [3]


def test_invalid_payloads_are_refused_with_invalid_argument_and_the_peer_keeps_serving(
    cluster: JournalCluster,
) -> None:
    client = cluster.pool.get(cluster.addresses[PEERS[0]])
    with pytest.raises(InvalidArgument):
        client.journal_append(VOL, 1, [b"not a record"])
    with pytest.raises(InvalidArgument):
        client.journal_append(VOL, 1, [rec(1, vol=VOL + 1)])  # another volume's record
    with pytest.raises(InvalidArgument):
        client.journal_append(VOL, 1, [rec(2), rec(1)])  # sequence numbers going down
    with pytest.raises(InvalidArgument):
        client.journal_append(VOL, 2, [rec(1, epoch=1)])  # record epoch differs from the call's
    with pytest.raises(InvalidArgument):
        client.journal_fence(0, 1)  # volume 0 does not exist
    with pytest.raises(InvalidArgument):
        client.journal_read(1 << 41, 0)  # beyond the 40-bit volume ids
    with pytest.raises(InvalidArgument):
        client.journal_fence(-1, 1)  # refused before the wire
    assert client.ping().uuid == PEERS[0]
    assert client.journal_read(VOL, 0) == []
    r = cluster.replicas("client")
    with pytest.raises(InvalidArgument):
        r.append(VOL, 1, [b"\x00" * 64])
    with pytest.raises(InvalidArgument):
        r.append(0, 1, [rec(1)])
    assert all(cluster.stored_seqs(u, VOL) == [] for u in PEERS)


def test_a_peer_without_a_journal_store_answers_not_supported(cluster: JournalCluster) -> None:
    from torus_core.testing.distributor import mem_store_factory

    store = mem_store_factory()(4096, 4)
    server = PeerServer(store, uuid="bare").start()
    try:
        client = cluster.pool.get(server.address)
        with pytest.raises(NotSupported):
            client.journal_fence(VOL, 1)
        with pytest.raises(NotSupported):
            client.journal_read(VOL, 0)
    finally:
        server.stop(grace=0)
        store.close()


def test_placement_is_cached_until_the_ring_version_changes(cluster: JournalCluster) -> None:
    r = cluster.replicas("client")
    first = r.replicas(VOL)
    assert r._placement(VOL) is r._placement(VOL)  # no recomputation on the hot path
    gone = first[0]
    cluster.ring = cluster.ring.remove_peers([gone])
    after = r.replicas(VOL)
    assert gone not in after and len(after) == 2
    r.fence(VOL, 1)
    r.append(VOL, 1, [rec(1)])
    assert all(cluster.stored_seqs(u, VOL) == [1] for u in after)
    assert cluster.stored_seqs(gone, VOL) == []


def test_concurrent_writers_of_different_volumes_do_not_mix(cluster: JournalCluster) -> None:
    import threading

    r = cluster.replicas(PEERS[1])
    vols = [11, 12, 13, 14]
    errors: list[BaseException] = []

    def write(vol: int) -> None:
        try:
            r.fence(vol, 3)
            for seq in range(1, 21):
                r.append(vol, 3, [rec(seq, epoch=3, vol=vol)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in vols]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for vol in vols:
        assert [x.seq for x in select_replay(r.read(vol, 0), 0)] == list(range(1, 21))
        for uuid in r.replicas(vol):
            assert cluster.stored_seqs(uuid, vol) == list(range(1, 21))


def test_remote_replicas_satisfy_the_journal_replicas_protocol(cluster: JournalCluster) -> None:
    from torus_core.journal.replicas import JournalReplicas

    r: JournalReplicas = cluster.replicas("client")
    assert isinstance(r, RemoteJournalReplicas)


def test_cluster_nodes_serve_their_journal_stores_and_append_through_the_ring(tmp_path: Path) -> None:
    from torus_sqlite.backend import SQLiteBackend

    from torus_core.testing.cluster import InProcessCluster, wait_until, writable_volume

    url = f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"
    journals = {u: JournalStore(tmp_path / u / "journal") for u in PEERS}
    try:
        with InProcessCluster(lambda: SQLiteBackend.from_url(url), block_size=4096) as c:
            nodes = [c.add_node(u, journal=journals[u]) for u in PEERS]
            assert wait_until(
                lambda: all(
                    len(n.distributor.ring.members()) == 3 and all(n.directory.address(u) for u in PEERS)
                    for n in nodes
                ),
                10.0,
            )
            writer = nodes[0].journal_replicas
            first = writable_volume(c.md, VOL)  # peers take journals of real volumes only
            assert first.epoch == 1
            assert writer.fence(VOL, 1) == 0
            writer.append(VOL, 1, [rec(1), rec(2)])
            owners = writer.replicas(VOL)
            for u in PEERS:
                assert [x.seq for x in journals[u].read(VOL, 0)] == ([1, 2] if u in owners else [])
            # another node (a new writer after a takeover) fences and finds everything
            successor = nodes[2].journal_replicas
            c.md.leases.revoke(first.lease)
            assert writable_volume(c.md, VOL).epoch == 2
            assert successor.fence(VOL, 2) == 2
            with pytest.raises(StaleEpoch):
                writer.append(VOL, 1, [rec(3)])
            assert [x.seq for x in select_replay(successor.read(VOL, 0), 0)] == [1, 2]
    finally:
        for j in journals.values():
            j.close()


def test_a_hung_replica_is_given_up_after_the_deadline_and_the_next_peer_takes_the_record(
    cluster: JournalCluster,
) -> None:
    import threading
    import time

    perm = cluster.ring.get_peers(journal_ref(VOL)).peers
    release = threading.Event()
    hung = cluster.journals[perm[0]]
    real_append = hung.append

    def stuck(volume_id: int, epoch: int, payloads: Sequence[bytes]) -> None:
        release.wait(10)
        real_append(volume_id, epoch, payloads)

    r = cluster.replicas("client", timeout=0.5)
    r.fence(VOL, 1)
    hung.append = stuck  # type: ignore[method-assign]
    try:
        t0 = time.monotonic()
        r.append(VOL, 1, [rec(1)])
        assert time.monotonic() - t0 < 3.0
        assert cluster.stored_seqs(perm[1], VOL) == [1] and cluster.stored_seqs(perm[2], VOL) == [1]
    finally:
        release.set()
        hung.append = real_append  # type: ignore[method-assign]


def test_prefer_local_keeps_one_replica_on_the_writer_and_others_still_find_every_record(
    cluster: JournalCluster,
) -> None:
    me = others(cluster)[0]  # not among the volume's first R
    perm = cluster.ring.get_peers(journal_ref(VOL)).peers
    r = cluster.replicas(me, prefer_local=True)
    assert r.replicas(VOL) == [me, next(p for p in perm if p != me)]
    r.fence(VOL, 1)
    r.append(VOL, 1, [rec(1), rec(2)])
    assert cluster.servers[me].stats["JournalAppend"] == 0  # its own replica: no RPC
    for uuid in PEERS:
        assert cluster.stored_seqs(uuid, VOL) == ([1, 2] if uuid in r.replicas(VOL) else [])
    successor = cluster.replicas("client")  # default placement: fence and read ask everyone
    assert successor.fence(VOL, 2) == 2
    assert [x.seq for x in select_replay(successor.read(VOL, 0), 0)] == [1, 2]
