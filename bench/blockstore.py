"""Block-store throughput: mem and file stores against raw os.pwrite/os.pread, same run, same disk.

Run: ``.venv/bin/python bench/blockstore.py [--blocks N] [--dir DIR]``

Prints MB/s for 512 KiB blocks and each store's ratio to the raw reference measured in the same
run (raw write = pwrite of the same bytes into a sparse file followed by one fsync; raw read =
pread of them back). The file store's write figure includes a final ``flush`` (fsync data +
index), its read figure includes the CRC-32 check. It also times allocation in a store with
1 Mi slots against one with 4 Ki slots (same work), to show allocation does not scan capacity.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from torus_blockstore_file import FileBlockStore
from torus_blockstore_mem import MemBlockStore

from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.refs import BlockRef

BLOCK = 512 * 1024


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _raw(directory: str, blocks: list[bytes]) -> tuple[float, float]:
    path = os.path.join(directory, "raw.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(blocks) * BLOCK)

        def write() -> None:
            for i, b in enumerate(blocks):
                os.pwrite(fd, b, i * BLOCK)
            os.fsync(fd)

        def read() -> None:
            for i in range(len(blocks)):
                os.pread(fd, BLOCK, i * BLOCK)

        return _timed(write), _timed(read)
    finally:
        os.close(fd)
        os.unlink(path)


def _store(store: BlockStore, blocks: list[bytes]) -> tuple[float, float]:
    refs = [BlockRef(1, 1, i) for i in range(len(blocks))]

    def write() -> None:
        for r, b in zip(refs, blocks, strict=True):
            store.write_block(r, b)
        store.flush()

    def read() -> None:
        for r in refs:
            store.get_block(r)

    return _timed(write), _timed(read)


def _alloc(directory: str, capacity: int, n: int) -> float:
    path = tempfile.mkdtemp(dir=directory)
    try:
        cfg = BlockStoreConfig(
            block_size=512, capacity_bytes=capacity * 512, path=path, options={"fsync": False}
        )
        with FileBlockStore.open(cfg) as s:

            def work() -> None:
                for i in range(n):
                    s.write_block(BlockRef(1, 1, i), b"x")
                for i in range(0, n, 2):
                    s.delete_block(BlockRef(1, 1, i))
                s.flush()
                for i in range(n, n + n // 2):
                    s.write_block(BlockRef(1, 1, i), b"y")

            return _timed(work)
    finally:
        shutil.rmtree(path)


def main() -> None:
    """Run the benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", type=int, default=256, help="number of 512 KiB blocks (default 256)")
    ap.add_argument("--dir", default=os.getcwd(), help="directory on the disk to test (default: cwd)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    args = ap.parse_args()
    blocks = [os.urandom(BLOCK) for _ in range(args.blocks)]
    mb = args.blocks * BLOCK / 1e6
    results: dict[str, list[tuple[float, float]]] = {"raw pwrite/pread": [], "mem": [], "file": []}
    for _ in range(args.repeat):
        work = tempfile.mkdtemp(prefix="torus-bench-", dir=args.dir)
        try:
            results["raw pwrite/pread"].append(_raw(work, blocks))
            cap = (args.blocks + 1) * BLOCK
            with MemBlockStore.open(BlockStoreConfig(block_size=BLOCK, capacity_bytes=cap)) as m:
                results["mem"].append(_store(m, blocks))
            cfg = BlockStoreConfig(block_size=BLOCK, capacity_bytes=cap, path=os.path.join(work, "fs"))
            with FileBlockStore.open(cfg) as f:
                results["file"].append(_store(f, blocks))
        finally:
            shutil.rmtree(work)

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    ref_w = median([w for w, _ in results["raw pwrite/pread"]])
    ref_r = median([r for _, r in results["raw pwrite/pread"]])
    print(f"{args.blocks} x 512 KiB blocks ({mb:.0f} MB), median of {args.repeat}, dir={args.dir}")
    print(f"{'':18} {'write MB/s':>11} {'vs raw':>7} {'read MB/s':>10} {'vs raw':>7}")
    for name, runs in results.items():
        w = median([x for x, _ in runs])
        r = median([y for _, y in runs])
        print(f"{name:18} {mb / w:11.0f} {ref_w / w:7.2f} {mb / r:10.0f} {ref_r / r:7.2f}")

    n = 4000
    small = median([_alloc(args.dir, 4096, n) for _ in range(args.repeat)])
    huge = median([_alloc(args.dir, 1 << 20, n) for _ in range(args.repeat)])
    print(
        f"allocation ({n} writes, {n // 2} deletes, {n // 2} rewrites): 4 Ki slots {small * 1e3:.1f} ms, "
        f"1 Mi slots {huge * 1e3:.1f} ms (ratio {huge / small:.2f}; ~1 means no capacity scan)"
    )


if __name__ == "__main__":
    main()
