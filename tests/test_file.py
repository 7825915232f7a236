"""File semantics (after the original's file_blackbox tests) and a model-based state machine."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torus_blockstore_mem.store import MemBlockStore

from torus_core.blockset import default_layer_registry
from torus_core.errors import BlockExists, InvalidArgument, Locked, MetadataUnavailable
from torus_core.file import File
from torus_core.refs import INodeRef
from torus_core.testing.files import FileVolume

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

BS = 256
VOL = 5


class Volume(FileVolume):
    """A stand-in for the metadata service: an inode counter and the committed INode pointer."""

    def __init__(self, size: int = 4096, cache_bytes: int = 4 * BS, spec: str = "crc,base") -> None:
        super().__init__(MemBlockStore(BS, 100_000), VOL, size, block_spec=spec, cache_bytes=cache_bytes)


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 256 for i in range(n))


@pytest.fixture
def vol() -> Volume:
    return Volume()


def test_fresh_volume_reads_as_zeros_without_storing_anything(vol: Volume) -> None:
    f = vol.open()
    assert f.size == 4096
    assert f.read_at(0, 4096) == bytes(4096)
    assert f.extents(0, 4096) == [(4096, True)]
    assert f.sync() is None
    assert vol.store.used_blocks() == 0


def test_read_before_and_after_sync_and_after_reopen(vol: Volume) -> None:
    f = vol.open()
    data = pattern(549, 3)  # odd-shaped, across block edges
    assert f.write_at(100, data) == 549
    assert f.read_at(100, 549) == data
    ref = f.sync()
    assert ref == INodeRef(VOL, 2) == vol.current
    assert f.read_at(100, 549) == data
    g = vol.open()
    assert g.read_at(0, 4096) == bytes(100) + data + bytes(4096 - 649)


def test_overwrite_in_the_middle_across_block_edges(vol: Volume) -> None:
    f = vol.open()
    f.write_at(0, pattern(1024, 1))
    f.sync()
    f.write_at(200, b"\xff" * 300)
    expected = bytearray(pattern(1024, 1))
    expected[200:500] = b"\xff" * 300
    assert f.read_at(0, 1024) == expected
    assert f.sync() == INodeRef(VOL, 3)
    assert vol.open().read_at(0, 1024) == expected


def test_each_sync_takes_a_new_inode_number_only_when_something_changed(vol: Volume) -> None:
    f = vol.open()
    f.write_at(0, b"a")
    assert f.sync() == INodeRef(VOL, 2)
    assert f.sync() is None
    f.write_at(0, b"b")
    assert f.sync() == INodeRef(VOL, 3)
    old = vol.open(read_only=True, ref=INodeRef(VOL, 2))  # a snapshot still reads the old data
    assert old.read_at(0, 1) == b"a"


def test_read_is_short_at_end_of_file_and_empty_beyond(vol: Volume) -> None:
    f = vol.open()
    assert len(f.read_at(4000, 500)) == 96
    assert f.read_at(4096, 10) == b""
    assert f.read_at(10_000, 10) == b""


def test_write_past_end_grows_the_file(vol: Volume) -> None:
    f = vol.open()
    f.write_at(4096 + 10, b"xyz")
    assert f.size == 4109
    assert f.read_at(4090, 100) == bytes(16) + b"xyz"
    f.sync()
    assert vol.open().size == 4109


def test_truncate_shrinks_zeroes_the_tail_and_grows_with_holes(vol: Volume) -> None:
    f = vol.open()
    f.write_at(0, pattern(1000, 9))
    f.truncate(300)
    assert f.size == 300
    assert f.read_at(0, 1000) == pattern(300, 9)
    f.truncate(1000)
    assert f.read_at(0, 1000) == pattern(300, 9) + bytes(700)
    f.sync()
    assert vol.open().read_at(0, 1000) == pattern(300, 9) + bytes(700)


def test_trim_makes_whole_blocks_holes_and_zeroes_partial_edges(vol: Volume) -> None:
    f = vol.open()
    f.write_at(0, pattern(2048, 4))
    f.sync()
    f.trim(100, 700)  # blocks 1..2 whole (256..768), edges 100..256 and 768..800
    expected = bytearray(pattern(2048, 4))
    expected[100:800] = bytes(700)
    assert f.read_at(0, 2048) == expected
    assert f.extents(0, 1024) == [(256, False), (512, True), (256, False)]
    f.sync()
    g = vol.open()
    assert g.read_at(0, 2048) == expected
    assert g.extents(0, 1024) == [(256, False), (512, True), (256, False)]


def test_write_zeroes_punches_holes_or_writes_zeros(vol: Volume) -> None:
    f = vol.open()
    f.write_at(0, pattern(1024, 2))
    f.write_zeroes(256, 512)
    assert f.read_at(256, 512) == bytes(512)
    assert f.extents(0, 1024) == [(256, False), (512, True), (256, False)]
    f.write_zeroes(0, 256, punch_hole=False)
    assert f.read_at(0, 256) == bytes(256)
    assert f.extents(0, 256) == [(256, False)]
    f.write_zeroes(4000, 200)  # past the end: grows
    assert f.size == 4200 and f.read_at(4000, 200) == bytes(200)


def test_write_back_cache_is_bounded_and_reads_see_dirty_data() -> None:
    vol = Volume(size=64 * BS, cache_bytes=4 * BS)
    f = vol.open()
    for i in range(20):  # small random-ish writes to 20 different blocks
        f.write_at(i * BS + 17, bytes([i + 1]) * 10)
        assert f.dirty_blocks() <= 4
    for i in range(20):
        assert f.read_at(i * BS + 15, 14) == bytes(2) + bytes([i + 1]) * 10 + bytes(2)
    f.sync()
    assert f.dirty_blocks() == 0
    assert vol.open().read_at(19 * BS + 17, 10) == bytes([20]) * 10


def test_partial_writes_filling_a_block_never_read_the_old_block() -> None:
    vol = Volume(size=8 * BS, cache_bytes=8 * BS)
    f = vol.open()
    f.write_at(0, pattern(BS, 1))
    f.sync()
    # corrupt the stored block: a read-modify-write would fail its CRC check
    [ref] = f.blockset.get_all_block_refs()
    vol.store.delete_block(ref)
    for off in range(0, BS, 64):
        f.write_at(off, b"\x01" * 64)
    assert f.read_at(0, BS) == b"\x01" * BS
    f.sync()
    assert vol.open().read_at(0, BS) == b"\x01" * BS


def test_failed_commit_propagates_and_a_retry_commits(vol: Volume) -> None:
    f = vol.open()
    f.write_at(0, b"first")
    vol.fail_next_commit = True
    with pytest.raises(MetadataUnavailable):
        f.sync()
    assert vol.current == INodeRef(VOL, 1)
    assert f.is_write_open()
    f.write_at(5, b"-more")  # the INode content now differs from the failed attempt
    ref = f.sync()
    assert ref is not None and ref == vol.current and ref.inode != 2
    assert vol.open().read_at(0, 10) == b"first-more"


def test_retry_with_unchanged_content_reuses_the_written_inode(vol: Volume) -> None:
    f = vol.open()
    f.write_at(0, b"abc")
    vol.fail_next_commit = True
    with pytest.raises(MetadataUnavailable):
        f.sync()
    assert f.sync() == INodeRef(VOL, 2)


def test_read_only_files_refuse_every_mutation(vol: Volume) -> None:
    f = vol.open(read_only=True)
    for call in (
        lambda: f.write_at(0, b"x"),
        lambda: f.truncate(10),
        lambda: f.trim(0, 10),
        lambda: f.write_zeroes(0, 10),
    ):
        with pytest.raises(Locked):
            call()
    assert f.read_at(0, 4) == bytes(4)


def test_bad_arguments_raise_invalid_argument(vol: Volume) -> None:
    f = vol.open()
    bad: list[Callable[[], object]] = [
        lambda: f.read_at(-1, 4),
        lambda: f.read_at(0, -4),
        lambda: f.write_at(-5, b"x"),
        lambda: f.truncate(-1),
        lambda: f.trim(0, -1),
        lambda: File.open(vol.store, INodeRef(VOL, 1), layer_registry=LAYERS),
    ]
    for call in bad:
        with pytest.raises(InvalidArgument):
            call()


def test_corrupt_inode_number_reuse_is_refused_by_the_block_store(vol: Volume) -> None:
    f = vol.open()
    f.write_at(0, b"x")
    f.sync()
    vol.counter = 1  # a broken allocator handing out a used number again
    f.write_at(0, b"y")
    with pytest.raises(BlockExists):
        f.sync()


def test_concurrent_writers_on_disjoint_ranges_all_land() -> None:
    vol = Volume(size=32 * BS, cache_bytes=3 * BS)
    f = vol.open()

    def writer(k: int) -> None:
        for j in range(8):
            f.write_at((k * 8 + j) * BS // 2, bytes([k + 1]) * (BS // 2))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    f.sync()
    data = vol.open().read_at(0, 16 * BS)
    for k in range(4):
        assert data[k * 4 * BS : (k + 1) * 4 * BS] == bytes([k + 1]) * (4 * BS)


# --- model-based: File vs bytearray -------------------------------------------------------------

SIZE = 8 * BS


class FileMachine(RuleBasedStateMachine):
    """Random writes/reads/trims/zeroes/truncates/syncs/reopens compared with a bytearray."""

    spec = "rep=2,crc,base"
    cache_blocks = 2

    def __init__(self) -> None:
        super().__init__()
        self.vol = Volume(size=SIZE, cache_bytes=self.cache_blocks * BS, spec=self.spec)
        self.file = self.vol.open()
        self.model = bytearray(SIZE)
        self.committed = bytes(self.model)

    offsets = st.integers(0, SIZE + BS)
    lengths = st.integers(0, 3 * BS)

    @rule(offset=offsets, length=lengths, seed=st.integers(0, 255))
    def write(self, offset: int, length: int, seed: int) -> None:
        data = pattern(length, seed)
        self.file.write_at(offset, data)
        if length and offset + length > len(self.model):
            self.model.extend(bytes(offset + length - len(self.model)))
        self.model[offset : offset + length] = data

    @rule(offset=offsets, length=lengths)
    def read(self, offset: int, length: int) -> None:
        assert self.file.read_at(offset, length) == bytes(self.model[offset : offset + length])

    @rule(offset=offsets, length=lengths)
    def trim(self, offset: int, length: int) -> None:
        self.file.trim(offset, length)
        end = min(offset + length, len(self.model))
        if offset < end:
            self.model[offset:end] = bytes(end - offset)

    @rule(offset=offsets, length=lengths)
    def zeroes(self, offset: int, length: int) -> None:
        self.file.write_zeroes(offset, length)
        if length and offset + length > len(self.model):
            self.model.extend(bytes(offset + length - len(self.model)))
        self.model[offset : offset + length] = bytes(length)

    @rule(size=st.integers(0, SIZE + 2 * BS))
    def truncate(self, size: int) -> None:
        self.file.truncate(size)
        self.model = (self.model + bytes(max(0, size - len(self.model))))[:size]

    @rule()
    def sync(self) -> None:
        self.file.sync()
        self.committed = bytes(self.model)

    @rule()
    def reopen_from_committed_inode(self) -> None:
        self.file = self.vol.open()
        self.model = bytearray(self.committed)

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def extents_cover_the_file_and_holes_read_as_zeros(self) -> None:
        runs = self.file.extents(0, len(self.model))
        assert sum(n for n, _ in runs) == len(self.model)
        pos = 0
        for n, hole in runs:
            if hole:
                assert self.model[pos : pos + n] == bytes(n)
            pos += n

    @invariant()
    def size_matches(self) -> None:
        assert self.file.size == len(self.model)


TestFileMachine = FileMachine.TestCase
TestFileMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


class LargeCacheFileMachine(FileMachine):
    """The same model check with every dirty block staying in the write-back cache."""

    spec = "crc,base"
    cache_blocks = 64


TestLargeCacheFileMachine = LargeCacheFileMachine.TestCase
TestLargeCacheFileMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_file_open_takes_every_constructor_option() -> None:
    """``File.open`` forwards ``FileOptions`` to the constructor: the two lists stay one."""
    import inspect

    from torus_core.file import FileOptions

    kw_only = {
        name
        for name, p in inspect.signature(File.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert kw_only - {"inode_store"} == set(FileOptions.__annotations__)
