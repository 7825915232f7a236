"""NBD reads of remote blocks overlap: a volume served over NBD (in-process VolumeExportProvider,
SQLite metadata) on a cluster client (3 real gRPC peers on 127.0.0.1, R=2, whose stores answer
reads slowly), read by a real libnbd client with many requests in flight."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from torus_blockstore_mem.store import MemBlockStore
from torus_sqlite.backend import SQLiteBackend

from torus_core.block import VolumeExportProvider
from torus_core.blockset import default_layer_registry
from torus_core.blockstore import BlockStore
from torus_core.distributor import Distributor, DistributorTimeouts
from torus_core.metadata import MetadataService
from torus_core.nbd import NBDServer, ServerThread
from torus_core.refs import BlockRef
from torus_core.ring.builtin import builtin_ring_types
from torus_core.ring.ketama import KetamaRing
from torus_core.testing.distributor import LocalCluster

pytestmark = pytest.mark.nbd_clients

BS = 64 * 1024
BLOCKS = 16
DELAY = 0.3  # seconds each peer takes to answer a read
SYSTEM_PYTHON = "/usr/bin/python3"
FAST = DistributorTimeouts(read_peer=5.0, read_peer_max=5.0, read_attempts=1, read_total=10.0, write=5.0)


class SlowReads(MemBlockStore):
    """A memory store whose reads take :attr:`delay` seconds (a loaded peer, a long path)."""

    delay = 0.0

    def get_block(self, ref: BlockRef) -> bytes:
        """Sleeps, then reads."""
        time.sleep(self.delay)
        return super().get_block(ref)

    def read_block_range(self, ref: BlockRef, start: int, length: int) -> bytes:
        """Sleeps, then reads."""
        time.sleep(self.delay)
        return super().read_block_range(ref, start, length)


def nbd(uri: str, script: str, timeout: float = 60.0) -> str:
    if shutil.which(SYSTEM_PYTHON) is None:
        pytest.fail(f"{SYSTEM_PYTHON} (with python3-libnbd) is missing, see /work/shared/env-notes.md")
    prog = f"import nbd, time\nh = nbd.NBD()\nh.connect_uri({uri!r})\n" + textwrap.dedent(script)
    proc = subprocess.run([SYSTEM_PYTHON, "-c", prog], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"nbd client failed: {proc.stderr}")
    return proc.stdout


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Distributor, list[SlowReads]]]:
    stores: list[SlowReads] = []

    def slow_store(block_size: int, capacity_blocks: int) -> BlockStore:
        stores.append(SlowReads(block_size, capacity_blocks))
        return stores[-1]

    with LocalCluster(
        ["peer-a", "peer-b", "peer-c"],
        lambda members: KetamaRing(members, replication=2),
        block_size=BS,
        capacity_blocks=1024,
        store_factory=slow_store,
    ) as cluster:
        backend = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/meta.db")
        md = MetadataService(backend, ring_types=builtin_ring_types())
        md.format(BS, "crc,base")
        md.create_volume("vol", BLOCKS * BS)
        client = cluster.client(timeouts=FAST, read_cache_bytes=4 * BS)
        provider = VolumeExportProvider(
            md, client, owner="test", lease_ttl=5.0, layer_registry=default_layer_registry()
        )
        server = ServerThread(NBDServer(provider, port=0)).start()
        try:
            yield f"nbd://127.0.0.1:{server.port}/vol", client, stores
        finally:
            server.stop()
            provider.close()
            backend.close()


def test_reads_of_remote_blocks_in_flight_together_overlap(
    served: tuple[str, Distributor, list[SlowReads]],
) -> None:
    uri, client, stores = served
    nbd(
        uri,
        f"""
        for i in range({BLOCKS}):
            h.pwrite(bytes([i + 1]) * {BS}, i * {BS})
        h.flush()
        h.shutdown()
        """,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and client.reads.prefetcher and len(client.reads.prefetcher):
        time.sleep(0.05)
    client.cache.clear()
    for s in stores:
        s.delay = DELAY
    # 8 small reads of 8 blocks, all in flight at once; each needs a peer (the client stores
    # nothing): a page CRC table and a range, 2 x DELAY. One after the other: >= 8 x 0.6 s.
    out = nbd(
        uri,
        f"""
        bufs = [nbd.Buffer(4096) for _ in range(8)]
        t0 = time.monotonic()
        for k in range(8):
            h.aio_pread(bufs[k], (2 * k) * {BS} + 8192)
        while h.aio_in_flight() > 0 and time.monotonic() - t0 < 30:
            h.poll(1000)
        print(time.monotonic() - t0)
        print(",".join(str(b.to_bytearray()[0]) + ":" + str(len(set(b.to_bytearray()))) for b in bufs))
        h.shutdown()
        """,
    )
    elapsed, contents = out.split()
    assert contents == ",".join(f"{2 * k + 1}:1" for k in range(8))
    assert float(elapsed) < 8 * 2 * DELAY / 2, f"8 remote reads took {elapsed} s: they did not overlap"
