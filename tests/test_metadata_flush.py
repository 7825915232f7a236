"""The flush hot path of MetadataService (real SQLite backend).

A flush is ``allocate_inode_index`` (a new write session) + ``commit_inode``. These tests prove
that it costs one append, that the index the commit reserves is safe (unique, counted as
allocated for the GC, never handed out once the volume's stream moved on), that fencing is
unchanged, and that the projector's locally applied state equals a replay of the log.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torus_sqlite._append import AppendRequest
from torus_sqlite.backend import SQLiteBackend

from torus_core.errors import Locked
from torus_core.events import REGISTRY, INodeCommitted, INodeIndexAllocated, volume_stream
from torus_core.gc import LiveSet
from torus_core.groupcommit import GroupCommitter
from torus_core.metadata import MetadataService, VolumeLock
from torus_core.projection import Projector, fold
from torus_core.refs import BlockRef, BlockType, INodeRef
from torus_core.ring.builtin import builtin_ring_types

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

MiB = 2**20


@pytest.fixture
def meta(open_backend: Callable[[], SQLiteBackend]) -> MetadataService:
    svc = MetadataService(open_backend(), ring_types=RING_TYPES)
    svc.format(4096)
    return svc


def _flush(md: MetadataService, lock: VolumeLock) -> INodeRef:
    ref = INodeRef(lock.volume_id, md.allocate_inode_index(lock.volume_id))
    md.commit_inode(lock, ref)
    return ref


def _committer(md: MetadataService) -> GroupCommitter[AppendRequest, list[int]]:
    assert isinstance(md.backend, SQLiteBackend)
    return md.backend.log.committer


def _replay(backend: SQLiteBackend) -> object:
    return fold(REGISTRY.recorded(s) for s in backend.log.read_all())


def test_a_flush_after_the_first_costs_one_append_of_commit_plus_reservation(meta: MetadataService) -> None:
    vol = meta.create_volume("a", MiB)
    lock = meta.lock_volume("a", "me", meta.backend.leases.grant(30))
    first = _flush(meta, lock)  # the session opened by the lock allocates with its own event
    committer = _committer(meta)
    commits, head = committer.commits, meta.backend.log.head_position()
    refs = [_flush(meta, lock) for _ in range(5)]
    assert committer.commits - commits == 5  # one transaction per flush, no failed attempts
    assert meta.backend.log.head_position() - head == 10
    assert [r.inode for r in refs] == list(range(first.inode + 1, first.inode + 6))
    tail = [e.event for e in meta.events(after=head)]
    assert [type(e) for e in tail] == [INodeCommitted, INodeIndexAllocated] * 5
    assert meta.current_inode(vol.id) == refs[-1]


def test_the_reserved_index_counts_as_allocated_so_the_gc_keeps_its_blocks(
    meta: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    vol = meta.create_volume("a", MiB)
    lock = meta.lock_volume("a", "me", meta.backend.leases.grant(30))
    committed = _flush(meta, lock)
    other = MetadataService(open_backend(), ring_types=RING_TYPES)  # what a GC elsewhere reads
    high = other.state().volumes[vol.id].last_inode_index
    in_use = meta.allocate_inode_index(vol.id)  # the next write session's index
    assert in_use == high == committed.inode + 1
    live = LiveSet(0.0, highwater={vol.id: high}, max_volume_id=vol.id)
    assert not live.is_dead(BlockRef(vol.id, in_use, 0, BlockType.DATA))  # in flight: kept
    assert live.is_dead(BlockRef(vol.id, committed.inode - 1, 0, BlockType.DATA))  # superseded


@pytest.mark.parametrize("intervening", ["allocate", "snapshot", "resize"])
def test_a_reserved_index_is_dropped_once_another_client_appended_to_the_volume(
    meta: MetadataService, open_backend: Callable[[], SQLiteBackend], intervening: str
) -> None:
    vol = meta.create_volume("a", MiB)
    lock = meta.lock_volume("a", "me", meta.backend.leases.grant(30))
    committed = _flush(meta, lock)
    other = MetadataService(open_backend(), ring_types=RING_TYPES)
    seen = {committed.inode}
    if intervening == "allocate":
        seen.add(other.allocate_inode_index(vol.id))
    elif intervening == "snapshot":
        other.save_snapshot("a", "s")
    else:
        other.resize_volume("a", 2 * MiB)
    mine = meta.allocate_inode_index(vol.id)
    assert mine not in seen and mine > max(seen)
    # ... and it is the highest allocated index, as the GC expects of an index in use.
    assert other.state().volumes[vol.id].last_inode_index == mine
    meta.commit_inode(lock, INodeRef(vol.id, mine))
    assert other.current_inode(vol.id) == INodeRef(vol.id, mine)


def test_own_snapshot_and_resize_while_locked_do_not_cost_the_commit_a_retry(meta: MetadataService) -> None:
    vol = meta.create_volume("a", MiB)
    lock = meta.lock_volume("a", "me", meta.backend.leases.grant(30))
    ref = _flush(meta, lock)
    meta.save_snapshot("a", "s")
    meta.resize_volume("a", 2 * MiB)
    committer = _committer(meta)
    index = meta.allocate_inode_index(vol.id)  # the stream moved: one allocation event
    before = committer.commits
    meta.commit_inode(lock, INodeRef(vol.id, index))
    assert committer.commits - before == 1
    assert lock.seen_version == meta.backend.log.stream_version(volume_stream(vol.id))
    assert meta.get_snapshot("a", "s").inode_ref == ref


def test_a_holder_whose_lease_was_revoked_fails_its_next_commit_despite_a_reservation(
    meta: MetadataService,
) -> None:
    vol = meta.create_volume("a", MiB)
    lease = meta.backend.leases.grant(30)
    lock = meta.lock_volume("a", "me", lease)
    ref = _flush(meta, lock)
    index = meta.allocate_inode_index(vol.id)  # the reservation: no I/O but a version read
    meta.backend.leases.revoke(lease)
    with pytest.raises(Locked):
        meta.commit_inode(lock, INodeRef(vol.id, index))
    assert meta.current_inode(vol.id) == ref


def test_a_holder_taken_over_gets_a_fresh_index_and_its_commit_is_refused(
    meta: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    vol = meta.create_volume("a", MiB)
    lease = meta.backend.leases.grant(30)
    lock_a = meta.lock_volume("a", "client-a", lease)
    committed = _flush(meta, lock_a)
    meta.backend.leases.revoke(lease)  # as if A's lease expired
    b = MetadataService(open_backend(), ring_types=RING_TYPES)
    lock_b = b.lock_volume("a", "client-b", b.backend.leases.grant(30))
    b_ref = _flush(b, lock_b)
    index = meta.allocate_inode_index(vol.id)
    assert index not in (committed.inode, b_ref.inode, committed.inode + 1)
    meta.backend.leases.put(lock_a.key, lock_a.value)  # even if A's key check passed ...
    with pytest.raises(Locked):
        meta.commit_inode(lock_a, INodeRef(vol.id, index))  # ... the log refuses A
    assert b.current_inode(vol.id) == b_ref


def test_the_projector_applies_its_own_appends_and_equals_a_replay(
    meta: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    meta.create_volume("a", MiB)
    lock = meta.lock_volume("a", "me", meta.backend.leases.grant(30))
    _flush(meta, lock)
    _flush(meta, lock)
    backend = meta.backend
    assert isinstance(backend, SQLiteBackend)
    # Applied locally: already at the head without a catch-up.
    assert meta.projector.state.position == backend.log.head_position()
    assert meta.projector.state == _replay(backend)
    # Another client appends: our next append leaves a gap, so it is not applied locally ...
    other = MetadataService(open_backend(), ring_types=RING_TYPES)
    other.create_volume("b", MiB)
    _flush(meta, lock)
    assert meta.projector.state.position < backend.log.head_position()
    # ... and the next read catches up to exactly the replayed state.
    assert meta.state() == _replay(backend)
    assert Projector(backend.log).load() == meta.state()
