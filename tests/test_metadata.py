"""MetadataService against the real SQLite backend: cluster, volumes, locks and fencing, snapshots."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from torus_sqlite.backend import SQLiteBackend

from torus_core.errors import (
    Again,
    AlreadyExists,
    InvalidArgument,
    LeaseNotFound,
    Locked,
    NoGlobalMetadata,
    NonSequentialRing,
    NotExist,
)
from torus_core.events import INodeCommitted, VolumeCreated, VolumeLockAcquired, volume_stream
from torus_core.metadata import MetadataService
from torus_core.refs import INodeRef
from torus_core.ring.base import RingMember, RingSpec
from torus_core.ring.builtin import builtin_ring_types

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

MiB = 2**20


@pytest.fixture
def meta(open_backend: Callable[[], SQLiteBackend]) -> MetadataService:
    return MetadataService(open_backend(), ring_types=RING_TYPES)


@pytest.fixture
def formatted(meta: MetadataService) -> MetadataService:
    meta.format(4096)
    return meta


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- cluster and ring ----------------------------------------------------------------------------


def test_unformatted_cluster_raises_no_global_metadata(meta: MetadataService) -> None:
    with pytest.raises(NoGlobalMetadata):
        meta.global_metadata()
    with pytest.raises(NoGlobalMetadata):
        meta.get_ring()
    with pytest.raises(NoGlobalMetadata):
        meta.set_ring(RingSpec("empty", 2, 0))


def test_format_records_global_metadata_and_ring_version_one(meta: MetadataService) -> None:
    ring = RingSpec("single", 1, 1, (RingMember("peer-1", 100, "127.0.0.1:40000"),))
    meta.format(512 * 1024, "crc,base", ring)
    gm = meta.global_metadata()
    assert (gm.block_size, gm.block_spec, gm.ring_type, gm.replication) == (
        512 * 1024,
        "crc,base",
        "single",
        1,
    )
    assert meta.get_ring() == ring


def test_second_format_raises_already_exists_and_changes_nothing(formatted: MetadataService) -> None:
    with pytest.raises(AlreadyExists):
        formatted.format(8192)
    assert formatted.global_metadata().block_size == 4096


@pytest.mark.parametrize(
    "args",
    [
        (0, "crc,base", None),
        (-1, "crc,base", None),
        (4096, "", None),
        (4096, "crc,base", RingSpec("empty", 2, 0)),
        (4096, "crc,base", RingSpec("single", 1, 1)),  # a single ring needs one member
    ],
)
def test_format_rejects_bad_arguments(meta: MetadataService, args: tuple) -> None:
    with pytest.raises(InvalidArgument):
        meta.format(*args)
    with pytest.raises(NoGlobalMetadata):
        meta.global_metadata()


def test_format_with_unknown_ring_type_raises_invalid_argument(meta: MetadataService) -> None:
    with pytest.raises(InvalidArgument):
        meta.format(4096, ring=RingSpec("no-such-ring", 1, 1))


def test_set_ring_requires_exactly_the_next_version(formatted: MetadataService) -> None:
    member = RingMember("p1", 10, "127.0.0.1:1")
    with pytest.raises(NonSequentialRing):
        formatted.set_ring(RingSpec("mod", 3, 1, (member,)))
    with pytest.raises(NonSequentialRing):
        formatted.set_ring(RingSpec("mod", 1, 1, (member,)))
    formatted.set_ring(RingSpec("mod", 2, 1, (member,)))
    assert formatted.get_ring().version == 2
    assert formatted.get_ring().members == (member,)


def test_racing_ring_changes_let_exactly_one_win(
    formatted: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    services = [MetadataService(open_backend(), ring_types=RING_TYPES) for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(services), timeout=30)

    def change(svc: MetadataService, i: int) -> None:
        barrier.wait()
        try:
            svc.set_ring(RingSpec("mod", 2, 1, (RingMember(f"p{i}"),)))
            outcomes.append("ok")
        except (NonSequentialRing, Again) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=change, args=(s, i)) for i, s in enumerate(services)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes).count("ok") == 1
    assert len(outcomes) == 4
    assert formatted.get_ring().version == 2


# --- volumes ------------------------------------------------------------------------------------


def test_create_get_list_volumes(formatted: MetadataService) -> None:
    a = formatted.create_volume("a", MiB)
    b = formatted.create_volume("b", 2 * MiB)
    assert (a.id, b.id) == (1, 2)
    assert formatted.get_volume("a") == a
    assert formatted.get_volume_by_id(2) == b
    assert [v.name for v in formatted.list_volumes()] == ["a", "b"]
    assert a.type == "block"
    with pytest.raises(NotExist):
        formatted.get_volume("c")
    with pytest.raises(NotExist):
        formatted.get_volume_by_id(99)


def test_volume_sizes_nbd_cannot_carry_are_refused_at_create_and_resize(formatted: MetadataService) -> None:
    """2^64 used to be accepted and NBD GO then crashed with struct.error."""
    for size in (2**64, 2**63):
        with pytest.raises(InvalidArgument, match="larger than the maximum"):
            formatted.create_volume("huge", size)
    formatted.create_volume("a", MiB)
    with pytest.raises(InvalidArgument, match="larger than the maximum"):
        formatted.resize_volume("a", 2**64 + 1)
    assert formatted.resize_volume("a", 2**63 - 1).size == 2**63 - 1


def test_duplicate_volume_name_raises_already_exists(formatted: MetadataService) -> None:
    formatted.create_volume("a", MiB)
    with pytest.raises(AlreadyExists):
        formatted.create_volume("a", 2 * MiB)
    assert formatted.get_volume("a").size == MiB


def test_deleted_name_can_be_reused_with_a_new_id(formatted: MetadataService) -> None:
    first = formatted.create_volume("a", MiB)
    formatted.delete_volume("a")
    with pytest.raises(NotExist):
        formatted.get_volume("a")
    second = formatted.create_volume("a", 3 * MiB)
    assert second.id != first.id
    assert formatted.get_volume("a") == second
    with pytest.raises(NotExist):
        formatted.get_volume_by_id(first.id)


@pytest.mark.parametrize("name", ["", "a/b", "a@b", " a", "x" * 300, "tab\there"])
def test_bad_volume_names_raise_invalid_argument(formatted: MetadataService, name: str) -> None:
    with pytest.raises(InvalidArgument):
        formatted.create_volume(name, MiB)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_volume_sizes_raise_invalid_argument(formatted: MetadataService, size: object) -> None:
    with pytest.raises(InvalidArgument):
        formatted.create_volume("a", size)  # type: ignore[arg-type]


def test_concurrent_creators_get_unique_ids_and_one_owner_per_name(
    formatted: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    services = [MetadataService(open_backend(), ring_types=RING_TYPES) for _ in range(4)]
    created: list[tuple[str, int]] = []
    refused: list[str] = []
    errors: list[BaseException] = []

    def work(svc: MetadataService, i: int) -> None:
        try:
            for j in range(5):
                created.append((f"own-{i}-{j}", svc.create_volume(f"own-{i}-{j}", MiB).id))
                try:
                    created.append(("shared", svc.create_volume("shared", MiB).id))
                except AlreadyExists:
                    refused.append("shared")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, i)) for i, s in enumerate(services)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    ids = [vid for _, vid in created]
    assert len(ids) == len(set(ids)) == 4 * 5 + 1
    assert len(refused) == 4 * 5 - 1
    assert {(v.name, v.id) for v in formatted.list_volumes()} == set(created)


def test_resize_grows_and_refuses_to_shrink(formatted: MetadataService) -> None:
    formatted.create_volume("a", 2 * MiB)
    assert formatted.resize_volume("a", 4 * MiB).size == 4 * MiB
    assert formatted.get_volume("a").size == 4 * MiB
    with pytest.raises(InvalidArgument):
        formatted.resize_volume("a", MiB)
    assert formatted.resize_volume("a", 4 * MiB).size == 4 * MiB
    with pytest.raises(NotExist):
        formatted.resize_volume("nope", MiB)


def test_fresh_volume_has_virtual_inode_one_and_indexes_start_at_two(formatted: MetadataService) -> None:
    vol = formatted.create_volume("a", MiB)
    assert formatted.current_inode(vol.id) == INodeRef(vol.id, 1)
    assert [formatted.allocate_inode_index(vol.id) for _ in range(3)] == [2, 3, 4]
    with pytest.raises(NotExist):
        formatted.allocate_inode_index(999)


# --- locks and fencing --------------------------------------------------------------------------


def test_lock_is_exclusive_and_blocks_delete_and_restore(formatted: MetadataService) -> None:
    formatted.create_volume("a", MiB)
    formatted.save_snapshot("a", "s")
    lease_a, lease_b = formatted.leases.grant(30), formatted.leases.grant(30)
    lock = formatted.lock_volume("a", "client-a", lease_a)
    assert lock.epoch == 1
    status = formatted.lock_status("a")
    assert (status.locked, status.owner, status.epoch) == (True, "client-a", 1)
    with pytest.raises(Locked):
        formatted.lock_volume("a", "client-b", lease_b)
    with pytest.raises(Locked):
        formatted.delete_volume("a")
    with pytest.raises(Locked):
        formatted.restore_snapshot("a", "s")
    formatted.unlock(lock)
    assert formatted.lock_status("a").locked is False
    second = formatted.lock_volume("a", "client-b", lease_b)
    assert second.epoch == 2
    formatted.unlock(second)
    formatted.delete_volume("a")


def test_lock_with_a_revoked_lease_raises_lease_not_found(formatted: MetadataService) -> None:
    formatted.create_volume("a", MiB)
    lease = formatted.leases.grant(30)
    formatted.leases.revoke(lease)
    with pytest.raises(LeaseNotFound):
        formatted.lock_volume("a", "me", lease)
    assert formatted.lock_status("a").locked is False


def test_commit_moves_the_current_inode(formatted: MetadataService) -> None:
    vol = formatted.create_volume("a", MiB)
    lock = formatted.lock_volume("a", "me", formatted.leases.grant(30))
    for _ in range(3):
        ref = INodeRef(vol.id, formatted.allocate_inode_index(vol.id))
        formatted.commit_inode(lock, ref)
        assert formatted.current_inode(vol.id) == ref
    with pytest.raises(InvalidArgument):
        formatted.commit_inode(lock, INodeRef(vol.id + 1, 5))


def test_commit_survives_unrelated_appends_by_other_clients(
    formatted: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    other = MetadataService(open_backend(), ring_types=RING_TYPES)
    vol = formatted.create_volume("a", MiB)
    lock = formatted.lock_volume("a", "me", formatted.leases.grant(30))
    idx = other.allocate_inode_index(vol.id)
    other.save_snapshot("a", "while-mounted")
    other.resize_volume("a", 2 * MiB)
    formatted.commit_inode(lock, INodeRef(vol.id, idx))
    assert other.current_inode(vol.id) == INodeRef(vol.id, idx)


def test_writer_whose_lease_expired_is_fenced_out_by_the_new_holder(
    formatted: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    b = MetadataService(open_backend(), ring_types=RING_TYPES)
    vol = formatted.create_volume("a", MiB)
    lock_a = formatted.lock_volume("a", "client-a", formatted.leases.grant(1.0))
    formatted.commit_inode(lock_a, INodeRef(vol.id, formatted.allocate_inode_index(vol.id)))
    # A stops renewing; once its lease expires, B takes the lock over.
    assert _wait_until(lambda: not b.lock_status("a").locked, 8.0)
    lock_b = b.lock_volume("a", "client-b", b.leases.grant(30))
    assert lock_b.epoch == lock_a.epoch + 1
    b_ref = INodeRef(vol.id, b.allocate_inode_index(vol.id))
    b.commit_inode(lock_b, b_ref)
    with pytest.raises(Locked):
        formatted.commit_inode(lock_a, INodeRef(vol.id, formatted.allocate_inode_index(vol.id)))
    assert formatted.current_inode(vol.id) == b_ref
    with pytest.raises(Locked):
        formatted.unlock(lock_a)
    assert b.lock_status("a").owner == "client-b"


def test_commit_of_a_lost_lock_is_refused_by_the_log_even_if_the_key_check_passed(
    formatted: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    """The log itself fences: a stale holder whose seen version predates a takeover fails."""
    b = MetadataService(open_backend(), ring_types=RING_TYPES)
    vol = formatted.create_volume("a", MiB)
    lease = formatted.leases.grant(30)
    lock_a = formatted.lock_volume("a", "client-a", lease)
    # Simulate the takeover race: A's key is replaced by B's (as after expiry) and B appends
    # its acquisition; then A's key check is made to pass again by restoring A's value.
    formatted.leases.revoke(lease)
    lock_b = b.lock_volume("a", "client-b", b.leases.grant(30))
    formatted.leases.put(lock_a.key, lock_a.value)
    with pytest.raises(Locked):
        formatted.commit_inode(lock_a, INodeRef(vol.id, 7))
    assert formatted.current_inode(vol.id) == INodeRef(vol.id, 1)
    stream = [e.event for e in formatted.events(stream=volume_stream(vol.id))]
    assert not any(isinstance(e, INodeCommitted) for e in stream)
    assert [e.epoch for e in stream if isinstance(e, VolumeLockAcquired)] == [1, lock_b.epoch]


# --- snapshots ----------------------------------------------------------------------------------


def test_snapshots_record_restore_and_delete(formatted: MetadataService) -> None:
    vol = formatted.create_volume("a", MiB)
    lock = formatted.lock_volume("a", "me", formatted.leases.grant(30))
    first = INodeRef(vol.id, formatted.allocate_inode_index(vol.id))
    formatted.commit_inode(lock, first)
    s1 = formatted.save_snapshot("a", "s1")
    assert s1.inode_ref == first
    second = INodeRef(vol.id, formatted.allocate_inode_index(vol.id))
    formatted.commit_inode(lock, second)
    formatted.save_snapshot("a", "s2")
    with pytest.raises(AlreadyExists):
        formatted.save_snapshot("a", "s1")
    assert [s.name for s in formatted.list_snapshots("a")] == ["s1", "s2"]
    assert formatted.get_snapshot("a", "s2").inode_ref == second
    formatted.unlock(lock)
    assert formatted.restore_snapshot("a", "s1") == first
    assert formatted.current_inode(vol.id) == first
    formatted.delete_snapshot("a", "s1")
    assert [s.name for s in formatted.list_snapshots("a")] == ["s2"]
    with pytest.raises(NotExist):
        formatted.delete_snapshot("a", "s1")
    with pytest.raises(NotExist):
        formatted.get_snapshot("a", "s1")
    with pytest.raises(NotExist):
        formatted.restore_snapshot("a", "s1")


# --- peers and events ---------------------------------------------------------------------------


def test_peers_live_as_long_as_their_lease(formatted: MetadataService) -> None:
    lease = formatted.leases.grant(30)
    formatted.register_peer({"uuid": "p1", "address": "127.0.0.1:4000", "total_blocks": 10}, lease)
    formatted.register_peer({"uuid": "p2", "address": ""}, formatted.leases.grant(30))
    assert [p["uuid"] for p in formatted.list_peers()] == ["p1", "p2"]
    assert formatted.list_peers()[0]["total_blocks"] == 10
    formatted.leases.revoke(lease)
    assert [p["uuid"] for p in formatted.list_peers()] == ["p2"]
    with pytest.raises(InvalidArgument):
        formatted.register_peer({"address": "x"}, formatted.leases.grant(30))


def test_events_and_follow_expose_the_decoded_log(
    formatted: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    formatted.create_volume("a", MiB)
    topics = [e.topic for e in formatted.events()]
    assert topics[:2] == ["torus.cluster.formatted", "torus.ring.changed"]
    assert [type(e.event) for e in formatted.events(stream="volume-1")] == [VolumeCreated]
    head = formatted.events()[-1].position
    other = MetadataService(open_backend(), ring_types=RING_TYPES)
    timer = threading.Timer(0.3, lambda: other.create_volume("b", MiB))
    timer.start()
    try:
        got = formatted.follow(head, timeout=10)
    finally:
        timer.join(timeout=30)
    assert got and got[0].position == head + 1
    assert formatted.follow(formatted.events()[-1].position, timeout=0.2) == []


def test_a_new_service_on_the_same_store_sees_the_same_state(
    formatted: MetadataService, open_backend: Callable[[], SQLiteBackend]
) -> None:
    vol = formatted.create_volume("a", MiB)
    formatted.save_snapshot("a", "s")
    fresh = MetadataService(open_backend(), ring_types=RING_TYPES)
    assert fresh.get_volume("a") == vol
    assert fresh.state() == formatted.state()


def test_a_command_that_keeps_losing_races_backs_off_with_growing_jitter_then_raises_again(
    formatted: MetadataService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torus_core.metadata as metadata_module
    from torus_core.errors import CompareFailed

    sleeps: list[float] = []
    monkeypatch.setattr("torus_core.metadata.time.sleep", sleeps.append)

    def always_lose(*events: object) -> list[int]:
        raise CompareFailed("someone else appended first")

    monkeypatch.setattr(formatted, "_append", always_lose)
    with pytest.raises(Again, match=r"could not create volume 'v': too much contention"):
        formatted.create_volume("v", MiB)
    assert len(sleeps) == metadata_module.MAX_ATTEMPTS
    caps = [min(metadata_module.RETRY_CAP, metadata_module.RETRY_BASE * 2**n) for n in range(len(sleeps))]
    assert all(0.0 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))
    assert len(set(sleeps)) > 1  # jittered, not lock-step
    assert formatted.list_volumes() == []  # nothing was written


def test_a_lost_race_is_decided_again_against_the_new_state(
    formatted: MetadataService, open_backend: Callable[[], SQLiteBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = MetadataService(open_backend(), ring_types=RING_TYPES)
    real_append = formatted._append
    calls = 0

    def lose_once_to_another_writer(*events: object) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            other.create_volume("theirs", MiB)  # takes the volume id this append expected
        return real_append(*events)  # type: ignore[arg-type]

    monkeypatch.setattr(formatted, "_append", lose_once_to_another_writer)
    mine = formatted.create_volume("mine", MiB)
    assert calls == 2
    assert mine.id == other.get_volume("theirs").id + 1
    assert {v.name for v in formatted.list_volumes()} == {"mine", "theirs"}


def test_no_module_outside_the_metadata_service_reaches_into_its_backend() -> None:
    import re
    from pathlib import Path

    import torus_core

    root = Path(torus_core.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        if path.name != "metadata.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bmd\.backend\b|\bmetadata_service\(\)\.backend\b", line)
    ]
    assert offenders == [], "use MetadataService's own API (md.leases, md.head_position())"
