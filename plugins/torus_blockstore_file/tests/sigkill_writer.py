"""Child process for the SIGKILL test: writes, deletes and flushes until killed.

Usage: ``python sigkill_writer.py PATH RUN_ID CAPACITY BLOCK_SIZE``.

Block ``i`` of run ``r`` is ``BlockRef(1, r, i)`` with content :func:`content`. After writing
block ``i`` the writer deletes block ``i - WINDOW``; every ``FLUSH_EVERY`` blocks it flushes and
prints ``F <i>``: then blocks ``max(0, i-WINDOW+1)..i`` are durable and all blocks
``<= i-WINDOW`` are durably deleted.
"""

from __future__ import annotations

import hashlib
import sys

from torus_blockstore_file import FileBlockStore

from torus_core.blockstore import BlockStoreConfig
from torus_core.refs import BlockRef

WINDOW = 24
FLUSH_EVERY = 5


def content(run: int, i: int, block_size: int) -> bytes:
    """Deterministic content of block ``i`` in run ``run`` (short for some, to test padding)."""
    seed = hashlib.blake2b(f"{run}:{i}".encode(), digest_size=32).digest()
    length = block_size if i % 3 else block_size // 2 + i % 7
    return (seed * (length // len(seed) + 1))[:length]


def main() -> None:
    """Write forever (bounded by a large count) until the parent kills us."""
    path, run, capacity, block_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = FileBlockStore.open(
        BlockStoreConfig(block_size=block_size, capacity_bytes=capacity * block_size, path=path)
    )
    print("OPEN", flush=True)
    for i in range(1_000_000):
        store.write_block(BlockRef(1, run, i), content(run, i, block_size))
        if i >= WINDOW:
            store.delete_block(BlockRef(1, run, i - WINDOW))
        if i % FLUSH_EVERY == FLUSH_EVERY - 1:
            store.flush()
            print(f"F {i}", flush=True)
    store.close()


if __name__ == "__main__":
    main()
