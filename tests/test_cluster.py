"""Heartbeats, membership, ring watching and joining, with real nodes on SQLite metadata."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torus_sqlite.backend import SQLiteBackend

from torus_core.blockset import default_layer_registry
from torus_core.cluster import (
    ClusterNode,
    ClusterOptions,
    Heartbeat,
    Membership,
    PeerInfo,
    RingWatcher,
    load_or_create_uuid,
    parse_peers,
)
from torus_core.distributor import PeerDirectory
from torus_core.errors import ConfigError, InvalidArgument
from torus_core.metadata import MetadataService
from torus_core.ring.base import RingSpec
from torus_core.ring.builtin import builtin_ring_types
from torus_core.ring.codec import ring_from_spec
from torus_core.testing.cluster import InProcessCluster, open_mem_store, wait_until

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()


@pytest.fixture
def open_backend(tmp_path: Path) -> Callable[[], SQLiteBackend]:
    url = f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"
    return lambda: SQLiteBackend.from_url(url)


@pytest.fixture
def md(open_backend: Callable[[], SQLiteBackend]) -> Iterator[MetadataService]:
    backend = open_backend()
    service = MetadataService(backend, ring_types=RING_TYPES)
    service.format(4096, "base", RingSpec("ketama", 1, 2))
    yield service
    backend.close()


@pytest.fixture
def cluster(open_backend: Callable[[], SQLiteBackend]) -> Iterator[InProcessCluster]:
    with InProcessCluster(open_backend) as c:
        yield c


# --- PeerInfo ---------------------------------------------------------------------------------


def test_peerinfo_round_trips_through_its_dict_form() -> None:
    info = PeerInfo("u1", "127.0.0.1:1", 12.5, 100, 7, 4096)
    info.rebalance.rate = 1.5
    info.rebalance.under_replicated = 3
    info.journal_bytes = 8 << 20
    assert PeerInfo.from_dict(info.to_dict()) == info


def test_peerinfo_of_an_older_peer_without_journal_bytes_reads_as_zero() -> None:
    assert PeerInfo.from_dict({"uuid": "old", "address": "127.0.0.1:1"}).journal_bytes == 0
    assert PeerInfo.from_dict({"uuid": "old", "journal_bytes": None}).journal_bytes == 0


@pytest.mark.parametrize(
    "raw",
    [
        {"uuid": ""},
        {"uuid": 5},
        {"uuid": "u", "total_blocks": "many"},
        {"uuid": "u", "rebalance": []},
        {"uuid": "u", "rebalance": {"rebalancing": "yes"}},
        {"uuid": "u", "address": 1},
        {"uuid": "u", "journal_bytes": "8 MiB"},
        {"uuid": "u", "journal_bytes": True},
    ],
)
def test_malformed_peerinfo_raises_invalid_argument(raw: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        PeerInfo.from_dict(raw)


def test_parse_peers_skips_malformed_entries() -> None:
    peers = parse_peers([{"uuid": "a", "address": "x:1"}, {"uuid": 3}, {"uuid": "b", "used_blocks": []}])
    assert list(peers) == ["a"]


def test_uuid_file_is_created_once_and_reused(tmp_path: Path) -> None:
    first = load_or_create_uuid(str(tmp_path))
    assert load_or_create_uuid(str(tmp_path)) == first
    assert (tmp_path / "metadata" / "uuid").read_text().strip() == first


# --- heartbeat ------------------------------------------------------------------------------------


def test_heartbeat_registers_info_visible_to_list_peers(md: MetadataService) -> None:
    hb = Heartbeat(md, lambda: PeerInfo("p1", "127.0.0.1:9", total_blocks=10), interval=0.5)
    peers = hb.beat()
    assert peers["p1"].address == "127.0.0.1:9"
    assert parse_peers(md.list_peers())["p1"].total_blocks == 10
    hb.stop()
    assert "p1" not in parse_peers(md.list_peers())


def test_heartbeat_grants_a_new_lease_after_the_old_one_was_lost(md: MetadataService) -> None:
    hb = Heartbeat(md, lambda: PeerInfo("p1", "127.0.0.1:9"), interval=0.5)
    hb.beat()
    assert hb.lease is not None
    md.leases.revoke(hb.lease)  # as if it expired during a long pause
    assert "p1" not in parse_peers(md.list_peers())
    hb.beat()
    assert hb.leases_granted == 2
    assert "p1" in parse_peers(md.list_peers())
    hb.stop()


def test_heartbeat_rejects_ttl_not_above_interval(md: MetadataService) -> None:
    with pytest.raises(InvalidArgument):
        Heartbeat(md, lambda: PeerInfo("p"), interval=1.0, ttl=1.0)


def test_heartbeat_entry_expires_when_beats_stop(md: MetadataService) -> None:
    hb = Heartbeat(md, lambda: PeerInfo("p1", "127.0.0.1:9"), interval=0.1, ttl=0.4)
    hb.beat()
    hb.stop(unregister=False)
    assert wait_until(lambda: "p1" not in parse_peers(md.list_peers()), 3.0)


# --- membership -------------------------------------------------------------------------------


def test_membership_marks_ring_members_without_heartbeat_down() -> None:
    directory = PeerDirectory({"a": "127.0.0.1:1", "b": "127.0.0.1:2"})
    m = Membership(directory, "a", "127.0.0.1:1", ring_members=lambda: ["a", "b", "c"])
    m.apply({"a": PeerInfo("a", "127.0.0.1:1"), "d": PeerInfo("d", "127.0.0.1:4")})
    assert directory.is_down("b") and directory.is_down("c")
    assert not directory.is_down("a")
    assert directory.address("d") == "127.0.0.1:4"
    m.apply({"b": PeerInfo("b", "127.0.0.1:22")})
    assert directory.address("b") == "127.0.0.1:22"
    assert directory.address("a") == "127.0.0.1:1"  # self is never marked down


def test_membership_ignores_peers_with_an_old_protocol_version() -> None:
    directory = PeerDirectory()
    m = Membership(directory, "a", ring_members=lambda: ["old"])
    m.apply({"old": PeerInfo("old", "127.0.0.1:5", protocol_version=1)})
    assert directory.address("old") is None
    assert m.incompatible == {"old"}


# --- ring watcher ------------------------------------------------------------------------------


def test_ring_change_reaches_a_watcher_within_a_second(md: MetadataService) -> None:
    seen: list[int] = []
    got = threading.Event()

    def on_ring(ring: object) -> None:
        seen.append(ring.version)  # type: ignore[attr-defined]
        if ring.version == 2:  # type: ignore[attr-defined]
            got.set()

    watcher = RingWatcher(md, on_ring, follow_timeout=0.2).start()
    try:
        assert seen == [1]
        ring = ring_from_spec(md.ring_types, md.get_ring()).change_replication(3)
        t0 = time.monotonic()
        md.set_ring(ring.to_spec())
        assert got.wait(1.0)
        assert time.monotonic() - t0 < 1.0
        assert seen == [1, 2]
    finally:
        watcher.stop()


# --- nodes ----------------------------------------------------------------------------------------


def test_three_nodes_auto_join_concurrently_and_all_see_the_same_ring(cluster: InProcessCluster) -> None:
    threads = [threading.Thread(target=cluster.add_node, args=(f"peer-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ring = ring_from_spec(cluster.md.ring_types, cluster.md.get_ring())
    assert sorted(ring.members()) == ["peer-0", "peer-1", "peer-2"]
    assert wait_until(
        lambda: all(n.distributor.ring.version == ring.version for n in cluster.nodes.values()), 2.0
    )


def test_auto_join_of_a_member_is_a_no_op(cluster: InProcessCluster) -> None:
    node = cluster.add_node("peer-0")
    version = cluster.md.get_ring().version
    assert node.join() is False
    assert cluster.md.get_ring().version == version


def test_peers_learn_each_others_addresses_and_a_crashed_peer_is_marked_down(
    cluster: InProcessCluster,
) -> None:
    a = cluster.add_node("a")
    b = cluster.add_node("b")
    assert wait_until(lambda: a.directory.address("b") == b.address, 3.0)
    cluster.crash("b")
    assert wait_until(lambda: a.directory.is_down("b"), 5.0)
    assert "b" not in a.membership.live_peers()


def test_client_node_has_no_listener_and_runs_no_maintenance(cluster: InProcessCluster) -> None:
    cluster.add_node("a")
    client = cluster.client("c1")
    assert client.address == "" and client.rebalancer is None and client.gc is None
    assert parse_peers(cluster.md.list_peers())["c1"].address == ""
    with pytest.raises(ConfigError):
        client.join()


def test_node_refuses_to_start_beside_a_peer_with_an_old_protocol(md: MetadataService) -> None:
    lease = md.leases.grant(30)
    md.register_peer(PeerInfo("ancient", "127.0.0.1:3", protocol_version=1).to_dict(), lease)
    store = open_mem_store(4096, 16)
    node = ClusterNode(
        md, "new", store=store, listen="127.0.0.1:0", options=ClusterOptions(0.2), layer_registry=LAYERS
    )
    with pytest.raises(ConfigError, match="ancient"):
        node.start()
    store.close()


def test_store_with_the_wrong_block_size_is_refused(md: MetadataService) -> None:
    store = open_mem_store(8192, 16)
    with pytest.raises(ConfigError):
        ClusterNode(md, "x", store=store, listen="127.0.0.1:0", layer_registry=LAYERS)
    store.close()
