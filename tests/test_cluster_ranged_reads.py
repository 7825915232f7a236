"""Small reads of remote blocks through a File (``crc,base``) over 3 real gRPC peers on 127.0.0.1
(R=2, file block stores): they move the range (and once the block's page CRC table), not the
block, unless the pattern says the block will be read again; a corrupt replica is still caught
and repaired from the other copy."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torus_blockstore_file.store import DATA_FILE, FileBlockStore

from torus_core.blockset.base import BaseLayer
from torus_core.blockset.crc import PAGE_SIZE
from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.crc32 import page_crcs
from torus_core.distributor import Distributor, DistributorTimeouts
from torus_core.errors import CorruptBlock
from torus_core.file import File
from torus_core.refs import BlockRef
from torus_core.ring.ketama import KetamaRing
from torus_core.testing.distributor import LocalCluster
from torus_core.testing.files import FileVolume

PAGES = 4
BS = PAGES * PAGE_SIZE
BLOCKS = 200
PEERS = ["peer-a", "peer-b", "peer-c"]
FAST = DistributorTimeouts(read_peer=1.0, read_peer_max=2.0, read_attempts=2, read_total=5.0, write=3.0)
TABLE = 4 * PAGES  # bytes of one block's page CRC table


def content(i: int) -> bytes:
    return random.Random(i).randbytes(BS)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    def file_store(block_size: int, capacity_blocks: int) -> BlockStore:
        path = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
        path.mkdir()
        return FileBlockStore.open(BlockStoreConfig(block_size, block_size * capacity_blocks, str(path)))

    with LocalCluster(
        PEERS,
        lambda members: KetamaRing(members, replication=2),
        block_size=BS,
        capacity_blocks=4 * BLOCKS,
        store_factory=file_store,
    ) as c:
        yield c


@pytest.fixture
def volume(cluster: LocalCluster) -> Iterator[tuple[FileVolume, Distributor]]:
    """A volume written through a client (no local store, a cache of 8 blocks), then a clean
    cache and zeroed counters."""
    client = cluster.client(timeouts=FAST, read_cache_bytes=8 * BS)
    vol = FileVolume(client, 5, BLOCKS * BS)
    f = vol.open()
    for i in range(BLOCKS):
        f.write_at(i * BS, content(i))
    f.sync()
    f.close()
    client.cache.clear()
    client.stats.remote_read_bytes = client.stats.ranged_reads = client.stats.page_crc_reads = 0
    yield vol, client


def get_calls(cluster: LocalCluster) -> int:
    return sum(s.stats["GetBlock"] for s in cluster.servers.values())


def ref_of(f: File, i: int) -> BlockRef:
    base = f.blockset.layers()[-1]
    assert isinstance(base, BaseLayer)
    return base.ref_at(i)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_small_random_reads_of_remote_blocks_move_the_ranges_not_the_blocks(
    cluster: LocalCluster,
    volume: tuple[FileVolume, Distributor],
) -> None:
    vol, client = volume
    f = vol.open()
    moved, calls = client.stats.remote_read_bytes, get_calls(cluster)  # the INode's block
    rng = random.Random(15)
    reads = [
        (i, rng.randrange(PAGES), rng.randrange(0, PAGE_SIZE - 512, 512))
        for i in rng.sample(range(0, BLOCKS, 2), 60)  # never the next block: not sequential
    ]
    # again, 20 of them at another page (not the next one: that would be a sequential reader)
    reads += [(i, (page + 2) % PAGES, at) for i, page, at in reads[:20]]
    for i, page, at in reads:
        assert f.read_at(i * BS + page * PAGE_SIZE + at, 512) == content(i)[page * PAGE_SIZE + at :][:512]
    # each read: the one 4 KiB page it checks; each block: its page CRC table, once
    assert client.stats.remote_read_bytes - moved == 80 * PAGE_SIZE + 60 * TABLE
    assert get_calls(cluster) - calls == 80 + 60
    assert client.stats.page_crc_reads == 60 and client.stats.ranged_reads == 80
    assert client.reads.prefetcher.started == 0
    assert not any(ref_of(f, i) in client.cache for i, _, _ in reads)
    f.close()


def test_a_block_read_in_order_is_fetched_whole_into_the_cache(
    cluster: LocalCluster, volume: tuple[FileVolume, Distributor]
) -> None:
    vol, client = volume
    f = vol.open()
    ref = ref_of(f, 7)
    assert f.read_at(7 * BS, 4096) == content(7)[:4096]
    assert f.read_at(7 * BS + 4096, 4096) == content(7)[4096:8192]  # continues: the block comes
    assert wait_until(lambda: ref in client.cache)
    calls = get_calls(cluster)
    assert f.read_at(7 * BS + 8192, BS - 8192) == content(7)[8192:]
    assert get_calls(cluster) == calls  # the rest came from the cache
    f.close()


def test_a_block_read_by_range_again_and_again_is_fetched_whole_into_the_cache(
    cluster: LocalCluster, volume: tuple[FileVolume, Distributor]
) -> None:
    vol, client = volume
    f = vol.open()
    ref = ref_of(f, 9)
    for page in (2, 0, 3):  # not in order: stays ranged
        assert f.read_at(9 * BS + page * PAGE_SIZE, 100) == content(9)[page * PAGE_SIZE :][:100]
    assert client.reads.prefetcher.started == 0 and ref not in client.cache
    assert f.read_at(9 * BS + PAGE_SIZE, 100) == content(9)[PAGE_SIZE:][:100]  # a 4th: a hot block
    assert wait_until(lambda: ref in client.cache)
    calls = get_calls(cluster)
    assert f.read_at(9 * BS + 2 * PAGE_SIZE + 50, 10) == content(9)[2 * PAGE_SIZE + 50 :][:10]
    assert get_calls(cluster) == calls
    f.close()


def _flip(cluster: LocalCluster, uuid: str, ref: BlockRef, offset: int) -> None:
    store = cluster.stores[uuid].inner
    assert isinstance(store, FileBlockStore)
    fd = os.open(Path(store._path) / DATA_FILE, os.O_RDWR)
    try:
        at = store._entries[ref].slot * BS + offset
        b = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), at)
    finally:
        os.close(fd)


def _first_owner(cluster: LocalCluster, ref: BlockRef) -> str:
    return cluster.ring.get_peers(ref).owners[0]


@pytest.mark.parametrize(
    "table_first,injected",
    [(False, False), (True, False), (True, True)],
    ids=["rots-before-table", "rots-after-table", "store-says-corrupt"],
)
def test_a_corrupt_replica_is_caught_on_a_ranged_read_and_repaired_from_the_other_copy(
    cluster: LocalCluster, volume: tuple[FileVolume, Distributor], table_first: bool, injected: bool
) -> None:
    vol, client = volume
    f = vol.open()
    i = 11
    ref = ref_of(f, i)
    bad = _first_owner(cluster, ref)  # asked first
    if table_first:  # the page table is taken while the copy is good, then it rots
        assert f.read_at(i * BS, 16) == content(i)[:16]
        assert client.stats.page_crc_reads == 1 and ref not in client.cache
    _flip(cluster, bad, ref, 2 * PAGE_SIZE + 100)  # on disk: the store's checksum fails
    if injected:  # and its range reads say so too (a store that checks ranges)
        cluster.stores[bad].corrupt.add(ref)
    with pytest.raises(CorruptBlock):
        cluster.stores[bad].get_block(ref)
    calls = cluster.servers[bad].stats["GetBlock"]
    # page 2 (not page 1: a read continuing the last one would fetch the block in the background)
    assert f.read_at(i * BS + 2 * PAGE_SIZE + 64, 512) == content(i)[2 * PAGE_SIZE + 64 :][:512]
    assert cluster.servers[bad].stats["GetBlock"] > calls  # the bad copy was asked, and caught
    assert client.reads.prefetcher.started == 0
    assert client.drain_repairs(10.0)
    assert client.stats.repairs >= 1
    assert cluster.stores[bad].get_block(ref) == content(i)  # replaced by the good copy
    f.close()


def test_the_page_crc_table_of_a_remote_block_is_one_small_answer(
    cluster: LocalCluster, volume: tuple[FileVolume, Distributor]
) -> None:
    vol, client = volume
    f = vol.open()
    ref = ref_of(f, 3)
    calls, moved = get_calls(cluster), client.stats.remote_read_bytes
    assert client.page_crcs(ref, PAGE_SIZE) == page_crcs(content(3), PAGE_SIZE)
    assert get_calls(cluster) - calls == 1 and client.stats.remote_read_bytes - moved == TABLE
    f.close()


def test_reads_without_the_file_lock_racing_writes_and_syncs_return_whole_versions(
    volume: tuple[FileVolume, Distributor],
) -> None:
    """Readers (clean blocks read after the lock is released) race a writer that rewrites and
    syncs blocks: every read returns bytes of one version of its block, never an error."""
    vol, _ = volume
    f = vol.open()
    n = 12
    versions: dict[int, set[int]] = {}
    for i in range(n):  # one byte value per version: a uniform block
        f.write_at(i * BS, bytes([i]) * BS)
        versions[i] = {i}
    f.sync()
    stop = time.monotonic() + 2.0
    errors: list[BaseException] = []
    torn: list[tuple[int, bytes]] = []

    def writer() -> None:
        rng = random.Random(1)
        v = 100
        while time.monotonic() < stop:
            i = rng.randrange(n)
            versions[i].add(v % 256)  # before the write: a reader may see it at once
            f.write_at(i * BS, bytes([v % 256]) * BS)
            v += 1
            if v % 5 == 0:
                f.sync()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                i = rng.randrange(n)
                got = f.read_at(i * BS + rng.randrange(0, BS - 600), 600)
                if len(set(got)) != 1 or got[0] not in versions[i]:
                    torn.append((i, got[:8]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(k,)) for k in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert not errors and not torn
    f.close()


def test_a_volume_opened_again_asks_the_peers_for_no_page_table_it_had(
    cluster: LocalCluster, volume: tuple[FileVolume, Distributor]
) -> None:
    vol, client = volume
    first = vol.open()
    for i in (20, 40, 60):
        assert first.read_at(i * BS + 100, 64) == content(i)[100:164]
    first.close()
    assert client.stats.page_crc_reads == 3
    again = vol.open()  # a new File: its crc layer starts without tables
    moved = client.stats.remote_read_bytes
    for i in (20, 40, 60):
        assert again.read_at(i * BS + 2 * PAGE_SIZE, 64) == content(i)[2 * PAGE_SIZE :][:64]
    assert client.stats.page_crc_reads == 3  # the distributor kept them
    assert client.stats.remote_read_bytes - moved <= 3 * PAGE_SIZE + BS  # the pages (+ the INode)
    again.close()


def test_a_storage_peer_that_does_not_own_a_block_asks_for_its_table_not_the_block(
    cluster: LocalCluster, volume: tuple[FileVolume, Distributor]
) -> None:
    """A peer with a local store that is not among a block's owners gets the page CRC table
    from an owner (one small answer), not the whole block (which the crc layer's first read of
    every remote block used to fetch)."""
    vol, writer = volume
    f = vol.open()
    ref = ref_of(f, 3)
    f.close()
    outsider = next(p for p in PEERS if p not in writer.ring.get_peers(ref).owners)
    peer = cluster.peer_distributor(outsider, timeouts=FAST)
    try:
        calls = get_calls(cluster)
        assert peer.page_crcs(ref, PAGE_SIZE) == page_crcs(content(3), PAGE_SIZE)
        assert get_calls(cluster) - calls == 1
        assert peer.stats.remote_read_bytes == TABLE
        assert ref not in peer.cache  # nothing whole was fetched
    finally:
        peer.close()
