# mypy: allow-untyped-defs
"""Volume-lock takeover and lease keeping: a restarted holder breaks the lock of its own dead
earlier incarnation (and fences it), nobody else can; a Locked error names the holder; the
keeper survives a metadata outage shorter than the TTL and gives the lease up at its expiry.

Real backends only: SQLite, and a real etcd / redis-server (outages are the server process
SIGSTOPped, or an exclusive SQLite transaction held by another connection)."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torus_blockstore_mem.store import MemBlockStore
from torus_sqlite.backend import SQLiteBackend

from torus_core.block import BlockVolume
from torus_core.block.identity import DataDirClaim
from torus_core.block.nbd_export import VolumeExportProvider
from torus_core.blockset import default_layer_registry
from torus_core.blockstore import BlockStoreConfig
from torus_core.errors import InvalidArgument, Locked
from torus_core.metadata import MetadataService, format_owner, parse_owner
from torus_core.plugins import make_plugin_manager
from torus_core.ring.builtin import builtin_ring_types
from torus_core.testing.services import EtcdServer, RedisServer, etcd_service, redis_service

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

BS = 4096
MiB = 1 << 20


@pytest.fixture
def md(open_backend: Callable[[], SQLiteBackend]) -> MetadataService:
    m = MetadataService(open_backend(), ring_types=RING_TYPES)
    m.format(BS, "crc,base")
    m.create_volume("v", MiB)
    return m


@pytest.fixture
def store() -> Iterator[MemBlockStore]:
    s = MemBlockStore.open(BlockStoreConfig(block_size=BS, capacity_bytes=16 * MiB))
    yield s
    s.close()


def test_owner_strings_name_peer_and_boot_and_parse_back():
    owner = format_owner("peer-a", "boot-1")
    fields = parse_owner(owner)
    assert fields["peer"] == "peer-a" and fields["boot"] == "boot-1" and "pid" in fields
    assert parse_owner("host/123/abcd") == {}
    with pytest.raises(InvalidArgument):
        format_owner("peer a", "b")


def test_restarted_holder_takes_over_its_dead_incarnations_lock_at_once_and_fences_it(md, store, caplog):
    old = BlockVolume.open(
        md, store, "v", owner=format_owner("peer-a", "boot-1"), lease_ttl=60, layer_registry=LAYERS
    )
    old.write_at(0, b"old" * 100)
    old.sync()
    assert old.keeper is not None
    old.keeper.stop()  # the old process "dies": its 60 s lease stays alive on the server
    epoch = md.lock_status("v").epoch
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="torus_core.metadata"):
        new = BlockVolume.open(
            md, store, "v", owner=format_owner("peer-a", "boot-2"), take_over=True, layer_registry=LAYERS
        )
    assert time.monotonic() - started < 2.0, "took over without waiting for the lease"
    assert any("broke the lock" in r.getMessage() and "boot=boot-1" in r.getMessage() for r in caplog.records)
    assert md.lock_status("v").epoch == epoch + 1
    assert md.lock_holder("v").boot == "boot-2"
    assert new.read_at(0, 300) == b"old" * 100  # flushed data of the dead incarnation
    new.write_at(0, b"new")
    committed = new.sync()
    # fencing: the old incarnation (were it somehow alive) can commit nothing any more
    with pytest.raises(Locked):
        old.write_at(BS, b"s" * BS)  # a whole block: no read of blocks the new holder may free
        old.sync()
    old.close()  # releases quietly without disturbing the new holder
    assert md.current_inode(new.volume_id) == committed
    assert md.lock_holder("v").boot == "boot-2"
    assert new.read_at(BS, BS) == bytes(BS)
    new.close()
    assert not md.lock_status("v").locked


def test_a_different_peer_cannot_take_over_a_live_lock_and_is_told_who_holds_it_until_when(md, store):
    with BlockVolume.open(
        md, store, "v", owner=format_owner("peer-a", "boot-1"), lease_ttl=5, layer_registry=LAYERS
    ):
        before = time.time()
        with pytest.raises(Locked) as err:
            BlockVolume.open(
                md, store, "v", owner=format_owner("peer-b", "boot-9"), take_over=True, layer_registry=LAYERS
            )
        text = str(err.value)
        assert text.startswith("volume 'v' is locked by peer peer-a (owner 'peer=peer-a boot=boot-1")
        assert "(lease 5 s) unless the holder renews it" in text
        until = time.strptime(text.split(" until ")[1].split(" (lease")[0], "%Y-%m-%d %H:%M:%SZ")
        assert before - 1 <= time.mktime(until) - time.timezone <= before + 5 + 2
        holder = md.lock_holder("v")
        assert holder is not None and holder.peer == "peer-a" and holder.ttl == 5.0
    assert md.lock_holder("v") is None


def test_the_same_incarnation_or_an_anonymous_owner_never_breaks_a_lock(md, store):
    owner = format_owner("peer-a", "boot-1")
    with BlockVolume.open(md, store, "v", owner=owner, layer_registry=LAYERS):
        with pytest.raises(Locked):
            BlockVolume.open(md, store, "v", owner=owner, take_over=True, layer_registry=LAYERS)
        with pytest.raises(Locked, match="is locked by peer peer-a"):
            BlockVolume.open(md, store, "v", owner="someone/else", layer_registry=LAYERS)
        with pytest.raises(InvalidArgument):
            md.take_over_volume("v", "host/1/anonymous", md.leases.grant(5))
    with BlockVolume.open(md, store, "v", owner="anon/1/x", layer_registry=LAYERS):
        with pytest.raises(Locked, match="locked by 'anon/1/x'"):
            BlockVolume.open(
                md, store, "v", owner=format_owner("peer-a", "boot-2"), take_over=True, layer_registry=LAYERS
            )


def test_a_lock_left_by_this_very_process_is_reclaimed_only_when_the_caller_vouches_for_it(md, store):
    """A release that failed (metadata outage) leaves a lock naming this process; a restarted
    etcd keeps its lease alive for a TTL. The export provider, which knows no open volume of it
    uses the lock, reclaims it at once; the leftover holder stays fenced."""
    owner = format_owner("peer-a", "boot-1")
    leftover = BlockVolume.open(md, store, "v", owner=owner, lease_ttl=60, layer_registry=LAYERS)
    leftover.write_at(0, b"left" * 100)
    assert leftover.keeper is not None
    leftover.keeper.stop()  # its release "failed": the lock and its 60 s lease stay
    epoch = md.lock_status("v").epoch
    with pytest.raises(Locked, match="is locked by peer peer-a"):
        md.take_over_volume("v", owner, md.leases.grant(5))
    provider = VolumeExportProvider(md, store, owner=owner, take_over=True, layer_registry=LAYERS)
    started = time.monotonic()
    export = provider.open_export("v")
    try:
        assert time.monotonic() - started < 5  # not the 60 s lease
        assert md.lock_status("v").epoch == epoch + 1
        with pytest.raises(Locked):
            leftover.sync()  # fenced: the leftover can commit nothing
        export.write(0, b"new" * 100, fua=True)
    finally:
        export.close()
        provider.close()


def test_a_data_dir_claim_is_exclusive_and_freed_when_released(tmp_path):
    first = DataDirClaim.acquire(str(tmp_path))
    assert first is not None and first.held
    assert DataDirClaim.acquire(str(tmp_path)) is None  # another holder (even in-process) is refused
    peer = first.identity.peer
    assert (tmp_path / "metadata" / "uuid").read_text().strip() == peer
    first.release()
    again = DataDirClaim.acquire(str(tmp_path))
    assert again is not None and again.identity.peer == peer
    again.release()


# --- the keeper under metadata outages, on every backend ------------------------------------


@contextlib.contextmanager
def _sqlite_locked(path: Path, seconds: float) -> Iterator[None]:
    """Another connection holds an exclusive transaction: every write waits (busy timeout)."""
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture(params=["sqlite", "etcd", "redis"])
def outage_backend(request, tmp_path) -> Iterator[tuple[MetadataService, Callable[[float], None]]]:
    """A formatted MetadataService and ``outage(seconds)``: the backend stops answering that long."""
    registry = make_plugin_manager().collect_registries().metadata
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            db = tmp_path / "meta.db"
            backend = registry.get("sqlite").from_url(f"sqlite:///{db}")

            def outage(seconds: float) -> None:
                with _sqlite_locked(db, seconds):
                    pass

        else:
            server: EtcdServer | RedisServer
            if request.param == "etcd":
                server = stack.enter_context(etcd_service())
            else:
                server = stack.enter_context(redis_service())
            backend = registry.get(request.param).from_url(server.url)

            def outage(seconds: float) -> None:
                with server.paused():
                    time.sleep(seconds)

        stack.callback(backend.close)
        m = MetadataService(backend, ring_types=RING_TYPES)
        m.format(BS, "crc,base")
        m.create_volume("v", MiB)
        yield m, outage


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.timeout(120)
def test_an_outage_shorter_than_the_ttl_keeps_the_lock(outage_backend, store):
    md, outage = outage_backend
    ttl = 3.0  # etcd leases are whole seconds
    with BlockVolume.open(md, store, "v", owner="keeper-test", lease_ttl=ttl, layer_registry=LAYERS) as vol:
        assert vol.keeper is not None
        # start right after a renewal so the outage fits (1.6 s < 2/3 ttl is survived anyway)
        keeper = vol.keeper
        renewals = keeper.renewals
        assert _wait(lambda: keeper.renewals > renewals, 5)
        outage(1.6)
        renewals = keeper.renewals
        assert _wait(lambda: keeper.renewals > renewals, 5), "no keepalive succeeded after the outage"
        assert not vol.lost
        vol.write_at(0, b"still mine")
        vol.sync()
        assert md.lock_status("v").owner == "keeper-test"


@pytest.mark.timeout(120)
def test_an_outage_longer_than_the_ttl_loses_the_lock_at_its_expiry_while_calls_hang(outage_backend, store):
    md, outage = outage_backend
    ttl = 2.0
    vol = BlockVolume.open(md, store, "v", owner="keeper-test", lease_ttl=ttl, layer_registry=LAYERS)
    try:
        assert vol.keeper is not None
        lost_at: list[float] = []
        start = time.monotonic()
        deadline = start + vol.keeper.expires_in

        def watch() -> None:
            if _wait(lambda: vol.lost, 3 * ttl + 5):
                lost_at.append(time.monotonic())

        watcher = threading.Thread(target=watch)
        watcher.start()
        outage(ttl + 1.5)
        watcher.join(3 * ttl + 10)
        assert lost_at, "the keeper never gave the lease up"
        # given up at the lease's earliest expiry (not after the backend came back), +slack
        assert lost_at[0] <= deadline + ttl / 3 + 0.5 + 0.5
        with pytest.raises(Locked):
            vol.write_at(0, b"x")
    finally:
        vol.close()
    # the volume can be locked again afterwards (the old lease is gone or expires)
    assert _wait(lambda: not md.lock_status("v").locked, 3 * ttl)
    with BlockVolume.open(md, store, "v", owner="next", lease_ttl=ttl, layer_registry=LAYERS):
        pass
