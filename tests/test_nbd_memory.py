# mypy: allow-untyped-defs
"""MemoryStore/MemoryExport against a plain bytearray model (hypothesis state machine)."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from torus_core.errors import AlreadyExists, InvalidArgument, Locked, NotExist
from torus_core.nbd.constants import STATE_HOLE, STATE_ZERO
from torus_core.nbd.memory import GRAIN, MemoryExportProvider, MemoryStore

SIZE = 64 * 1024 + 1000  # deliberately not a multiple of the grain or page size


class MemoryStoreMachine(RuleBasedStateMachine):
    """Random writes, trims and zeroes: contents always match the model, holes read as zero,
    and extents tile the queried range exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore(SIZE)
        self.model = bytearray(SIZE)

    ranges = st.integers(0, SIZE - 1).flatmap(lambda off: st.tuples(st.just(off), st.integers(1, SIZE - off)))

    @rule(r=ranges, byte=st.integers(1, 255))
    def write(self, r, byte):
        off, n = r
        n = min(n, 20000)
        self.store.write(off, bytes([byte]) * n)
        self.model[off : off + n] = bytes([byte]) * n

    @rule(r=ranges, punch=st.booleans())
    def zero(self, r, punch):
        off, n = r
        self.store.zero(off, n, punch)
        self.model[off : off + n] = bytes(n)

    @rule(r=ranges)
    def read_matches(self, r):
        off, n = r
        assert self.store.read(off, n) == bytes(self.model[off : off + n])

    @rule(r=ranges)
    def extents_tile_the_range_and_holes_are_zero(self, r):
        off, n = r
        ext = self.store.extents(off, n)
        assert sum(length for length, _ in ext) == n
        pos = off
        for length, flags in ext:
            assert length > 0 and flags in (0, STATE_HOLE | STATE_ZERO)
            if flags:
                assert self.model[pos : pos + length] == bytes(length)
            pos += length

    @invariant()
    def allocation_never_exceeds_size_rounded_to_grains(self):
        assert self.store.allocated_bytes() <= -(-SIZE // GRAIN) * GRAIN


TestMemoryStore = MemoryStoreMachine.TestCase


def test_a_fresh_store_is_one_hole():
    s = MemoryStore(SIZE)
    assert s.extents(0, SIZE) == [(SIZE, STATE_HOLE | STATE_ZERO)]
    assert s.read(SIZE - 10, 10) == bytes(10)


def test_negative_size_is_invalid():
    with pytest.raises(InvalidArgument):
        MemoryStore(-1)


def test_provider_errors_are_typed():
    p = MemoryExportProvider(exclusive=True)
    p.add("a", 4096)
    with pytest.raises(AlreadyExists):
        p.add("a", 4096)
    with pytest.raises(NotExist):
        p.open_export("b")
    with pytest.raises(NotExist):
        p.describe("b")
    e = p.open_export("a")
    with pytest.raises(Locked):
        p.open_export("a")
    e.close()
    e.close()  # idempotent
    assert p.open_count("a") == 0
    p.open_export("a").close()
