"""Block reads and writes over the framed peer channel (torus_core.journal.channel, ops GET, PUT,
FLUSH) and the distributor's choice of transport (PeerCalls.data): real servers on 127.0.0.1,
mem block stores, every wait bounded by a client timeout."""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.blockstore import BlockStore
from torus_core.crc32 import page_crcs
from torus_core.distributor import Distributor, DistributorTimeouts
from torus_core.errors import BlockNotExist, InvalidArgument, NotSupported
from torus_core.journal.channel import (
    INVALID,
    OP_GET,
    OP_PUT,
    JournalChannelClient,
    JournalChannelServer,
)
from torus_core.journal.store import JournalStore
from torus_core.refs import BlockRef
from torus_core.ring.ketama import KetamaRing
from torus_core.rpc.auth import ClusterKey, PeerAuth
from torus_core.testing.distributor import LocalCluster, mem_store_factory

BS = 4096
PEERS = ["peer-a", "peer-b", "peer-c"]
FAST = DistributorTimeouts(read_peer=1.0, read_peer_max=2.0, read_attempts=2, read_total=5.0, write=3.0)
_HEAD = struct.Struct("<IB")


def content(i: int) -> bytes:
    return random.Random(i).randbytes(BS)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[JournalStore]:
    j = JournalStore(tmp_path / "journal")
    yield j
    j.close()


@pytest.fixture
def block_store() -> Iterator[BlockStore]:
    store = mem_store_factory()(BS, 64)
    for i in range(1, 4):
        store.write_block(BlockRef(9, 1, i), content(i))
    yield store
    store.close()


def test_get_serves_whole_blocks_ranges_and_page_tables_with_typed_errors(
    journal: JournalStore, block_store: BlockStore
) -> None:
    key = ClusterKey.generate()
    with JournalChannelServer(journal, store=block_store, auth=key) as srv:
        client = JournalChannelClient(srv.address, timeout=2.0, auth=PeerAuth(key, "reader"))
        try:
            ref = BlockRef(9, 1, 2)
            assert client.get_block(ref) == content(2)
            assert client.get_block_range(ref, 100, 512) == content(2)[100:612]
            assert client.get_block_page_crcs(ref, 512, BS) == page_crcs(content(2), 512)
            with pytest.raises(BlockNotExist):
                client.get_block(BlockRef(9, 1, 40))
            with pytest.raises(InvalidArgument):
                client.get_block_range(ref, BS - 8, 16)  # past the end of the block
            assert client.get_block(ref) == content(2)  # the connection kept serving
            assert srv.gets == 6
        finally:
            client.close()


def test_get_put_and_flush_on_a_channel_without_a_store_are_not_supported(journal: JournalStore) -> None:
    with JournalChannelServer(journal) as srv:
        client = JournalChannelClient(srv.address, timeout=2.0)
        try:
            with pytest.raises(NotSupported):
                client.get_block(BlockRef(9, 1, 1))
            with pytest.raises(NotSupported):
                client.put_blocks([BlockRef(9, 1, 1)], [content(1)])
            with pytest.raises(NotSupported):
                client.flush()
        finally:
            client.close()


def test_put_stores_trimmed_blocks_padded_and_reports_the_boot_id(
    journal: JournalStore, block_store: BlockStore
) -> None:
    stored: list[list[BlockRef]] = []
    with JournalChannelServer(journal, store=block_store, boot_id="boot-1", on_put=stored.append) as srv:
        client = JournalChannelClient(srv.address, timeout=2.0)
        try:
            tail_zero = content(7)[:1000] + bytes(BS - 1000)
            refs = [BlockRef(9, 2, 1), BlockRef(9, 2, 2)]
            written, boot = client.put_blocks_deferred(refs, [content(6), tail_zero], trim=True)
            assert (written, boot) == (2, "boot-1")
            assert client.flush() == "boot-1"
            assert block_store.get_block(refs[0]) == content(6)
            assert block_store.get_block(refs[1]) == tail_zero  # padded back by the store
            assert client.put_blocks([BlockRef(9, 2, 3)], [memoryview(content(8))]) == 1
            assert block_store.get_block(BlockRef(9, 2, 3)) == content(8)
            assert stored == [refs, [BlockRef(9, 2, 3)]] and srv.puts == 2
        finally:
            client.close()


def test_a_put_whose_blocks_overrun_the_frame_gets_invalid_and_stores_nothing(
    journal: JournalStore, block_store: BlockStore
) -> None:
    used = block_store.used_blocks()
    with JournalChannelServer(journal, store=block_store) as srv:
        host, port = srv.address.rsplit(":", 1)
        # one block announced as 4096 bytes, 10 sent
        body = struct.pack("<BI", 0, 1) + BlockRef(9, 3, 1).to_bytes() + struct.pack("<I", BS) + b"0123456789"
        with socket.create_connection((host, int(port)), timeout=2.0) as sock:
            sock.sendall(_HEAD.pack(1 + len(body), OP_PUT) + body)
            length, status = _HEAD.unpack(sock.recv(_HEAD.size, socket.MSG_WAITALL))
            assert status == INVALID
            sock.recv(length - 1, socket.MSG_WAITALL)
            assert sock.recv(1) == b""
    assert block_store.used_blocks() == used and srv.puts == 0


def test_a_malformed_get_gets_invalid_and_the_connection_closes(
    journal: JournalStore, block_store: BlockStore
) -> None:
    with JournalChannelServer(journal, store=block_store) as srv:
        host, port = srv.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2.0) as sock:
            sock.sendall(_HEAD.pack(1 + 5, OP_GET) + b"short")
            length, status = _HEAD.unpack(sock.recv(_HEAD.size, socket.MSG_WAITALL))
            assert status == INVALID
            sock.recv(length - 1, socket.MSG_WAITALL)
            assert sock.recv(1) == b""  # closed by the server
        assert srv.gets == 0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, dict[str, JournalChannelServer]]]:
    """Three gRPC peers, each also serving its store on a framed channel."""
    with LocalCluster(PEERS, lambda m: KetamaRing(m, replication=2), block_size=BS) as c:
        journals = {u: JournalStore(tmp_path / u) for u in PEERS}
        channels = {
            u: JournalChannelServer(journals[u], store=c.stores[u], auth=c.key).start() for u in PEERS
        }
        try:
            yield c, channels
        finally:
            for ch in channels.values():
                ch.stop()
            for j in journals.values():
                j.close()


def _written(c: LocalCluster) -> list[BlockRef]:
    writer = c.client("writer", timeouts=FAST)
    refs = [BlockRef(5, 1, i) for i in range(1, 25)]
    for i, ref in enumerate(refs, 1):
        writer.write_block(ref, content(i))
    writer.flush()
    return refs


def _reader(c: LocalCluster) -> Distributor:
    return c.client("reader", timeouts=FAST, read_cache_bytes=0)


def test_the_distributor_reads_remote_blocks_over_the_channel_not_grpc(
    cluster: tuple[LocalCluster, dict[str, JournalChannelServer]],
) -> None:
    c, channels = cluster
    refs = _written(c)
    reader = _reader(c)
    reader.calls.channel_address = {u: ch.address for u, ch in channels.items()}.get
    grpc_gets = sum(s.stats["GetBlock"] for s in c.servers.values())
    for i, ref in enumerate(refs, 1):
        assert reader.get_block(ref) == content(i)
        assert reader.read_block_range(ref, 8, 100) == content(i)[8:108]
        assert reader.page_crcs(ref, 512) == page_crcs(content(i), 512)
    assert sum(ch.gets for ch in channels.values()) == 3 * len(refs)
    assert sum(s.stats["GetBlock"] for s in c.servers.values()) == grpc_gets


def test_a_refused_channel_sends_reads_back_to_grpc(
    cluster: tuple[LocalCluster, dict[str, JournalChannelServer]],
) -> None:
    c, channels = cluster
    refs = _written(c)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    reader = _reader(c)
    reader.calls.channel_address = lambda uuid: dead
    grpc_gets = sum(s.stats["GetBlock"] for s in c.servers.values())
    for i, ref in enumerate(refs, 1):
        assert reader.get_block(ref) == content(i)
    assert sum(ch.gets for ch in channels.values()) == 0
    assert sum(s.stats["GetBlock"] for s in c.servers.values()) - grpc_gets == len(refs)


def test_the_distributor_replicates_and_flushes_over_the_channel_not_grpc(
    cluster: tuple[LocalCluster, dict[str, JournalChannelServer]],
) -> None:
    c, channels = cluster
    writer = c.client("writer", timeouts=FAST)
    writer.calls.channel_address = {u: ch.address for u, ch in channels.items()}.get
    grpc_puts = sum(s.stats["PutBlocks"] + s.stats["Flush"] for s in c.servers.values())
    refs = [BlockRef(5, 1, i) for i in range(1, 25)]
    for i, ref in enumerate(refs, 1):
        writer.write_block(ref, content(i))
    writer.flush()
    assert sum(ch.puts for ch in channels.values()) >= 1
    assert sum(s.stats["PutBlocks"] + s.stats["Flush"] for s in c.servers.values()) == grpc_puts
    for i, ref in enumerate(refs, 1):
        assert len(c.holders(ref)) == 2  # R copies
        assert _reader(c).get_block(ref) == content(i)
