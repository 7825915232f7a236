"""Ranged GetBlock: a peer returns just the asked bytes of a block (the caller verifies them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torus_core.errors import BlockNotExist, InvalidArgument
from torus_core.refs import BlockRef
from torus_core.rpc import PeerClient, PeerServer, RPCTimeouts
from torus_core.rpc import torus_storage_pb2 as pb
from torus_core.testing.distributor import FaultyStore, mem_store_factory

BS = 4096


def block(seed: int) -> bytes:
    return bytes((seed * 13 + i) % 251 for i in range(BS))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FaultyStore, PeerServer, PeerClient]]:
    store = FaultyStore(mem_store_factory()(BS, 16))
    server = PeerServer(store, uuid="peer-r").start()
    client = PeerClient(server.address, timeouts=RPCTimeouts(get=2.0, put=2.0, check=2.0, ping=1.0))
    store.write_block(BlockRef(1, 1, 1), block(1))
    yield store, server, client
    client.close()
    server.stop(grace=0)
    store.close()


@settings(max_examples=40, deadline=None)
@given(start=st.integers(0, BS - 1), data=st.data())
def test_a_ranged_read_returns_exactly_those_bytes_of_the_block(
    served: tuple[FaultyStore, PeerServer, PeerClient], start: int, data: st.DataObject
) -> None:
    _, _, client = served
    length = data.draw(st.integers(1, BS - start))
    assert client.get_block_range(BlockRef(1, 1, 1), start, length) == block(1)[start : start + length]


def test_a_ranged_read_of_a_missing_block_is_block_not_exist(
    served: tuple[FaultyStore, PeerServer, PeerClient],
) -> None:
    with pytest.raises(BlockNotExist):
        served[2].get_block_range(BlockRef(9, 9, 9), 0, 16)


@pytest.mark.parametrize("start,length", [(-1, 4), (0, 0), (0, -3), (2**32, 1)])
def test_a_bad_range_is_refused_before_the_call(
    served: tuple[FaultyStore, PeerServer, PeerClient], start: int, length: int
) -> None:
    before = served[1].stats["GetBlock"]
    with pytest.raises(InvalidArgument):
        served[2].get_block_range(BlockRef(1, 1, 1), start, length)
    assert served[1].stats["GetBlock"] == before


@pytest.mark.parametrize("offset,length", [(BS - 4, 8), (4, 0)])
def test_the_server_refuses_a_range_outside_the_block(
    served: tuple[FaultyStore, PeerServer, PeerClient], offset: int, length: int
) -> None:
    _, _, client = served
    req = pb.GetBlockRequest(ref=BlockRef(1, 1, 1).to_bytes(), offset=offset, length=length)
    with pytest.raises(InvalidArgument):
        client._call("GetBlock", client._stub.GetBlock, req, 2.0)


def test_a_whole_block_answer_from_an_old_peer_is_sliced_to_the_range(
    served: tuple[FaultyStore, PeerServer, PeerClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, client = served
    real = client._stub.GetBlock

    def old_peer(request: pb.GetBlockRequest, timeout: float) -> pb.GetBlockResponse:
        # a peer that predates ranges ignores offset/length and sends the whole block
        return real(pb.GetBlockRequest(ref=request.ref), timeout=timeout)

    monkeypatch.setattr(client._stub, "GetBlock", old_peer)
    assert client.get_block_range(BlockRef(1, 1, 1), 100, 50) == block(1)[100:150]
