"""Peer RPC and Distributor throughput on loopback, against references measured in the same run.

Run: ``.venv/bin/python bench/distributor.py [--blocks N] [--block-size BYTES] [--batch K]``

Three in-process gRPC peers (mem stores) on 127.0.0.1, a ketama ring with R=2, and a client
Distributor without a local store. Printed per line: MB/s of block payload and the ratio to

``rpc-1``: the same blocks sent with ``PeerClient.put_blocks`` / ``get_block`` to one peer (the
transport ceiling). The ``local mem`` lines show the in-process store for scale only (the mem
store keeps references, so they measure almost nothing).

Distributor writes at level ``all`` move every byte twice (two owners), so the ideal ratio to
``rpc-1`` for writes is about 0.5 when the client is the bottleneck.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torus_core.distributor import DistributorTimeouts, ReadLevel, WriteLevel
from torus_core.refs import BlockRef
from torus_core.ring.ketama import KetamaRing
from torus_core.testing.distributor import LocalCluster, mem_store_factory


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _each(fn: Callable[..., object], *columns: Sequence[Any]) -> float:
    """Seconds to call ``fn`` once per row of ``columns``."""
    start = time.perf_counter()
    for args in zip(*columns, strict=True):
        fn(*args)
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=512 * 1024)
    ap.add_argument("--batch", type=int, default=16, help="blocks per write_blocks / put_blocks call")
    args = ap.parse_args()
    n, bs, batch = args.blocks, args.block_size, args.batch
    payload = [bytes([i % 251]) * bs for i in range(n)]
    mb = n * bs / 1e6

    def refs(volume: int) -> list[BlockRef]:
        return [BlockRef(volume, 1, i) for i in range(n)]

    rows: list[tuple[str, float, str]] = []
    local = mem_store_factory()(bs, n * 8)
    r0 = refs(1)
    t_local_w = _each(local.write_block, r0, payload)
    t_local_r = _each(local.get_block, r0)
    local.close()

    timeouts = DistributorTimeouts(write=30.0, read_peer=5.0, read_peer_max=10.0, read_total=60.0)
    with LocalCluster(
        ["a", "b", "c"], lambda m: KetamaRing(m, replication=2), block_size=bs, capacity_blocks=n * 8
    ) as cluster:
        client = cluster.pool.get(cluster.addresses["a"])
        r1 = refs(2)

        def rpc_put() -> None:
            for i in range(0, n, batch):
                client.put_blocks(r1[i : i + batch], payload[i : i + batch], timeout=30)

        t_rpc_w = _timed(rpc_put)
        t_rpc_r = _each(partial(client.get_block, timeout=10), r1)

        dist = cluster.client("bench", timeouts=timeouts, read_cache_bytes=0)
        r2 = refs(3)

        def dist_write_batched() -> None:
            for i in range(0, n, batch):
                dist.write_blocks(list(zip(r2[i : i + batch], payload[i : i + batch], strict=True)))

        t_dw = _timed(dist_write_batched)
        r3 = refs(4)
        t_dw1 = _each(partial(dist.write_block, level=WriteLevel.ALL), r3, payload)
        r4 = refs(5)
        t_dwo = _each(partial(dist.write_block, level=WriteLevel.ONE), r4, payload)
        t_block = _each(partial(dist.get_block, level=ReadLevel.BLOCK), r2)
        t_spread = _each(partial(dist.get_block, level=ReadLevel.SPREAD), r2)
        cached = cluster.client("bench-cached", timeouts=timeouts, read_cache_bytes=n * bs * 2)
        cached.write_blocks(list(zip(refs(6), payload, strict=True)))
        t_cached = _each(cached.get_block, refs(6))

    def row(name: str, seconds: float, ref_local: float, ref_rpc: float) -> None:
        rows.append((name, mb / seconds, f"{ref_rpc / seconds:8.3f}x rpc-1"))

    row("local mem write", t_local_w, t_local_w, t_rpc_w)
    row("rpc-1 put_blocks", t_rpc_w, t_local_w, t_rpc_w)
    row(f"dist write all (batch {batch})", t_dw, t_local_w, t_rpc_w)
    row("dist write all (1 per call)", t_dw1, t_local_w, t_rpc_w)
    row("dist write one (1 per call)", t_dwo, t_local_w, t_rpc_w)
    row("local mem read", t_local_r, t_local_r, t_rpc_r)
    row("rpc-1 get_block", t_rpc_r, t_local_r, t_rpc_r)
    row("dist read block (no cache)", t_block, t_local_r, t_rpc_r)
    row("dist read spread (no cache)", t_spread, t_local_r, t_rpc_r)
    row("dist read (cache hits)", t_cached, t_local_r, t_rpc_r)
    print(f"{n} blocks x {bs} B = {mb:.1f} MB per line; 3 peers, ketama R=2, loopback gRPC")
    for name, rate, ratio in rows:
        print(f"{name:32s} {rate:9.1f} MB/s   {ratio}")


if __name__ == "__main__":
    main()
