"""Peer RPC over real gRPC servers on 127.0.0.1: round trips, batching, error mapping, deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from torus_core.blockstore import BlockStore
from torus_core.errors import (
    BlockExists,
    BlockNotExist,
    Closed,
    ConfigError,
    CorruptBlock,
    InvalidArgument,
    OutOfSpace,
    PeerUnavailable,
)
from torus_core.refs import BlockRef, BlockType
from torus_core.rpc import PeerClient, PeerClientPool, PeerServer, RPCTimeouts, TLSConfig
from torus_core.rpc import torus_storage_pb2 as pb
from torus_core.rpc import torus_storage_pb2_grpc as pb_grpc
from torus_core.rpc.options import PROTOCOL_VERSION
from torus_core.rpc.tls import check_insecure_allowed, is_loopback, normalize_address, split_host_port
from torus_core.testing.distributor import FaultyStore, mem_store_factory

BS = 4096


def block(seed: int, size: int = BS) -> bytes:
    return bytes((seed + i) % 251 for i in range(size))


@pytest.fixture
def store() -> Iterator[FaultyStore]:
    inner = mem_store_factory()(BS, 64)
    s = FaultyStore(inner)
    yield s
    s.close()


@pytest.fixture
def server(store: BlockStore) -> Iterator[PeerServer]:
    srv = PeerServer(store, uuid="peer-a").start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def client(server: PeerServer) -> Iterator[PeerClient]:
    c = PeerClient(server.address, timeouts=RPCTimeouts(get=2.0, put=2.0, check=2.0, ping=1.0))
    yield c
    c.close()


def test_put_then_get_round_trips_the_bytes(client: PeerClient, store: FaultyStore) -> None:
    ref = BlockRef(1, 2, 3)
    assert client.put_blocks([ref], [block(7)]) == 1
    assert client.get_block(ref) == block(7)
    assert store.inner.get_block(ref) == block(7)


def test_short_block_is_zero_padded_by_the_remote_store(client: PeerClient) -> None:
    ref = BlockRef(1, 1, 1, BlockType.INODE)
    client.put_blocks([ref], [b"hello"])
    assert client.get_block(ref) == b"hello" + bytes(BS - 5)


def test_put_blocks_stores_a_whole_batch_in_one_call(client: PeerClient, server: PeerServer) -> None:
    refs = [BlockRef(2, 1, i) for i in range(10)]
    assert client.put_blocks(refs, [block(i) for i in range(10)]) == 10
    assert server.stats["PutBlocks"] == 1
    assert [client.get_block(r) for r in refs] == [block(i) for i in range(10)]


def test_put_blocks_flushes_the_store_before_acknowledging(client: PeerClient, store: FaultyStore) -> None:
    flushed = threading.Event()
    original = store.inner.flush

    def spy_flush() -> None:
        flushed.set()
        original()

    store.inner.flush = spy_flush  # type: ignore[method-assign]
    client.put_blocks([BlockRef(3, 1, 1)], [block(1)])
    assert flushed.is_set()


def test_put_block_stream_moves_many_blocks_in_batches(client: PeerClient, server: PeerServer) -> None:
    items = [(BlockRef(4, 1, i), block(i)) for i in range(20)]
    assert client.put_block_stream(iter(items), batch_bytes=3 * BS) == 20
    assert server.stats["PutBlockStream"] == 1
    assert all(client.get_block(r) == d for r, d in items)


def test_rebalance_check_reports_presence_per_ref(client: PeerClient) -> None:
    present, absent = BlockRef(5, 1, 1), BlockRef(5, 1, 2)
    client.put_blocks([present], [block(3)])
    assert client.rebalance_check([present, absent, present]) == [True, False, True]
    assert client.rebalance_check([]) == []


def test_ping_reports_identity_and_capacity(client: PeerClient, store: FaultyStore) -> None:
    client.put_blocks([BlockRef(6, 1, 1)], [block(1)])
    info = client.ping()
    assert (info.uuid, info.protocol_version, info.block_size) == ("peer-a", PROTOCOL_VERSION, BS)
    assert (info.total_blocks, info.used_blocks) == (64, 1)


def test_missing_block_maps_to_block_not_exist(client: PeerClient) -> None:
    with pytest.raises(BlockNotExist):
        client.get_block(BlockRef(9, 9, 9))


def test_corrupt_block_maps_to_corrupt_block(client: PeerClient, store: FaultyStore) -> None:
    ref = BlockRef(7, 1, 1)
    client.put_blocks([ref], [block(1)])
    store.corrupt.add(ref)
    with pytest.raises(CorruptBlock):
        client.get_block(ref)


def test_different_content_under_same_ref_maps_to_block_exists(client: PeerClient) -> None:
    ref = BlockRef(8, 1, 1)
    client.put_blocks([ref], [block(1)])
    client.put_blocks([ref], [block(1)])  # identical rewrite is a no-op
    with pytest.raises(BlockExists):
        client.put_blocks([ref], [block(2)])


def test_full_store_maps_to_out_of_space(client: PeerClient) -> None:
    refs = [BlockRef(10, 1, i) for i in range(65)]
    with pytest.raises(OutOfSpace):
        client.put_blocks(refs, [block(i) for i in range(65)])


def test_oversized_block_maps_to_invalid_argument(client: PeerClient) -> None:
    with pytest.raises(InvalidArgument):
        client.put_blocks([BlockRef(11, 1, 1)], [bytes(BS + 1)])


def test_malformed_ref_bytes_are_rejected_with_invalid_argument(server: PeerServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TorusStorageStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetBlock(pb.GetBlockRequest(ref=b"short"), timeout=2)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.PutBlocks(pb.PutBlocksRequest(refs=[BlockRef(1, 1, 1).to_bytes()], blocks=[]), timeout=2)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_mismatched_refs_and_blocks_are_refused_client_side(client: PeerClient, server: PeerServer) -> None:
    with pytest.raises(InvalidArgument):
        client.put_blocks([BlockRef(1, 1, 1)], [])
    assert server.stats["PutBlocks"] == 0


def test_closed_store_on_the_peer_maps_to_peer_unavailable(client: PeerClient, store: FaultyStore) -> None:
    store.fail_with = Closed("store closed")
    with pytest.raises(PeerUnavailable):
        client.get_block(BlockRef(1, 1, 1))


def test_repair_put_replaces_a_corrupt_copy_but_never_a_healthy_one(
    client: PeerClient, store: FaultyStore
) -> None:
    ref = BlockRef(12, 1, 1)
    client.put_blocks([ref], [block(1)])
    store.corrupt.add(ref)
    client.put_blocks([ref], [block(1)], repair=True)
    assert client.get_block(ref) == block(1)
    with pytest.raises(BlockExists):
        client.put_blocks([ref], [block(2)], repair=True)
    assert client.get_block(ref) == block(1)


def test_stopped_server_gives_peer_unavailable_within_the_deadline(store: FaultyStore) -> None:
    srv = PeerServer(store).start()
    address = srv.address
    srv.stop(grace=0)
    c = PeerClient(address, timeouts=RPCTimeouts(get=1.0))
    try:
        start = time.monotonic()
        with pytest.raises(PeerUnavailable) as info:
            c.get_block(BlockRef(1, 1, 1))
        assert time.monotonic() - start < 3.0
        assert info.value.retryable
        assert info.value.address == address
    finally:
        c.close()


def test_slow_peer_hits_the_call_deadline(store: FaultyStore) -> None:
    release = threading.Event()

    class SlowStore(FaultyStore):
        def get_block(self, ref: BlockRef) -> bytes:
            release.wait(5.0)
            return super().get_block(ref)

    srv = PeerServer(SlowStore(store.inner)).start()
    c = PeerClient(srv.address)
    try:
        start = time.monotonic()
        with pytest.raises(PeerUnavailable, match=r"(?i)deadline"):
            c.get_block(BlockRef(1, 1, 1), timeout=0.3)
        assert time.monotonic() - start < 2.0
    finally:
        release.set()
        c.close()
        srv.stop(grace=0)


def test_closed_client_raises_closed(server: PeerServer) -> None:
    c = PeerClient(server.address)
    c.close()
    with pytest.raises(Closed):
        c.get_block(BlockRef(1, 1, 1))


def test_pool_reuses_one_client_per_address_and_reset_replaces_it(server: PeerServer) -> None:
    with PeerClientPool() as pool:
        a = pool.get(server.address)
        assert pool.get(server.address) is a
        pool.reset(server.address)
        b = pool.get(server.address)
        assert b is not a
        assert b.put_blocks([BlockRef(1, 1, 1)], [block(1)]) == 1
        assert pool.addresses() == [server.address]
    with pytest.raises(Closed):
        pool.get(server.address)


def test_batch_of_large_blocks_fits_the_message_limit() -> None:
    big = 512 * 1024
    s = mem_store_factory()(big, 40)
    srv = PeerServer(s).start()
    try:
        with PeerClientPool() as pool:
            c = pool.get(srv.address)
            refs = [BlockRef(1, 1, i) for i in range(32)]  # 16 MiB in one PutBlocks
            assert c.put_blocks(refs, [bytes([i]) * big for i in range(32)]) == 32
            assert c.get_block(refs[31]) == bytes([31]) * big
    finally:
        srv.stop(grace=0)
        s.close()


def test_insecure_client_to_non_loopback_address_is_refused() -> None:
    with pytest.raises(ConfigError, match="insecure"):
        PeerClient("10.1.2.3:40000")
    with pytest.raises(ConfigError, match="insecure"):
        PeerClientPool().get("example.com:40000")
    PeerClient("10.1.2.3:40000", allow_insecure=True).close()


def test_insecure_server_on_non_loopback_address_is_refused(store: FaultyStore) -> None:
    with pytest.raises(ConfigError, match="insecure"):
        PeerServer(store, address="0.0.0.0:0")


def test_missing_tls_files_raise_config_error(tmp_path: Path) -> None:
    tls = TLSConfig(str(tmp_path / "no.crt"), str(tmp_path / "no.key"), str(tmp_path / "no-ca.crt"))
    with pytest.raises(ConfigError, match="cannot read TLS"):
        PeerClient("127.0.0.1:1", tls=tls)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:40000", ("127.0.0.1", 40000)),
        ("http://127.0.0.1:40000/", ("127.0.0.1", 40000)),
        ("[::1]:5", ("::1", 5)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_address_parsing_accepts_the_original_forms(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1", ":40000", "host:port", "host:70000", "[::1", ""])
def test_malformed_addresses_raise_config_error(address: str) -> None:
    with pytest.raises(ConfigError):
        normalize_address(address)


def test_loopback_detection() -> None:
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.9.9.9", "::1"))
    assert not any(is_loopback(h) for h in ("10.0.0.1", "0.0.0.0", "example.com", "::"))
    check_insecure_allowed("[::1]:1", False)
