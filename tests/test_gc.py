"""GC safety: nothing is deleted on partial knowledge; in-flight, snapshot and clone-shared blocks
survive; superseded blocks and deleted volumes are reclaimed (after the grace period)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from torus_sqlite.backend import SQLiteBackend

from torus_core.blockset import default_layer_registry
from torus_core.cluster import ClusterNode, GarbageCollector, LiveSet
from torus_core.errors import InvalidArgument, MetadataUnavailable
from torus_core.inode import INode, INodeStore
from torus_core.metadata import MetadataService
from torus_core.projection import ClusterState
from torus_core.refs import BlockRef, BlockType, INodeRef
from torus_core.testing.cluster import InProcessCluster, commit_blocks

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

BS = 4096


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[InProcessCluster]:
    url = f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"
    with InProcessCluster(lambda: SQLiteBackend.from_url(url), block_size=BS) as c:
        yield c


@pytest.fixture
def node(cluster: InProcessCluster) -> ClusterNode:
    # maintenance GC off: the tests drive their own collector
    return cluster.add_node("a", gc=False)


def _gc(cluster: InProcessCluster, node: ClusterNode, grace: float = 0.0) -> GarbageCollector:
    assert node.store is not None
    return GarbageCollector(cluster.md, node.distributor, node.store, grace=grace, layer_registry=LAYERS)


def _blocks(n: int, tag: bytes) -> list[bytes]:
    return [tag + bytes([i]) for i in range(n)]


def _inode_block(iref: INodeRef) -> BlockRef:
    return BlockRef(iref.volume, iref.inode, 1, BlockType.INODE)


def _two_cycles(gc: GarbageCollector) -> int:
    first = gc.run_cycle()
    second = gc.run_cycle()
    assert not first.skipped and not second.skipped
    assert first.deleted == 0  # a block is never deleted the first time it is found dead
    return second.deleted


class UnreachableMetadata(MetadataService):
    """The real service, except that reading the state fails like a metadata outage."""

    def state(self) -> ClusterState:
        raise MetadataUnavailable("metadata backend unreachable (injected)")


def test_unreachable_metadata_deletes_nothing(cluster: InProcessCluster, node: ClusterNode) -> None:
    md = cluster.md
    md.create_volume("v", 10 * BS)
    commit_blocks(md, node.distributor, "v", _blocks(4, b"old"))
    commit_blocks(md, node.distributor, "v", _blocks(4, b"new"))  # `old` is now garbage
    md.delete_volume("v")  # and everything is garbage
    assert node.store is not None
    before = set(node.store.iter_refs())
    broken = UnreachableMetadata(md.backend, ring_types=md.ring_types)
    gc = GarbageCollector(broken, node.distributor, node.store, grace=0, layer_registry=LAYERS)
    for _ in range(3):
        result = gc.run_cycle()
        assert result.skipped and result.deleted == 0
    assert set(node.store.iter_refs()) == before
    assert gc.skipped_cycles == 3


def test_an_unreadable_inode_skips_the_whole_cycle(cluster: InProcessCluster, node: ClusterNode) -> None:
    md = cluster.md
    md.create_volume("v", 10 * BS)
    md.create_volume("w", 10 * BS)
    _, superseded = commit_blocks(md, node.distributor, "v", _blocks(3, b"a"))
    commit_blocks(md, node.distributor, "v", _blocks(3, b"b"))
    w_ref, _ = commit_blocks(md, node.distributor, "w", _blocks(2, b"w"))
    assert node.store is not None
    node.store.delete_block(_inode_block(w_ref))
    node.distributor.cache.clear()
    gc = _gc(cluster, node)
    for _ in range(2):
        assert gc.run_cycle().skipped
    assert all(node.store.has_block(r) for r in superseded)


def test_in_flight_blocks_of_an_uncommitted_inode_are_kept(
    cluster: InProcessCluster, node: ClusterNode
) -> None:
    md = cluster.md
    md.create_volume("v", 10 * BS)
    committed_ref, committed = commit_blocks(md, node.distributor, "v", _blocks(3, b"c"))
    flight_ref, in_flight = commit_blocks(md, node.distributor, "v", _blocks(3, b"f"), commit=False)
    assert flight_ref.inode > committed_ref.inode
    gc = _gc(cluster, node)
    assert _two_cycles(gc) == 0
    assert node.store is not None
    assert all(node.store.has_block(r) for r in committed + in_flight)


def test_superseded_data_and_inode_blocks_are_reclaimed(cluster: InProcessCluster, node: ClusterNode) -> None:
    md = cluster.md
    md.create_volume("v", 10 * BS)
    old_ref, old = commit_blocks(md, node.distributor, "v", _blocks(3, b"o"))
    _, new = commit_blocks(md, node.distributor, "v", _blocks(3, b"n"))
    # the writer's next session allocates a newer index, so the superseded INode is below highwater
    md.allocate_inode_index(md.get_volume("v").id)
    gc = _gc(cluster, node)
    assert _two_cycles(gc) == len(old) + 1
    assert node.store is not None
    assert not any(node.store.has_block(r) for r in old)
    assert not node.store.has_block(_inode_block(old_ref))
    assert all(node.store.has_block(r) for r in new)


def test_snapshot_blocks_are_kept(cluster: InProcessCluster, node: ClusterNode) -> None:
    md = cluster.md
    md.create_volume("v", 10 * BS)
    snap_ref, snap_blocks = commit_blocks(md, node.distributor, "v", _blocks(3, b"s"))
    md.save_snapshot("v", "s1")
    commit_blocks(md, node.distributor, "v", _blocks(3, b"t"))
    md.allocate_inode_index(md.get_volume("v").id)
    gc = _gc(cluster, node)
    assert _two_cycles(gc) == 0
    assert node.store is not None
    assert all(node.store.has_block(r) for r in snap_blocks)
    assert node.store.has_block(_inode_block(snap_ref))
    md.delete_snapshot("v", "s1")
    assert _two_cycles(gc) == len(snap_blocks) + 1


def test_clone_shared_blocks_survive_deleting_the_source(
    cluster: InProcessCluster, node: ClusterNode
) -> None:
    md = cluster.md
    md.create_volume("src", 10 * BS)
    src_ref, shared = commit_blocks(md, node.distributor, "src", _blocks(4, b"x"))
    md.save_snapshot("src", "base")
    # a clone: a new volume whose INode carries the snapshot's layers (refs of volume `src`)
    clone = md.create_volume("clone", 10 * BS)
    istore = INodeStore(node.distributor)
    src_inode = istore.get_inode(src_ref)
    lease = md.leases.grant(30)
    lock = md.lock_volume("clone", "t", lease)
    index = md.allocate_inode_index(clone.id)
    istore.write_inode(INode(clone.id, index, src_inode.filesize, {}, list(src_inode.blocks)))
    md.commit_inode(lock, INodeRef(clone.id, index))
    md.unlock(lock)
    md.leases.revoke(lease)
    md.delete_snapshot("src", "base")
    md.delete_volume("src")
    gc = _gc(cluster, node)
    assert _two_cycles(gc) == 1  # only the source's INode block is garbage
    assert node.store is not None
    assert all(node.store.has_block(r) for r in shared)
    assert not node.store.has_block(_inode_block(src_ref))


def test_deleted_volume_is_reclaimed(cluster: InProcessCluster, node: ClusterNode) -> None:
    md = cluster.md
    md.create_volume("gone", 10 * BS)
    md.create_volume("kept", 10 * BS)
    _, refs = commit_blocks(md, node.distributor, "gone", _blocks(5, b"g"))
    _, kept = commit_blocks(md, node.distributor, "kept", _blocks(2, b"k"))
    md.delete_volume("gone")
    gc = _gc(cluster, node)
    assert _two_cycles(gc) == len(refs) + 1
    assert node.store is not None
    assert all(node.store.has_block(r) for r in kept)
    assert not any(node.store.has_block(r) for r in refs)


def test_grace_period_delays_deletion(cluster: InProcessCluster, node: ClusterNode) -> None:
    md = cluster.md
    md.create_volume("gone", 10 * BS)
    _, refs = commit_blocks(md, node.distributor, "gone", _blocks(2, b"g"))
    md.delete_volume("gone")
    gc = _gc(cluster, node, grace=60.0)
    assert _two_cycles(gc) == 0
    assert gc.run_cycle(now=gc.candidates[refs[0]] + 61).deleted == len(refs) + 1


def test_live_set_keeps_blocks_of_volumes_created_after_the_cycle_started() -> None:
    live = LiveSet(started=0.0, highwater={1: 5}, max_volume_id=3)
    assert not live.is_dead(BlockRef(4, 2, 1))  # volume 4 did not exist at cycle start
    assert live.is_dead(BlockRef(2, 2, 1))  # volume 2 was deleted
    assert not live.is_dead(BlockRef(1, 5, 1))  # in-flight under the highest allocated index
    assert live.is_dead(BlockRef(1, 4, 1))
    assert not dataclasses.replace(live, refs={BlockRef(2, 2, 1)}).is_dead(BlockRef(2, 2, 1))


def test_gc_rejects_negative_grace(cluster: InProcessCluster, node: ClusterNode) -> None:
    with pytest.raises(InvalidArgument):
        _gc(cluster, node, grace=-1)


def test_background_gc_on_a_storage_node_reclaims_a_deleted_volume(cluster: InProcessCluster) -> None:
    from torus_core.testing.cluster import wait_until

    node = cluster.add_node("b")  # GC on, grace 0 in the test options
    md = cluster.md
    md.create_volume("tmp", 10 * BS)
    _, refs = commit_blocks(md, node.distributor, "tmp", _blocks(3, b"t"))
    md.delete_volume("tmp")
    assert node.store is not None
    assert wait_until(lambda: not any(node.store.has_block(r) for r in refs), 10.0)  # type: ignore[union-attr]


def test_live_set_is_reused_while_the_metadata_log_has_not_moved(
    cluster: InProcessCluster, node: ClusterNode
) -> None:
    md = cluster.md
    md.create_volume("v", 10 * BS)
    v_ref, _ = commit_blocks(md, node.distributor, "v", _blocks(2, b"v"))
    gc = _gc(cluster, node)
    first = gc.run_cycle()
    assert not first.skipped and gc.live is not None
    built = gc.live
    # the INode goes missing, but the log did not move: the live set it gave is still the truth
    assert node.store is not None
    node.store.delete_block(_inode_block(v_ref))
    node.distributor.cache.clear()
    again = gc.run_cycle()
    assert not again.skipped
    assert gc.live is not None and gc.live.refs is built.refs and gc.live.started >= built.started
    # any event makes the next cycle read every INode again (and skip, the INode being gone)
    md.create_volume("w", 10 * BS)
    assert gc.run_cycle().skipped
    assert gc.live is not None and gc.live.refs is built.refs  # the last complete set is kept


def test_a_collector_with_deletion_off_builds_the_live_set_and_deletes_nothing(
    cluster: InProcessCluster, node: ClusterNode
) -> None:
    md = cluster.md
    md.create_volume("gone", 10 * BS)
    _, refs = commit_blocks(md, node.distributor, "gone", _blocks(3, b"g"))
    md.delete_volume("gone")
    assert node.store is not None
    gc = GarbageCollector(md, node.distributor, node.store, grace=0, delete=False, layer_registry=LAYERS)
    first, second = gc.run_cycle(), gc.run_cycle()
    assert second.dead == len(refs) + 1 and first.deleted == second.deleted == 0
    assert gc.live is not None and all(gc.live.is_dead(r) for r in refs)
    assert all(node.store.has_block(r) for r in refs)


def test_an_idle_collector_backs_off_until_the_metadata_log_moves(
    cluster: InProcessCluster, node: ClusterNode
) -> None:
    md = cluster.md
    md.create_volume("v", 10 * BS)
    commit_blocks(md, node.distributor, "v", _blocks(2, b"v"))
    assert node.store is not None
    gc = GarbageCollector(md, node.distributor, node.store, grace=0, idle_max=30.0, layer_registry=LAYERS)
    first = gc.maybe_run_cycle()
    assert first is not None and first.dead == 0
    assert gc.maybe_run_cycle() is None  # nothing dead, nothing changed: the walk waits
    md.create_volume("gone", 10 * BS)
    _, refs = commit_blocks(md, node.distributor, "gone", _blocks(3, b"g"))
    md.delete_volume("gone")  # the log moved: the next call walks at once
    found = gc.maybe_run_cycle()
    assert found is not None and found.dead == len(refs) + 1
    deleted = gc.maybe_run_cycle()  # dead blocks pending: no back-off until they are gone
    assert deleted is not None and deleted.deleted == len(refs) + 1
    assert not any(node.store.has_block(r) for r in refs)


def test_gc_rejects_a_negative_idle_interval(cluster: InProcessCluster, node: ClusterNode) -> None:
    assert node.store is not None
    with pytest.raises(InvalidArgument):
        GarbageCollector(cluster.md, node.distributor, node.store, idle_max=-1, layer_registry=LAYERS)
