"""Conformance suite for :class:`~torus_core.blockstore.BlockStore` implementations.

Two pieces, both meant to be subclassed by a plugin's tests:

* :class:`BlockStoreContract` -- example-based tests of every rule in the ``BlockStore``
  docstring. Subclass it as ``class TestMyStore(BlockStoreContract)`` and override the
  ``store_factory`` fixture so that ``store_factory(capacity_blocks=N, block_size=B)`` opens a
  store. A persistent store (``persistent = True`` on the class) subclasses
  :class:`PersistentBlockStoreContract` instead, which adds the reopen tests: calling the
  factory again with the same arguments must *reopen* the same store (same directory).
* :class:`BlockStoreMachine` -- a hypothesis ``RuleBasedStateMachine`` that checks a store
  against a ``dict[BlockRef, bytes]`` model. Subclass it, implement :meth:`open_store` (and
  :meth:`cleanup` if the store leaves files), and expose ``TestX = MyMachine.TestCase``.

Example::

    class TestMem(BlockStoreContract):
        @pytest.fixture
        def store_factory(self):
            def make(capacity_blocks: int, block_size: int) -> BlockStore:
                return MemBlockStore.open(BlockStoreConfig(block_size, capacity_blocks * block_size))
            return make
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from hypothesis.stateful import initialize as hyp_initialize

from torus_core.blockstore import BlockStore
from torus_core.errors import BlockExists, BlockNotExist, Closed, InvalidArgument, OutOfSpace
from torus_core.refs import BlockRef, BlockType
from torus_core.testing.closing import closing_all

StoreFactory = Callable[..., BlockStore]

__all__ = ["BlockStoreContract", "BlockStoreMachine", "StoreFactory", "block_refs", "pad"]


def pad(data: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """Return ``data`` zero-padded to ``block_size`` (the content a store must return)."""
    raw = bytes(data)
    return raw + bytes(block_size - len(raw))


def block_refs(max_volume: int = 3, max_inode: int = 3, max_index: int = 6) -> st.SearchStrategy[BlockRef]:
    """A strategy of refs drawn from a small space, so collisions (rewrites) happen often."""
    return st.builds(
        BlockRef,
        st.integers(0, max_volume),
        st.integers(0, max_inode),
        st.integers(0, max_index),
        st.sampled_from(list(BlockType)),
    )


def _ref(i: int, volume: int = 1) -> BlockRef:
    return BlockRef(volume, 7, i)


def _content(i: int, block_size: int) -> bytes:
    """Distinct full-size content for block number ``i``."""
    seed = i.to_bytes(8, "little")
    return (seed * (block_size // 8 + 1))[:block_size]


class BlockStoreContract:
    """Example-based contract every block store must pass.

    Override the ``store_factory`` fixture. Class attributes ``BLOCK_SIZE`` and ``CAPACITY``
    set the default geometry the tests use.
    """

    BLOCK_SIZE: int = 256
    CAPACITY: int = 8

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        """Override: return ``make(capacity_blocks=..., block_size=...) -> BlockStore``."""
        raise NotImplementedError("subclasses of BlockStoreContract must override store_factory")

    @pytest.fixture
    def open_store(self, store_factory: StoreFactory) -> Iterator[StoreFactory]:
        """Wrap ``store_factory`` so every store opened by a test is closed at teardown."""

        def make(capacity_blocks: int | None = None, block_size: int | None = None) -> BlockStore:
            return store_factory(
                capacity_blocks=self.CAPACITY if capacity_blocks is None else capacity_blocks,
                block_size=self.BLOCK_SIZE if block_size is None else block_size,
            )

        with closing_all(make) as open_:
            yield open_

    @pytest.fixture
    def store(self, open_store: StoreFactory) -> BlockStore:
        """A fresh, empty store with the default geometry."""
        return open_store()

    # --- write / get / has ----------------------------------------------------------------

    def test_new_store_is_empty_with_configured_geometry(self, store: BlockStore) -> None:
        assert store.block_size == self.BLOCK_SIZE
        assert store.num_blocks() == self.CAPACITY
        assert store.used_blocks() == 0
        assert list(store.iter_refs()) == []

    def test_written_block_reads_back_identical(self, store: BlockStore) -> None:
        data = _content(1, self.BLOCK_SIZE)
        store.write_block(_ref(1), data)
        got = store.get_block(_ref(1))
        assert isinstance(got, bytes)
        assert got == data
        assert store.has_block(_ref(1))

    def test_short_data_is_zero_padded_to_block_size(self, store: BlockStore) -> None:
        store.write_block(_ref(1), b"abc")
        got = store.get_block(_ref(1))
        assert len(got) == self.BLOCK_SIZE
        assert got == b"abc" + bytes(self.BLOCK_SIZE - 3)

    def test_empty_data_stores_a_zero_block(self, store: BlockStore) -> None:
        store.write_block(_ref(1), b"")
        assert store.get_block(_ref(1)) == bytes(self.BLOCK_SIZE)

    def test_accepts_bytearray_and_memoryview(self, store: BlockStore) -> None:
        store.write_block(_ref(1), bytearray(b"ba"))
        store.write_block(_ref(2), memoryview(b"xmemoryviewx")[1:-1])
        assert store.get_block(_ref(1)) == pad(b"ba", self.BLOCK_SIZE)
        assert store.get_block(_ref(2)) == pad(b"memoryview", self.BLOCK_SIZE)

    def test_later_mutation_of_the_input_buffer_does_not_change_the_block(self, store: BlockStore) -> None:
        buf = bytearray(_content(3, self.BLOCK_SIZE))
        store.write_block(_ref(1), buf)
        expected = bytes(buf)
        buf[:] = bytes(len(buf))
        assert store.get_block(_ref(1)) == expected

    def test_oversize_data_raises_invalid_argument_and_stores_nothing(self, store: BlockStore) -> None:
        with pytest.raises(InvalidArgument):
            store.write_block(_ref(1), bytes(self.BLOCK_SIZE + 1))
        assert not store.has_block(_ref(1))
        assert store.used_blocks() == 0

    def test_refs_differing_only_in_block_type_are_distinct(self, store: BlockStore) -> None:
        data_ref = BlockRef(1, 2, 3, BlockType.DATA)
        inode_ref = BlockRef(1, 2, 3, BlockType.INODE)
        store.write_block(data_ref, b"data")
        store.write_block(inode_ref, b"inode")
        assert store.get_block(data_ref) == pad(b"data", self.BLOCK_SIZE)
        assert store.get_block(inode_ref) == pad(b"inode", self.BLOCK_SIZE)
        assert store.used_blocks() == 2

    def test_has_block_is_false_for_a_missing_ref(self, store: BlockStore) -> None:
        assert not store.has_block(_ref(42))

    # --- immutability ---------------------------------------------------------------------

    def test_rewriting_identical_content_is_a_noop(self, store: BlockStore) -> None:
        data = _content(1, self.BLOCK_SIZE)
        store.write_block(_ref(1), data)
        store.write_block(_ref(1), data)
        assert store.used_blocks() == 1
        assert store.get_block(_ref(1)) == data

    def test_rewriting_with_content_equal_after_padding_is_a_noop(self, store: BlockStore) -> None:
        store.write_block(_ref(1), b"xy")
        store.write_block(_ref(1), pad(b"xy", self.BLOCK_SIZE))
        assert store.used_blocks() == 1

    def test_rewriting_different_content_raises_block_exists_and_keeps_original(
        self, store: BlockStore
    ) -> None:
        store.write_block(_ref(1), b"first")
        with pytest.raises(BlockExists):
            store.write_block(_ref(1), b"second")
        assert store.get_block(_ref(1)) == pad(b"first", self.BLOCK_SIZE)
        assert store.used_blocks() == 1

    def test_repeated_identical_rewrites_do_not_leak_space(self, open_store: StoreFactory) -> None:
        store = open_store(capacity_blocks=2)
        store.write_block(_ref(1), b"a")
        for _ in range(5):
            store.write_block(_ref(1), b"a")
        store.write_block(_ref(2), b"b")
        assert store.used_blocks() == 2

    # --- missing refs, delete -------------------------------------------------------------

    def test_get_missing_raises_block_not_exist(self, store: BlockStore) -> None:
        with pytest.raises(BlockNotExist):
            store.get_block(_ref(9))

    def test_delete_missing_raises_block_not_exist(self, store: BlockStore) -> None:
        with pytest.raises(BlockNotExist):
            store.delete_block(_ref(9))

    def test_delete_removes_the_block(self, store: BlockStore) -> None:
        store.write_block(_ref(1), b"a")
        store.write_block(_ref(2), b"b")
        store.delete_block(_ref(1))
        assert not store.has_block(_ref(1))
        with pytest.raises(BlockNotExist):
            store.get_block(_ref(1))
        assert store.get_block(_ref(2)) == pad(b"b", self.BLOCK_SIZE)
        assert store.used_blocks() == 1

    def test_deleted_ref_can_be_written_with_new_content(self, store: BlockStore) -> None:
        store.write_block(_ref(1), b"old")
        store.delete_block(_ref(1))
        store.write_block(_ref(1), b"new")
        assert store.get_block(_ref(1)) == pad(b"new", self.BLOCK_SIZE)

    def test_reused_space_never_returns_the_previous_block(self, open_store: StoreFactory) -> None:
        store = open_store(capacity_blocks=1)
        store.write_block(_ref(1), _content(1, self.BLOCK_SIZE))
        store.delete_block(_ref(1))
        store.write_block(_ref(2), b"short")
        assert store.get_block(_ref(2)) == pad(b"short", self.BLOCK_SIZE)
        with pytest.raises(BlockNotExist):
            store.get_block(_ref(1))

    # --- capacity -------------------------------------------------------------------------

    def test_full_store_raises_out_of_space(self, open_store: StoreFactory) -> None:
        store = open_store(capacity_blocks=3)
        for i in range(3):
            store.write_block(_ref(i), _content(i, self.BLOCK_SIZE))
        with pytest.raises(OutOfSpace):
            store.write_block(_ref(99), b"x")
        assert not store.has_block(_ref(99))
        assert store.used_blocks() == 3
        for i in range(3):
            assert store.get_block(_ref(i)) == _content(i, self.BLOCK_SIZE)

    def test_full_store_still_accepts_identical_rewrite_and_rejects_different(
        self, open_store: StoreFactory
    ) -> None:
        store = open_store(capacity_blocks=1)
        store.write_block(_ref(1), b"a")
        store.write_block(_ref(1), b"a")
        with pytest.raises(BlockExists):
            store.write_block(_ref(1), b"b")

    def test_space_is_reusable_after_delete(self, open_store: StoreFactory) -> None:
        store = open_store(capacity_blocks=2)
        store.write_block(_ref(1), b"a")
        store.write_block(_ref(2), b"b")
        store.delete_block(_ref(1))
        store.write_block(_ref(3), b"c")
        assert store.used_blocks() == 2
        with pytest.raises(OutOfSpace):
            store.write_block(_ref(4), b"d")

    def test_zero_capacity_store_rejects_every_write(self, open_store: StoreFactory) -> None:
        store = open_store(capacity_blocks=0)
        assert store.num_blocks() == 0
        with pytest.raises(OutOfSpace):
            store.write_block(_ref(1), b"a")

    def test_used_blocks_counts_writes_and_deletes(self, store: BlockStore) -> None:
        for i in range(5):
            store.write_block(_ref(i), b"x")
            assert store.used_blocks() == i + 1
        for i in range(5):
            store.delete_block(_ref(i))
            assert store.used_blocks() == 4 - i
        assert store.num_blocks() == self.CAPACITY

    # --- iteration ------------------------------------------------------------------------

    def test_iter_refs_yields_exactly_the_stored_refs(self, store: BlockStore) -> None:
        for i in range(4):
            store.write_block(_ref(i), b"x")
        store.delete_block(_ref(2))
        assert sorted(store.iter_refs()) == [_ref(0), _ref(1), _ref(3)]

    def test_iter_refs_is_a_snapshot_safe_against_concurrent_writes(self, store: BlockStore) -> None:
        for i in range(4):
            store.write_block(_ref(i), b"x")
        seen = []
        it = store.iter_refs()
        seen.append(next(it))
        store.write_block(_ref(5), b"y")
        store.write_block(_ref(6), b"y")
        store.delete_block(_ref(3))
        seen.extend(it)
        assert sorted(seen) == [_ref(i) for i in range(4)]

    # --- concurrency ----------------------------------------------------------------------

    def test_concurrent_writers_from_threads_all_land(self, open_store: StoreFactory) -> None:
        threads_n, per_thread = 4, 6
        store = open_store(capacity_blocks=threads_n * per_thread)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for j in range(per_thread):
                    ref = BlockRef(t + 1, 0, j)
                    store.write_block(ref, _content(t * 100 + j, self.BLOCK_SIZE))
                    assert store.get_block(ref) == _content(t * 100 + j, self.BLOCK_SIZE)
            except BaseException as exc:  # collected and re-raised by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
        assert not any(th.is_alive() for th in threads)
        assert errors == []
        assert store.used_blocks() == threads_n * per_thread
        with pytest.raises(OutOfSpace):
            store.write_block(_ref(1000), b"z")

    # --- lifecycle ------------------------------------------------------------------------

    def test_every_method_raises_closed_after_close(self, store: BlockStore) -> None:
        store.write_block(_ref(1), b"a")
        store.close()
        calls: list[Callable[[], Any]] = [
            lambda: store.has_block(_ref(1)),
            lambda: store.get_block(_ref(1)),
            lambda: store.write_block(_ref(2), b"b"),
            lambda: store.delete_block(_ref(1)),
            store.num_blocks,
            store.used_blocks,
            lambda: list(store.iter_refs()),
            store.flush,
        ]
        for call in calls:
            with pytest.raises(Closed):
                call()

    def test_close_is_idempotent(self, store: BlockStore) -> None:
        store.close()
        store.close()

    def test_context_manager_closes_the_store(self, store: BlockStore) -> None:
        with store as s:
            s.write_block(_ref(1), b"a")
        with pytest.raises(Closed):
            store.get_block(_ref(1))

    def test_flush_on_an_open_store_succeeds(self, store: BlockStore) -> None:
        store.write_block(_ref(1), b"a")
        store.flush()
        assert store.get_block(_ref(1)) == pad(b"a", self.BLOCK_SIZE)


class PersistentBlockStoreContract(BlockStoreContract):
    """:class:`BlockStoreContract` plus the reopen rules of stores with ``persistent = True``.

    ``store_factory`` called again with the same arguments must reopen the same store.
    """

    def test_store_declares_itself_persistent(self, store: BlockStore) -> None:
        assert type(store).persistent is True

    def test_reopen_keeps_flushed_blocks(self, open_store: StoreFactory) -> None:
        store = open_store()
        for i in range(3):
            store.write_block(_ref(i), _content(i, self.BLOCK_SIZE))
        store.flush()
        store.close()
        again = open_store()
        assert sorted(again.iter_refs()) == [_ref(i) for i in range(3)]
        assert again.used_blocks() == 3
        for i in range(3):
            assert again.get_block(_ref(i)) == _content(i, self.BLOCK_SIZE)

    def test_reopen_keeps_deletes_and_frees_their_space(self, open_store: StoreFactory) -> None:
        store = open_store(capacity_blocks=2)
        store.write_block(_ref(1), b"a")
        store.write_block(_ref(2), b"b")
        store.delete_block(_ref(1))
        store.close()
        again = open_store(capacity_blocks=2)
        assert not again.has_block(_ref(1))
        assert again.get_block(_ref(2)) == pad(b"b", self.BLOCK_SIZE)
        again.write_block(_ref(3), b"c")
        with pytest.raises(OutOfSpace):
            again.write_block(_ref(4), b"d")

    def test_reopened_store_still_enforces_immutability(self, open_store: StoreFactory) -> None:
        store = open_store()
        store.write_block(_ref(1), b"a")
        store.close()
        again = open_store()
        again.write_block(_ref(1), b"a")
        with pytest.raises(BlockExists):
            again.write_block(_ref(1), b"b")
        assert again.used_blocks() == 1


class BlockStoreMachine(RuleBasedStateMachine):
    """Stateful check of a block store against a ``dict[BlockRef, bytes]`` model.

    Subclass and implement :meth:`open_store`; it is called once at the start and again on
    every ``reopen`` step (only for persistent stores), and must return the *same* store each
    time. Override :meth:`cleanup` to remove files. Override ``block_size`` / ``capacity_blocks``
    to change the geometry.
    """

    block_size: int = 32
    capacity_blocks: int = 6

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[BlockRef, bytes] = {}
        self._store: BlockStore | None = None

    # --- subclass API ---------------------------------------------------------------------

    def open_store(self) -> BlockStore:
        """Open (or reopen) the store under test; override in subclasses."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Release resources after the run (e.g. remove a temp directory); override if needed."""

    # --- machinery ------------------------------------------------------------------------

    @property
    def store(self) -> BlockStore:
        """The currently open store."""
        assert self._store is not None, "store not opened"
        return self._store

    @hyp_initialize()
    def start(self) -> None:
        """Open the store and check it starts empty."""
        self._store = self.open_store()
        assert self.store.used_blocks() == 0
        assert self.store.num_blocks() == self.capacity_blocks

    def teardown(self) -> None:
        """Close the store and call :meth:`cleanup`."""
        try:
            if self._store is not None:
                self._store.close()
        finally:
            self.cleanup()

    def _payload(self) -> st.SearchStrategy[bytes]:
        return st.binary(max_size=self.block_size)

    @rule(ref=block_refs(), data=st.data())
    def write(self, ref: BlockRef, data: st.DataObject) -> None:
        """Write a block; outcome must match the model (no-op, BlockExists, OutOfSpace)."""
        bs = self.block_size
        choices = [b"", b"\x01", bytes(bs), b"\xff" * bs]
        if ref in self.model:
            choices.append(self.model[ref].rstrip(b"\x00"))
        payload = data.draw(st.one_of(st.sampled_from(choices), st.binary(max_size=bs)))
        padded = pad(payload, bs)
        if ref in self.model:
            if self.model[ref] == padded:
                self.store.write_block(ref, payload)
            else:
                with pytest.raises(BlockExists):
                    self.store.write_block(ref, payload)
        elif len(self.model) >= self.capacity_blocks:
            with pytest.raises(OutOfSpace):
                self.store.write_block(ref, payload)
        else:
            self.store.write_block(ref, payload)
            self.model[ref] = padded

    @rule(ref=block_refs(), extra=st.integers(1, 16))
    def write_oversize(self, ref: BlockRef, extra: int) -> None:
        """Oversize writes are rejected with InvalidArgument and change nothing."""
        with pytest.raises(InvalidArgument):
            self.store.write_block(ref, b"\x07" * (self.block_size + extra))

    @rule(ref=block_refs())
    def read(self, ref: BlockRef) -> None:
        """Reads return the model's bytes or BlockNotExist."""
        if ref in self.model:
            assert self.store.get_block(ref) == self.model[ref]
        else:
            with pytest.raises(BlockNotExist):
                self.store.get_block(ref)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def read_existing(self, data: st.DataObject) -> None:
        """Read a ref known to be stored."""
        ref = data.draw(st.sampled_from(sorted(self.model)))
        assert self.store.get_block(ref) == self.model[ref]

    @rule(ref=block_refs())
    def has(self, ref: BlockRef) -> None:
        """has_block agrees with the model."""
        assert self.store.has_block(ref) == (ref in self.model)

    @rule(ref=block_refs())
    def delete(self, ref: BlockRef) -> None:
        """Delete a ref (maybe missing)."""
        if ref in self.model:
            self.store.delete_block(ref)
            del self.model[ref]
        else:
            with pytest.raises(BlockNotExist):
                self.store.delete_block(ref)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete_existing(self, data: st.DataObject) -> None:
        """Delete a ref known to be stored."""
        ref = data.draw(st.sampled_from(sorted(self.model)))
        self.store.delete_block(ref)
        del self.model[ref]

    @rule()
    def iterate(self) -> None:
        """iter_refs yields each stored ref exactly once."""
        refs = list(self.store.iter_refs())
        assert len(refs) == len(set(refs))
        assert set(refs) == set(self.model)

    @rule()
    def flush(self) -> None:
        """Flush never changes visible state."""
        self.store.flush()

    @rule(flush_first=st.booleans())
    def reopen(self, flush_first: bool) -> None:
        """Close and reopen a persistent store: all blocks survive (close flushes)."""
        if not type(self.store).persistent:
            return
        if flush_first:
            self.store.flush()
        self.store.close()
        self._store = None
        self._store = self.open_store()

    @invariant()
    def counts_match_model(self) -> None:
        """used_blocks tracks the model; num_blocks is the capacity."""
        if self._store is None:
            return
        assert self.store.used_blocks() == len(self.model)
        assert self.store.num_blocks() == self.capacity_blocks
