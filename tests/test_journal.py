# mypy: allow-untyped-defs
"""The volume write journal: record format, crash images of the journal files, epoch fencing,
replay selection across replicas, and a state machine of writes, flushes, checkpoints and
crashes against a byte model (real SQLite metadata, real file block store, real journal files)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torus_blockstore_file.store import FileBlockStore
from torus_sqlite.backend import SQLiteBackend

from torus_core.block import BlockVolume
from torus_core.blockset import default_layer_registry
from torus_core.blockstore import BlockStoreConfig
from torus_core.errors import InvalidArgument, StaleEpoch
from torus_core.file import JOURNAL_SEQ_ATTR
from torus_core.journal import (
    Extent,
    JournalRecord,
    JournalStore,
    LocalJournalReplicas,
    decode_records,
    encode_record,
    select_replay,
)
from torus_core.journal.record import HEADER_SIZE, decode_record
from torus_core.journal.store import SEGMENT_CHUNK
from torus_core.metadata import MetadataService
from torus_core.ring.builtin import builtin_ring_types

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

extents = st.lists(
    st.one_of(
        st.builds(
            lambda o, d: Extent(o, len(d), d), st.integers(0, 1 << 40), st.binary(min_size=1, max_size=64)
        ),
        st.builds(lambda o, n: Extent(o, n), st.integers(0, 1 << 40), st.integers(1, 1 << 20)),
    ),
    max_size=5,
)


@given(st.integers(1, 1 << 40), st.integers(0, 1 << 63), st.integers(1, 1 << 63), extents)
def test_record_round_trips(vol, epoch, seq, exts):
    raw = encode_record(vol, epoch, seq, exts)
    assert decode_record(raw) == JournalRecord(vol, epoch, seq, tuple(exts))


@given(st.data())
def test_decoding_stops_at_the_last_whole_record_after_any_damage(data):
    recs = [encode_record(7, 1, s, [Extent(s * 10, 3, b"abc")]) for s in range(1, 5)]
    stream = bytearray(b"".join(recs))
    cut = data.draw(st.integers(0, len(stream)))
    flip = data.draw(st.integers(0, len(stream) - 1))
    damaged = bytearray(stream[:cut])
    if flip < cut:
        damaged[flip] ^= 0x40
    got, valid = decode_records(damaged)
    # every decoded record is one of the originals, in order, and they form a prefix
    assert [decode_record(r) for r in recs[: len(got)]] == got
    assert valid == sum(len(r) for r in recs[: len(got)])
    whole_before = 0
    pos = 0
    for r in recs:
        if pos + len(r) <= min(cut, flip if flip < cut else cut):
            whole_before += 1
        pos += len(r)
    assert len(got) >= whole_before


def test_bad_extents_are_refused_with_invalid_argument():
    with pytest.raises(InvalidArgument):
        encode_record(1, 1, 1, [Extent(0, 5, b"abc")])
    with pytest.raises(InvalidArgument):
        encode_record(1, 1, -1, [])
    with pytest.raises(InvalidArgument):
        decode_record(b"TJR1" + bytes(10))


def rec(seq, epoch=1, vol=3, data=b"x"):
    return encode_record(vol, epoch, seq, [Extent(seq, len(data), data)])


def test_store_appends_are_read_back_and_survive_reopening(tmp_path):
    js = JournalStore(tmp_path)
    js.append(3, 1, [rec(1), rec(2)])
    js.append(3, 1, [rec(3)])
    js.close()
    again = JournalStore(tmp_path)
    assert [r.seq for r in again.read(3, 0)] == [1, 2, 3]
    assert [r.seq for r in again.read(3, 1)] == [2, 3]
    assert again.fence(3, 1) == 3


def segment(tmp_path: Path, vol: int = 3) -> Path:
    (seg,) = sorted((tmp_path / str(vol)).glob("*.seg"))
    return seg


def put_after_records(seg: Path, extra: bytes) -> None:
    """Write ``extra`` right after the segment's last whole record (into its zero-filled tail),
    as a crash in the middle of the next append would leave it."""
    raw = bytearray(seg.read_bytes())
    _, valid = decode_records(raw)
    raw[valid : valid + len(extra)] = extra
    seg.write_bytes(raw)


def test_torn_tail_is_cut_and_later_appends_are_readable(tmp_path):
    js = JournalStore(tmp_path)
    js.append(3, 1, [rec(1), rec(2)])
    js.close()
    put_after_records(segment(tmp_path), rec(3)[: HEADER_SIZE + 1])  # a torn third record
    again = JournalStore(tmp_path)
    assert [r.seq for r in again.read(3, 0)] == [1, 2]
    again.append(3, 1, [rec(3, data=b"new")])
    assert [(r.seq, r.extents[0].data) for r in again.read(3, 0)] == [(1, b"x"), (2, b"x"), (3, b"new")]


def test_lost_tail_and_flipped_byte_stop_reading_at_the_last_whole_record(tmp_path):
    js = JournalStore(tmp_path)
    js.append(3, 1, [rec(1), rec(2), rec(3)])
    js.close()
    seg = segment(tmp_path)
    raw = bytearray(seg.read_bytes())
    one = len(rec(1))
    raw[one + HEADER_SIZE] ^= 1  # damage record 2's body
    seg.write_bytes(raw)
    assert [r.seq for r in JournalStore(tmp_path).read(3, 0)] == [1]


def test_duplicate_records_replay_once(tmp_path):
    js = JournalStore(tmp_path)
    js.append(3, 1, [rec(1), rec(2)])
    js.close()
    put_after_records(segment(tmp_path), rec(2))  # the same record twice (a retried write)
    records = JournalStore(tmp_path).read(3, 0)
    assert [r.seq for r in records] == [1, 2, 2]
    assert [r.seq for r in select_replay(records, 0)] == [1, 2]


def test_a_torn_batch_never_resurrects_its_records_after_a_shorter_append(tmp_path):
    js = JournalStore(tmp_path)
    js.append(3, 1, [rec(1)])
    js.close()
    torn = bytearray(rec(2, data=b"x" * 100) + rec(3))
    torn[HEADER_SIZE + 5] ^= 0xFF  # record 2 torn, record 3 whole behind it
    put_after_records(segment(tmp_path), bytes(torn))
    again = JournalStore(tmp_path)
    assert [r.seq for r in again.read(3, 0)] == [1]
    again.fence(3, 2)
    again.append(3, 2, [rec(2, epoch=2)])  # shorter than the torn batch
    assert [(r.seq, r.epoch) for r in again.read(3, 0)] == [(1, 1), (2, 2)]


def test_stale_epoch_is_refused_after_a_newer_fence_and_nothing_is_appended(tmp_path):
    js = JournalStore(tmp_path)
    js.append(3, 1, [rec(1)])
    js.fence(3, 2)
    with pytest.raises(StaleEpoch):
        js.append(3, 1, [rec(2)])
    with pytest.raises(StaleEpoch):
        js.fence(3, 1)
    js.close()
    assert [r.seq for r in JournalStore(tmp_path).read(3, 0)] == [1]
    with pytest.raises(StaleEpoch):
        JournalStore(tmp_path).append(3, 1, [rec(2)])  # the fence is durable


def test_append_refuses_records_of_another_volume_or_epoch_or_out_of_order(tmp_path):
    js = JournalStore(tmp_path)
    for bad in ([rec(1, vol=4)], [rec(1, epoch=2)], [rec(2), rec(1)], [b"junk"]):
        with pytest.raises(InvalidArgument):
            js.append(3, 1, bad)
    assert js.read(3, 0) == []


def test_trim_drops_whole_segments_only(tmp_path):
    js = JournalStore(tmp_path)
    js.append(3, 1, [rec(1), rec(2)])
    js.trim(3, 1, 1)  # segment also holds 2: kept
    assert [r.seq for r in js.read(3, 0)] == [1, 2]
    js.trim(3, 1, 2)
    assert js.read(3, 0) == []
    js.append(3, 1, [rec(3)])
    assert [r.seq for r in js.read(3, 0)] == [3]


def test_disk_bytes_counts_reserved_segment_space_until_trimmed_or_dropped(tmp_path):
    js = JournalStore(tmp_path)
    assert js.disk_bytes() == 0
    js.append(3, 1, [rec(1)])
    assert js.disk_bytes() == SEGMENT_CHUNK  # one small record reserves a whole zero-filled chunk
    js.append(4, 1, [rec(1, vol=4)])
    assert js.disk_bytes() == 2 * SEGMENT_CHUNK
    js.append(3, 1, [rec(2, data=b"y" * (SEGMENT_CHUNK // 2)), rec(3, data=b"z" * (SEGMENT_CHUNK // 2))])
    assert js.disk_bytes() == 3 * SEGMENT_CHUNK  # volume 3's segment grew by a chunk
    js.close()
    again = JournalStore(tmp_path)  # volumes not opened by this process are on disk all the same
    assert again.disk_bytes() == 3 * SEGMENT_CHUNK
    again.trim(3, 1, 3)
    assert again.disk_bytes() == SEGMENT_CHUNK  # the epoch file left behind is not counted
    again.drop(4)
    assert again.disk_bytes() == 0


def test_disk_bytes_skips_volume_directories_that_disappear(tmp_path):
    js = JournalStore(tmp_path)
    js.append(3, 1, [rec(1)])
    js.append(4, 1, [rec(1, vol=4)])
    shutil.rmtree(tmp_path / "3")  # gone behind the store's back
    assert js.disk_bytes() == SEGMENT_CHUNK
    # drops and trims racing the walk are never an error either
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        seq = 1
        try:
            while not stop.is_set():
                seq += 1
                js.append(5, 1, [rec(seq, vol=5)])
                js.trim(5, 1, seq)
                js.append(6, 1, [rec(1, vol=6)])
                js.drop(6)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=churn)
    t.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert js.disk_bytes() >= SEGMENT_CHUNK  # volume 4's segment is always there
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive() and not errors
    shutil.rmtree(tmp_path)
    assert js.disk_bytes() == 0  # the whole journal directory gone: nothing on disk


def R(seq, epoch):
    return JournalRecord(3, epoch, seq, ())


def test_replay_prefers_the_newest_epoch_and_stops_at_gaps_and_stale_leftovers():
    records = [R(5, 1), R(6, 1), R(7, 1), R(6, 2), R(9, 2)]
    assert [(r.seq, r.epoch) for r in select_replay(records, 4)] == [(5, 1), (6, 2)]
    assert select_replay([R(2, 1)], 0) == []  # gap at 1
    assert [r.seq for r in select_replay([R(1, 1), R(2, 1), R(3, 1)], 1)] == [2, 3]


# --- volume state machine -----------------------------------------------------------------

BS = 16384
SIZE = 8 * BS


class JournaledVolumeMachine(RuleBasedStateMachine):
    """Writes, trims, flushes, checkpoints and crashes of a journaled volume against two byte
    models: ``current`` (what reads must return) and ``durable`` (what a crash must leave)."""

    @initialize()
    def setup(self):
        self.dir = Path(tempfile.mkdtemp(prefix="torus-jsm-"))
        self.backend = SQLiteBackend.from_url(f"sqlite:///{self.dir}/m.db", {})
        self.md = MetadataService(self.backend, ring_types=RING_TYPES)
        self.md.format(BS, "crc,base")
        self.md.create_volume("v", SIZE)
        self.store = FileBlockStore.open(
            BlockStoreConfig(block_size=BS, capacity_bytes=4 << 20, path=str(self.dir / "blk"))
        )
        self.jstore = JournalStore(self.dir / "journal")
        self.current = bytearray(SIZE)
        self.durable = bytes(SIZE)
        self.vol = self._open()

    def _open(self):
        return BlockVolume.open(
            self.md,
            self.store,
            "v",
            lease_ttl=30,
            take_over=False,
            journal=LocalJournalReplicas(self.jstore),
            journal_options={"checkpoint_interval": 3600.0, "checkpoint_bytes": 1 << 30},
            cache_bytes=2 * BS,
            staging_bytes=2 * BS,
            layer_registry=LAYERS,
        )

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * BS), byte=st.integers(1, 255))
    def write(self, off, n, byte):
        n = min(n, SIZE - off)
        data = bytes([byte]) * n
        self.vol.write_at(off, data)
        self.current[off : off + n] = data

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * BS))
    def trim(self, off, n):
        n = min(n, SIZE - off)
        self.vol.trim(off, n)
        self.current[off : off + n] = bytes(n)

    @rule()
    def flush(self):
        self.vol.sync()
        self.durable = bytes(self.current)

    @rule()
    def checkpoint(self):
        self.vol.checkpoint()
        self.durable = bytes(self.current)

    @rule()
    def crash_and_reopen(self):
        """Abandon the volume as a SIGKILL would (no checkpoint, no unlock), take it over."""
        old = self.vol
        old.keeper.stop()
        old.journal.close()
        old.file.close()
        self.md.leases.revoke(old.lease)  # the lease expires
        self.vol = self._open()
        self.current = bytearray(self.durable)

    @rule()
    def close_and_reopen(self):
        self.vol.close()
        self.durable = bytes(self.current)
        self.vol = self._open()
        assert self.vol.journal.replayed == 0
        assert int(self.vol.file.attrs.get(JOURNAL_SEQ_ATTR, "0")) >= 0

    @precondition(lambda self: hasattr(self, "vol"))
    @invariant()
    def reads_match_the_model(self):
        assert self.vol.read_at(0, SIZE) == bytes(self.current)

    def teardown(self):
        if hasattr(self, "vol"):
            self.vol.close()
            self.jstore.close()
            self.store.close()
            self.backend.close()
            shutil.rmtree(self.dir, ignore_errors=True)


JournaledVolumeMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
test_journaled_volume_state_machine = JournaledVolumeMachine.TestCase


class Env:
    """A formatted SQLite cluster with volume ``v``, a block store and a journal store."""

    def __init__(self, tmp_path: Path, store) -> None:
        self.backend = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/m.db", {})
        self.md = MetadataService(self.backend, ring_types=RING_TYPES)
        self.md.format(BS, "crc,base")
        self.md.create_volume("v", SIZE)
        self.store = store
        self.js = JournalStore(tmp_path / "j")

    def open(self, **journal_options) -> BlockVolume:
        opts = {"checkpoint_interval": 3600.0, **journal_options}
        return BlockVolume.open(
            self.md,
            self.store,
            "v",
            journal=LocalJournalReplicas(self.js),
            journal_options=opts,
            layer_registry=LAYERS,
        )

    def crash(self, vol: BlockVolume) -> None:
        """Abandon ``vol`` as a SIGKILL would (no checkpoint, no unlock); its lease expires."""
        vol.keeper.stop()
        vol.journal.close()
        vol.file.close()
        self.md.leases.revoke(vol.lease)

    def close(self) -> None:
        self.js.close()
        self.store.close()
        self.backend.close()


@pytest.fixture
def env(tmp_path):
    e = Env(
        tmp_path,
        FileBlockStore.open(
            BlockStoreConfig(block_size=BS, capacity_bytes=4 << 20, path=str(tmp_path / "b"))
        ),
    )
    yield e
    e.close()


def test_flushes_append_no_metadata_and_a_crash_replays_every_flushed_write(env):
    vol = env.open()
    model = bytearray(SIZE)
    vol.write_at(SIZE - 1, b"\x01")  # the first write of a session reserves an INode number
    model[SIZE - 1] = 1
    vol.sync()
    position = env.md.state().position
    for k in range(50):
        off = (k * 7919) % (SIZE - 100)
        vol.write_at(off, bytes([k + 1]) * 100)
        model[off : off + 100] = bytes([k + 1]) * 100
        vol.sync()
    assert env.md.state().position == position  # no INode commit, no metadata append
    vol.write_at(0, b"never flushed")
    env.crash(vol)
    with env.open() as again:
        assert again.journal.replayed == 51
        assert again.read_at(0, SIZE) == bytes(model)


def test_blocks_named_by_records_past_a_checkpoint_survive_until_the_next_one(env):
    """A REF record numbered after a checkpoint's position may name a block that was superseded
    before that checkpoint committed: replay after a crash still needs it, so neither the
    writer's reclaim nor GC may free it before the next checkpoint."""
    vol = env.open()
    vol.write_at(0, b"a" * BS)
    vol.sync()  # REF record 1 names block X1
    vol.write_at(0, b"b" * BS)
    vol.sync()  # REF record 2 names X2; X1 superseded
    # a checkpoint whose position was taken before both records (as when they are journaled
    # while it runs) commits an INode naming X2 only
    vol.file.checkpoint(lambda: 0)
    env.crash(vol)
    with env.open() as again:
        assert again.journal.replayed == 2
        assert again.read_at(0, BS) == b"b" * BS


def test_a_failed_flush_is_never_followed_by_a_flush_that_reports_success_without_the_data(tmp_path):
    from torus_blockstore_mem.store import MemBlockStore

    from torus_core.errors import OutOfSpace

    small = Env(tmp_path, MemBlockStore.open(BlockStoreConfig(block_size=BS, capacity_bytes=3 * BS)))
    vol = small.open()
    try:
        vol.write_at(0, b"w" * SIZE)  # whole blocks: a flush writes them as new blocks
        for _ in range(3):  # the writes are still not durable: every retry fails too
            with pytest.raises(OutOfSpace):
                vol.sync()
    finally:
        small.crash(vol)
        small.close()


def test_a_cleanly_closed_journaled_volume_leaves_no_superseded_blocks(env):
    from torus_core.refs import BlockType

    for round_ in range(3):
        with env.open() as vol:
            for k in range(6):
                vol.write_at(0, bytes([round_ * 10 + k + 1]) * (2 * BS))  # whole blocks: REF records
                vol.sync()
                vol.checkpoint()
    data = {r for r in env.store.iter_refs() if r.type == BlockType.DATA}
    assert len(data) == 2  # exactly the two blocks the committed INode names
    with env.open() as reopened:
        assert reopened.read_at(0, 2 * BS) == bytes([26]) * (2 * BS)


def test_an_open_volumes_journal_never_grows_past_two_checkpoints(tmp_path):
    js = JournalStore(tmp_path)
    seq = 0
    for _ in range(6):
        for _ in range(10):
            seq += 1
            js.append(3, 1, [rec(seq)])
        js.trim(3, 1, seq - 4)  # the checkpoint covered all but records appended while it ran
    assert len(list((tmp_path / "3").glob("*.seg"))) <= 2
    kept = [r.seq for r in js.read(3, 0)]
    assert kept[0] > seq - 25, kept[:3]  # records two checkpoints old are gone from disk
    assert [r.seq for r in js.read(3, seq - 4)] == list(range(seq - 3, seq + 1))


def test_overwrites_that_are_never_flushed_are_checkpointed_and_freed_while_the_writer_goes_on(tmp_path):
    """Issue 16: without a FLUSH, superseded blocks used to wait for the 30 s checkpoint (here
    an hour) and the store filled; now the superseded space itself starts a checkpoint."""
    e = Env(
        tmp_path,
        FileBlockStore.open(
            BlockStoreConfig(block_size=BS, capacity_bytes=4 * SIZE, path=str(tmp_path / "b"))
        ),
    )
    vol = e.open(checkpoint_superseded=SIZE // 4)
    try:
        vol.file._max_dirty = 1  # whole blocks go to the store at once, as with a full cache
        for k in range(40):  # 40 passes over the volume: 10 x the store, no FLUSH at all
            for i in range(SIZE // BS):
                vol.write_at(i * BS, bytes([k + 1]) * BS)
            assert e.store.used_blocks() <= 3 * SIZE // BS
        assert vol.journal.checkpoints > 0
        assert vol.read_at(0, SIZE) == bytes([40]) * SIZE
    finally:
        vol.close()
        e.close()
