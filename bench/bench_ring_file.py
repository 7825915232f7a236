"""Ring lookup and File write-path figures, as ratios against references measured in the same run.

Run: ``.venv/bin/python bench/bench_ring_file.py``

* ketama/mod ``get_peers`` per second vs a bare ``md5`` of the 24 ref bytes (the floor);
* small random 4 KiB writes + one sync on a File with the write-back cache vs the same File with
  a one-block cache (the original's ``singleBlockCache`` behaviour), on the mem block store.
"""

from __future__ import annotations

import hashlib
import random
import time

from torus_blockstore_mem.store import MemBlockStore

from torus_core.blockset import default_layer_registry
from torus_core.file import File
from torus_core.inode import virtual_inode
from torus_core.refs import BlockRef
from torus_core.ring import RingMember, make_ring
from torus_core.ring.builtin import builtin_ring_types

RING_TYPES = builtin_ring_types()


def _rate(fn: object, n: int) -> float:
    t = time.perf_counter()
    fn(n)  # type: ignore[operator]
    return n / (time.perf_counter() - t)


def bench_rings() -> None:
    refs = [BlockRef(1, 7, i) for i in range(50_000)]
    members = [RingMember(f"peer-{i:02d}", 1000) for i in range(10)]
    ketama = make_ring("ketama", members, replication=2, registry=RING_TYPES)
    mod = make_ring("mod", members, replication=2, registry=RING_TYPES)

    def md5_only(n: int) -> None:
        for r in refs[:n]:
            hashlib.md5(r.to_bytes()).digest()

    def run(ring: object) -> object:
        def inner(n: int) -> None:
            for r in refs[:n]:
                ring.get_peers(r)  # type: ignore[attr-defined]

        return inner

    base = _rate(md5_only, len(refs))
    for name, ring in (("ketama", ketama), ("mod", mod)):
        rate = _rate(run(ring), len(refs))
        print(
            f"{name:7s} get_peers: {rate:12,.0f}/s  ({rate / base:.2f}x of bare md5+to_bytes {base:,.0f}/s)"
        )


def bench_file(block_size: int = 512 * 1024, writes: int = 2000) -> None:
    size = 256 * block_size
    rng = random.Random(1)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(writes)]
    payload = b"\xab" * 4096

    def run(cache_bytes: int) -> float:
        store = MemBlockStore(block_size, 100_000)
        counter = iter(range(2, 10**9))
        f = File(
            virtual_inode(1, size),
            store,
            allocate_inode=lambda: next(counter),
            commit=lambda ref: None,
            layer_registry=default_layer_registry(),
            cache_bytes=cache_bytes,
        )
        t = time.perf_counter()
        for off in offsets:
            f.write_at(off, payload)
        f.sync()
        return time.perf_counter() - t

    single = run(block_size)
    cached = run(64 * 1024 * 1024)
    print(
        f"File {writes} random 4KiB writes + sync (512 KiB blocks): write-back cache {cached:.3f}s, "
        f"one-block cache {single:.3f}s -> {single / cached:.1f}x faster"
    )


if __name__ == "__main__":
    bench_rings()
    bench_file()
