"""SIGKILL a writer at random moments; every flushed block must survive, nothing wrong returned."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torus_blockstore_file import FileBlockStore

from torus_core.blockstore import BlockStoreConfig
from torus_core.errors import BlockStoreLocked
from torus_core.refs import BlockRef

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from sigkill_writer import FLUSH_EVERY, WINDOW, content  # noqa: E402

CAPACITY = 40
BLOCK_SIZE = 4096
ROUNDS = 10


def _open(path: Path) -> FileBlockStore:
    # The killed child's flock dies with it, but give the kernel a moment; bounded retries.
    for _ in range(50):
        try:
            return FileBlockStore.open(
                BlockStoreConfig(block_size=BLOCK_SIZE, capacity_bytes=CAPACITY * BLOCK_SIZE, path=str(path))
            )
        except BlockStoreLocked:
            time.sleep(0.02)
    raise AssertionError("store stayed locked after the writer died")


def _run_and_kill(path: Path, run: int, rng: random.Random) -> list[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "sigkill_writer.py"),
            str(path),
            str(run),
            str(CAPACITY),
            str(BLOCK_SIZE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.15))  # sometimes during interpreter start / open
        else:
            want = rng.randint(1, 40)
            deadline = time.monotonic() + 20
            while sum(1 for x in lines if x.startswith("F")) < want and time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.01))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        t.join(timeout=5)
    assert proc.returncode == -signal.SIGKILL
    return list(lines)


@pytest.mark.slow
def test_sigkill_never_loses_flushed_blocks_or_returns_wrong_bytes(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    path = tmp_path / "store"
    kills_after_flushes = 0
    for run in range(1, ROUNDS + 1):
        lines = _run_and_kill(path, run, rng)
        flushed = [int(x.split()[1]) for x in lines if x.startswith("F ")]
        store = _open(path)
        try:
            refs = set(store.iter_refs())
            if flushed:
                kills_after_flushes += 1
                last = flushed[-1]
                # After "F last" the child may have gone on to write up to last + FLUSH_EVERY
                # (deleting up to last + FLUSH_EVERY - WINDOW) before the kill landed.
                for i in range(max(0, last + FLUSH_EVERY - WINDOW + 1), last + 1):
                    ref = BlockRef(1, run, i)
                    assert ref in refs, f"flushed block {i} of run {run} lost"
                for i in range(0, last - WINDOW + 1):
                    assert BlockRef(1, run, i) not in refs, f"durably deleted block {i} came back"
            for ref in refs:
                assert ref.volume == 1 and ref.inode == run, f"stray ref {ref}"
                expected = content(run, ref.index, BLOCK_SIZE)
                expected += bytes(BLOCK_SIZE - len(expected))
                assert store.get_block(ref) == expected
            assert store.used_blocks() == len(refs) <= CAPACITY
            for ref in refs:  # start the next round from an empty store
                store.delete_block(ref)
        finally:
            store.close()
    assert kills_after_flushes >= ROUNDS // 2
