"""``torusctl peer list/add/remove`` against live in-process peers on SQLite metadata."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from torus_sqlite.backend import SQLiteBackend

from torus_core.cli.torusctl import cli
from torus_core.cluster import ClusterOptions, RebalanceOptions
from torus_core.journal import Extent, JournalStore, encode_record
from torus_core.journal.store import SEGMENT_CHUNK
from torus_core.ring.codec import ring_from_spec
from torus_core.testing.cluster import InProcessCluster, wait_until

Invoke = Callable[..., Result]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"


@pytest.fixture
def run(url: str) -> Invoke:
    def invoke(*args: str, ok: bool = True) -> Result:
        result = CliRunner().invoke(cli, ["--metadata", url, *args])
        assert (result.exit_code == 0) == ok, result.output
        return result

    return invoke


@pytest.fixture
def cluster(url: str) -> Iterator[InProcessCluster]:
    opts = ClusterOptions(
        heartbeat_interval=0.2,
        lease_ttl=0.8,
        maintenance_interval=0.1,
        gc_grace=0.0,
        rebalance=RebalanceOptions(settle=0.3),
    )
    with InProcessCluster(lambda: SQLiteBackend.from_url(url), block_size=4096, options=opts) as c:
        yield c


def _csv(run: Invoke) -> dict[str, list[str]]:
    lines = run("peer", "list", "--csv").output.splitlines()
    assert lines[0] == "ADDRESS,UUID,SIZE,USED,JOURNAL,MEMBER,UPDATED,REB/REP DATA,UNDER-REP"
    return {row.split(",")[1]: row.split(",") for row in lines[1:]}


def test_peer_list_shows_ok_avail_and_down(cluster: InProcessCluster, run: Invoke) -> None:
    a = cluster.add_node("a")
    cluster.add_node("b")
    cluster.add_node("c", join=False)
    cluster.client("client-1")
    rows = _csv(run)
    assert rows["a"][0] == a.address and rows["a"][5] == "OK"
    assert rows["b"][5] == "OK" and rows["c"][5] == "Avail"
    assert "client-1" not in rows  # clients have no address and are hidden
    assert int(rows["a"][2]) == cluster.capacity_blocks * 4096
    cluster.crash("b")
    assert wait_until(lambda: _csv(run)["b"][5] == "DOWN", 5.0)
    table = run("peer", "list").output
    assert "DOWN" in table and "Balanced:" in table and "Usage:" in table and "Journal:" in table


def test_peer_list_shows_the_journal_space_each_peer_reports(
    cluster: InProcessCluster, run: Invoke, tmp_path: Path
) -> None:
    journal = JournalStore(tmp_path / "journal-a")
    try:
        cluster.add_node("a", journal=journal)
        cluster.add_node("b")  # no journal store: reports 0
        assert wait_until(lambda: {"a", "b"} <= set(_csv(run)), 5.0)
        assert _csv(run)["a"][4] == "0" and _csv(run)["b"][4] == "0"
        # a record another peer's journal writer appended to a's journal files (not yet trimmed
        # by a checkpoint): the next heartbeat publishes the segment's reserved space
        journal.append(7, 1, [encode_record(7, 1, 1, [Extent(0, 4096, bytes(4096))])])
        assert wait_until(lambda: _csv(run)["a"][4] == str(SEGMENT_CHUNK), 5.0), _csv(run)
        assert _csv(run)["b"][4] == "0"
        table = run("peer", "list").output
        header, row_a = table.splitlines()[0], next(r for r in table.splitlines() if " a " in r)
        col = header.index("JOURNAL")
        assert header.index("USED") < col < header.index("MEMBER"), table
        assert row_a[col:].startswith("8.0 MiB "), table
        assert table.splitlines()[-1].endswith("Journal: 8.0 MiB"), table
        journal.trim(7, 1, 1)
        assert wait_until(lambda: _csv(run)["a"][4] == "0", 5.0), _csv(run)
    finally:
        journal.close()  # disk_bytes still answers for the heartbeats until the fixture stops the node


def test_peer_add_by_address_and_all_peers(cluster: InProcessCluster, run: Invoke) -> None:
    cluster.add_node("a")
    b = cluster.add_node("b", join=False)
    cluster.add_node("c", join=False)
    run("peer", "add", b.address)
    assert set(ring_from_spec(cluster.md.ring_types, cluster.md.get_ring()).members()) == {"a", "b"}
    run("peer", "add", "--all-peers")
    assert set(ring_from_spec(cluster.md.ring_types, cluster.md.get_ring()).members()) == {"a", "b", "c"}
    assert "already in the ring" in run("peer", "add", "--all-peers").output
    assert "not the address or UUID" in run("peer", "add", "127.0.0.1:1", ok=False).output


def test_peer_remove_needs_force_for_a_dead_peer(cluster: InProcessCluster, run: Invoke) -> None:
    cluster.add_node("a")
    cluster.add_node("b")
    cluster.add_node("c")
    run("peer", "remove", "c")
    assert set(ring_from_spec(cluster.md.ring_types, cluster.md.get_ring()).members()) == {"a", "b"}
    cluster.crash("b")
    assert wait_until(lambda: _csv(run)["b"][5] == "DOWN", 5.0)
    assert "--force" in run("peer", "remove", "b", ok=False).output
    run("peer", "remove", "--force", "b")
    assert ring_from_spec(cluster.md.ring_types, cluster.md.get_ring()).members() == ["a"]


def test_peer_commands_reject_missing_arguments(cluster: InProcessCluster, run: Invoke) -> None:
    cluster.add_node("a")
    assert run("peer", "add", ok=False).exit_code != 0
    assert run("peer", "remove", ok=False).exit_code != 0
