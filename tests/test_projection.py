"""ClusterState is a pure fold: snapshot + tail equals full replay; snapshots are a cache."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torus_sqlite.backend import SQLiteBackend

from torus_core.errors import AlreadyExists, InvalidArgument, Locked, NonSequentialRing, NotExist, SchemaError
from torus_core.events import REGISTRY
from torus_core.metadata import MetadataService
from torus_core.projection import ClusterState, Projector, apply, fold, state_from_bytes, state_to_bytes
from torus_core.refs import INodeRef
from torus_core.ring.base import RingMember, RingSpec
from torus_core.ring.builtin import builtin_ring_types

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

NAMES = ["a", "b", "c"]

_command = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(NAMES), st.integers(1, 4)),
    st.tuples(st.just("delete"), st.sampled_from(NAMES)),
    st.tuples(st.just("resize"), st.sampled_from(NAMES), st.integers(1, 8)),
    st.tuples(st.just("write"), st.sampled_from(NAMES)),
    st.tuples(st.just("hold"), st.sampled_from(NAMES)),
    st.tuples(st.just("snap"), st.sampled_from(NAMES), st.sampled_from(["s1", "s2"])),
    st.tuples(st.just("unsnap"), st.sampled_from(NAMES), st.sampled_from(["s1", "s2"])),
    st.tuples(st.just("restore"), st.sampled_from(NAMES), st.sampled_from(["s1", "s2"])),
    st.tuples(st.just("ring"), st.integers(1, 3)),
)


def _run(meta: MetadataService, commands: list[tuple]) -> None:
    """Execute commands, ignoring the refusals a real user would also get."""
    for cmd in commands:
        kind, *args = cmd
        try:
            if kind == "create":
                meta.create_volume(args[0], args[1] * 4096)
            elif kind == "delete":
                meta.delete_volume(args[0])
            elif kind == "resize":
                meta.resize_volume(args[0], args[1] * 4096)
            elif kind in ("write", "hold"):
                vol = meta.get_volume(args[0])
                lock = meta.lock_volume(args[0], "w", meta.backend.leases.grant(60))
                meta.commit_inode(lock, INodeRef(vol.id, meta.allocate_inode_index(vol.id)))
                if kind == "write":
                    meta.unlock(lock)
            elif kind == "snap":
                meta.save_snapshot(args[0], args[1])
            elif kind == "unsnap":
                meta.delete_snapshot(args[0], args[1])
            elif kind == "restore":
                meta.restore_snapshot(args[0], args[1])
            elif kind == "ring":
                ring = meta.get_ring()
                members = tuple(RingMember(f"p{i}", 10) for i in range(args[0]))
                meta.set_ring(RingSpec("mod", ring.version + 1, 1, members))
        except (NotExist, AlreadyExists, Locked, InvalidArgument, NonSequentialRing):
            pass


@pytest.fixture
def meta(tmp_path: Path) -> Iterator[MetadataService]:
    with SQLiteBackend.from_url(f"sqlite:///{tmp_path}/m.db") as backend:
        svc = MetadataService(backend, ring_types=RING_TYPES)
        svc.format(4096)
        yield svc


@settings(max_examples=20)
@given(commands=st.lists(_command, max_size=25), data=st.data())
def test_snapshot_plus_tail_equals_full_replay(commands: list[tuple], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp, SQLiteBackend.from_url(f"sqlite:///{tmp}/m.db") as backend:
        meta = MetadataService(backend, snapshot_every=0, ring_types=RING_TYPES)
        meta.format(4096)
        _run(meta, commands)
        recorded = [REGISTRY.recorded(s) for s in backend.log.read_all()]
        full = fold(recorded)
        assert full == meta.state()
        # Any cut point: snapshot (encoded and decoded) of the prefix, then the tail.
        cut = data.draw(st.integers(0, len(recorded)))
        snap = state_from_bytes(state_to_bytes(fold(recorded[:cut])))
        assert fold(recorded[cut:], snap) == full
        # The projector's own stored snapshot, then the tail.
        every = data.draw(st.integers(1, 5))
        writer = Projector(backend.log, snapshot_every=every, page_size=every)
        assert writer.catch_up() == full
        stored = backend.log.load_snapshot(Projector.SNAPSHOT_NAME)
        if len(recorded) >= every:
            assert stored is not None and 0 < stored[0] <= full.position
        else:
            assert stored is None
        assert Projector(backend.log).load() == full


def test_apply_does_not_mutate_its_input(meta: MetadataService) -> None:
    _run(meta, [("create", "a", 1), ("write", "a"), ("snap", "a", "s1"), ("hold", "a")])
    recorded = [REGISTRY.recorded(s) for s in meta.backend.log.read_all()]
    state = ClusterState()
    for rec in recorded:
        before = copy.deepcopy(state)
        after = apply(state, rec)
        assert state == before  # the input is untouched
        assert after.position == rec.position
        state = after
    mid = fold(recorded[:-3])
    frozen = copy.deepcopy(mid)
    fold(recorded[-3:], mid)
    assert mid == frozen


def test_state_tracks_volumes_inodes_snapshots_locks_and_versions(meta: MetadataService) -> None:
    _run(meta, [("create", "a", 1), ("write", "a"), ("snap", "a", "s1"), ("hold", "a")])
    state = meta.state()
    vol = state.volume_by_name("a")
    assert vol is not None
    # "write": index 2 allocated, committed, and the commit reserved 3 for the next session; the
    # unlock (and the snapshot) moved the stream on, so "hold" could not use 3: it allocated 4,
    # and its commit reserved 5. Every index handed out or reserved counts as allocated.
    assert vol.last_inode_index == 5
    assert vol.inode == INodeRef(vol.id, 4)
    assert vol.snapshots["s1"].inode_ref == INodeRef(vol.id, 2)
    assert (vol.lock_epoch, vol.lock_owner) == (2, "w")
    assert state.stream_version(f"volume-{vol.id}") == meta.backend.log.stream_version(f"volume-{vol.id}")
    assert state.position == meta.backend.log.head_position()


def test_undecodable_snapshot_is_ignored_and_the_log_replayed(meta: MetadataService) -> None:
    _run(meta, [("create", "a", 1), ("create", "b", 2)])
    full = meta.state()
    meta.backend.log.save_snapshot(Projector.SNAPSHOT_NAME, full.position, b"garbage")
    assert Projector(meta.backend.log).load() == full
    with pytest.raises(SchemaError):
        state_from_bytes(b'{"format": 99, "state": {}}')


def test_projector_starts_over_after_the_log_is_wiped(meta: MetadataService) -> None:
    _run(meta, [("create", "a", 1)])
    assert meta.state().volume_by_name("a") is not None
    meta.backend.wipe()
    assert meta.state() == ClusterState()
    meta.format(8192)
    assert meta.global_metadata().block_size == 8192
