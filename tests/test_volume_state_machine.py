# mypy: allow-untyped-defs
"""A hypothesis state machine drives a BlockVolume (write, read, trim, zero, sync, snapshot,
restore, reopen) against a bytearray model, for every metadata x block store combination that
runs without a server, built from the real plugin registries."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from torus_core.block import BlockVolume, open_snapshot, restore_snapshot
from torus_core.blockset import default_layer_registry
from torus_core.blockstore import BlockStoreConfig
from torus_core.errors import Locked
from torus_core.metadata import MetadataService
from torus_core.plugins import load_registries
from torus_core.ring.builtin import builtin_ring_types

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

BS = 4096
N_BLOCKS = 12
SIZE = N_BLOCKS * BS
#: metadata backends that need no server process
SERVERLESS_METADATA = {"sqlite"}

REGISTRIES = load_registries()
COMBOS = [
    (meta, block)
    for meta in REGISTRIES.metadata.names()
    if meta in SERVERLESS_METADATA
    for block in REGISTRIES.block_stores.names()
]


def test_the_combination_list_covers_every_serverless_pair():
    assert ("sqlite", "mem") in COMBOS and ("sqlite", "file") in COMBOS


offsets = st.integers(0, SIZE - 1)
lengths = st.integers(0, 3 * BS)
snap_names = st.sampled_from(["a", "b", "c"])


def make_machine(meta: str, block: str) -> type[RuleBasedStateMachine]:
    """A state machine class bound to one metadata backend and one block store."""

    class VolumeMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(prefix="torus-vsm-"))
            backend_cls = REGISTRIES.metadata.get(meta)
            self.backend = backend_cls.from_url(f"sqlite:///{self.dir}/meta.db")
            self.md = MetadataService(self.backend, ring_types=RING_TYPES)
            self.md.format(BS, "crc,base")
            self.md.create_volume("v", SIZE)
            self.store = REGISTRIES.block_stores.get(block).open(
                BlockStoreConfig(BS, 32 << 20, str(self.dir / "block"))
            )
            self.vol: BlockVolume | None = None
            self.model = bytearray(SIZE)
            self.committed = bytes(SIZE)
            self.snaps: dict[str, bytes] = {}

        @initialize(cache_blocks=st.integers(1, 4))
        def open_volume(self, cache_blocks: int) -> None:
            self.cache = cache_blocks * BS
            self.vol = BlockVolume.open(
                self.md, self.store, "v", cache_bytes=self.cache, layer_registry=LAYERS
            )

        def _vol(self) -> BlockVolume:
            assert self.vol is not None
            return self.vol

        @rule(offset=offsets, data=st.binary(min_size=1, max_size=2 * BS + 7))
        def write(self, offset: int, data: bytes) -> None:
            data = data[: SIZE - offset]
            self._vol().write_at(offset, data)
            self.model[offset : offset + len(data)] = data

        @rule(offset=offsets, fill=st.integers(1, 255), count=st.integers(1, 2))
        def write_whole_blocks(self, offset: int, fill: int, count: int) -> None:
            start = offset // BS * BS
            data = bytes([fill]) * min(count * BS, SIZE - start)
            self._vol().write_at(start, data)
            self.model[start : start + len(data)] = data

        @rule(offset=offsets, length=lengths)
        def read(self, offset: int, length: int) -> None:
            got = self._vol().read_at(offset, length)
            assert got == bytes(self.model[offset : offset + length])

        @rule(offset=offsets, length=lengths)
        def trim(self, offset: int, length: int) -> None:
            self._vol().trim(offset, length)
            end = min(offset + length, SIZE)
            self.model[offset:end] = bytes(end - offset)

        @rule(offset=offsets, length=lengths, punch=st.booleans())
        def write_zeroes(self, offset: int, length: int, punch: bool) -> None:
            length = min(length, SIZE - offset)
            self._vol().write_zeroes(offset, length, punch_hole=punch)
            self.model[offset : offset + length] = bytes(length)

        @rule()
        def sync(self) -> None:
            self._vol().sync()
            self.committed = bytes(self.model)

        @rule(name=snap_names)
        def snapshot(self, name: str) -> None:
            if name in self.snaps:
                self.md.delete_snapshot("v", name)
            self.md.save_snapshot("v", name)  # the last *committed* state
            self.snaps[name] = self.committed

        @precondition(lambda self: bool(self.snaps))
        @rule(data=st.data())
        def snapshot_reads_as_saved(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.snaps)))
            with open_snapshot(self.md, self.store, "v", name, layer_registry=LAYERS) as snap:
                assert snap.read_at(0, SIZE) == self.snaps[name]

        @precondition(lambda self: bool(self.snaps))
        @rule(data=st.data())
        def restore(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.snaps)))
            try:
                restore_snapshot(self.md, f"v@{name}")
                raise AssertionError("restore must be refused while the volume is open")
            except Locked:
                pass
            self._vol().close()
            restore_snapshot(self.md, f"v@{name}")
            self.model = bytearray(self.snaps[name])
            self.committed = self.snaps[name]
            self.vol = BlockVolume.open(
                self.md, self.store, "v", cache_bytes=self.cache, layer_registry=LAYERS
            )

        @rule()
        def reopen(self) -> None:
            self._vol().close()
            self.committed = bytes(self.model)
            self.vol = BlockVolume.open(
                self.md, self.store, "v", cache_bytes=self.cache, layer_registry=LAYERS
            )
            assert self.vol.read_at(0, SIZE) == self.committed

        @invariant()
        def size_is_fixed(self) -> None:
            if self.vol is not None:
                assert self.vol.size == SIZE

        def teardown(self) -> None:
            try:
                if self.vol is not None:
                    self.vol.close()
                    assert not self.md.lock_status("v").locked
            finally:
                self.store.close()
                self.backend.close()
                shutil.rmtree(self.dir, ignore_errors=True)

    VolumeMachine.__name__ = f"VolumeMachine_{meta}_{block}"
    return VolumeMachine


@pytest.mark.parametrize(("meta", "block"), COMBOS, ids=[f"meta={m}-block={b}" for m, b in COMBOS])
def test_volume_matches_bytearray_model(meta: str, block: str) -> None:
    run_state_machine_as_test(make_machine(meta, block))
