"""Metadata migration between backends (sqlite -> etcd -> redis -> sqlite) on live servers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torus_etcd.backend import EtcdBackend
from torus_redis.backend import RedisBackend
from torus_sqlite.backend import SQLiteBackend

from torus_core.errors import AlreadyExists
from torus_core.eventlog import MetadataBackend, NewEvent
from torus_core.events import REGISTRY, ClusterFormatted, VolumeCreated, VolumeNameClaimed, VolumeResized
from torus_core.migrate import MigrationError, compare_projections, migrate, verify_copy
from torus_core.projection import Projector
from torus_core.testing.services import EtcdServer, RedisServer

pytestmark = [pytest.mark.needs_etcd, pytest.mark.needs_redis]


@pytest.fixture
def make(
    tmp_path: Path, etcd_server: EtcdServer, redis_server: RedisServer
) -> Iterator[Callable[[str], MetadataBackend]]:
    """Open a fresh, empty backend of a kind (private prefix / file per call)."""
    opened: list[MetadataBackend] = []

    def factory(kind: str) -> MetadataBackend:
        tag = uuid.uuid4().hex
        b: MetadataBackend
        if kind == "sqlite":
            b = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/{tag}.db")
        elif kind == "etcd":
            b = EtcdBackend.from_url(f"{etcd_server.url}?prefix=/torus-mig-{tag}/")
        else:
            b = RedisBackend.from_url(f"{redis_server.url}?prefix=torus-mig-{tag}:")
        opened.append(b)
        return b

    yield factory
    for b in opened:
        b.wipe()
        b.close()


def _fill(b: MetadataBackend) -> None:
    """A small real cluster history plus opaque events in many streams and batches."""
    r = REGISTRY
    b.log.append([r.new_event("cluster", 1, ClusterFormatted(512 * 1024, "crc,base", "ketama", 2))])
    b.log.append(
        [
            r.new_event("volume-name:vol1", 1, VolumeNameClaimed("vol1", 1)),
            r.new_event("volume-1", 1, VolumeCreated(1, "vol1", 1 << 30)),
        ]
    )
    b.log.append([r.new_event("volume-1", 2, VolumeResized(1, 1 << 30, 2 << 30))])
    versions = {1: 2}
    for vid in range(2, 9):
        versions[vid] = 1
        b.log.append([r.new_event(f"volume-{vid}", 1, VolumeCreated(vid, f"vol{vid}", 1 << 20))])
    for i in range(0, 120, 3):  # multi-stream batches; > several copy batches and etcd txns
        batch = []
        for j in range(3):
            vid = (i + j) % 8 + 1
            versions[vid] += 1
            size = (i + j + 2) << 30
            batch.append(r.new_event(f"volume-{vid}", versions[vid], VolumeResized(vid, 0, size)))
        b.log.append(batch)
    b.log.save_snapshot("some-cache", 3, b"not copied")
    b.leases.put("nodes/x", b"not copied")


@pytest.mark.parametrize(("src", "dst"), [("sqlite", "etcd"), ("etcd", "redis"), ("redis", "sqlite")])
def test_migration_copies_every_event_with_equal_positions_and_projection(
    make: Callable[[str], MetadataBackend], src: str, dst: str
) -> None:
    source, target = make(src), make(dst)
    _fill(source)
    seen: list[tuple[int, int]] = []
    report = migrate(source, target, compare_projections, progress=lambda c, t: seen.append((c, t)))
    assert report.events == report.head == source.log.head_position() == 131
    assert seen[-1] == (131, 131)
    s_events, t_events = source.log.read_all(), target.log.read_all()
    assert [(e.position, e.stream_id, e.version, e.topic, e.state) for e in s_events] == [
        (e.position, e.stream_id, e.version, e.topic, e.state) for e in t_events
    ]
    for sid in ("volume-1", "volume-5", "cluster"):
        assert target.log.stream_version(sid) == source.log.stream_version(sid)
    state = Projector(target.log, snapshot_every=0).catch_up()
    assert state.global_metadata is not None and state.global_metadata.block_size == 512 * 1024
    assert state.volumes[1].size == (112 + 2) << 30
    assert state == Projector(source.log, snapshot_every=0).catch_up()
    # leases and snapshot caches are not copied
    assert target.leases.get("nodes/x") is None
    assert target.log.load_snapshot("some-cache") is None
    # the copy continues as a normal log: the next append gets the next position
    assert target.log.append([NewEvent("after-migration", 1, "test.opaque", b"")]) == [132]


def test_migration_refuses_a_non_empty_target_and_writes_nothing(
    make: Callable[[str], MetadataBackend],
) -> None:
    source, target = make("sqlite"), make("redis")
    _fill(source)
    target.log.append([NewEvent("other", 1, "test.opaque", b"keep")])
    with pytest.raises(AlreadyExists, match="must be empty"):
        migrate(source, target)
    assert [(e.stream_id, e.state) for e in target.log.read_all()] == [("other", b"keep")]


def test_verification_detects_a_diverging_target(make: Callable[[str], MetadataBackend]) -> None:
    source, target = make("etcd"), make("sqlite")
    source.log.append([NewEvent("s", 1, "t", b"a"), NewEvent("s", 2, "t", b"b")])
    target.log.append([NewEvent("s", 1, "t", b"a"), NewEvent("s", 2, "t", b"X")])
    with pytest.raises(MigrationError, match="position 2 differs"):
        verify_copy(source, target)
    target.log.append([NewEvent("s", 3, "t", b"c")])
    with pytest.raises(MigrationError, match="head differs"):
        verify_copy(source, target)


def test_a_failing_verify_hook_fails_the_migration(make: Callable[[str], MetadataBackend]) -> None:
    source, target = make("redis"), make("etcd")
    source.log.append([NewEvent("s", 1, "t", b"a")])

    def reject(_s: MetadataBackend, _t: MetadataBackend) -> None:
        raise MigrationError("projection mismatch (test hook)")

    with pytest.raises(MigrationError, match="test hook"):
        migrate(source, target, reject)
