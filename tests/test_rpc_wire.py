"""Hand-encoded PutBlocks requests: byte-identical to protobuf's encoding of the same message."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torus_core.errors import InvalidArgument
from torus_core.refs import BlockRef
from torus_core.rpc import PeerClient, PeerServer, RPCTimeouts
from torus_core.rpc import torus_storage_pb2 as pb
from torus_core.rpc.wire import decode_put_blocks, encode_put_blocks, trim_zeros, varint
from torus_core.testing.distributor import FaultyStore, mem_store_factory

refs_st = st.builds(BlockRef, st.integers(0, 2**40 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
block_st = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, z: b + bytes(z), st.binary(max_size=200), st.integers(0, 300)),
)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.tuples(refs_st, block_st), max_size=6),
    repair=st.booleans(),
    defer=st.booleans(),
)
def test_the_encoding_is_what_protobuf_produces_for_the_trimmed_blocks(
    items: list[tuple[BlockRef, bytes]], repair: bool, defer: bool
) -> None:
    refs = [r for r, _ in items]
    blocks = [b for _, b in items]
    ours = encode_put_blocks(refs, blocks, repair=repair, defer_flush=defer, trim=True)
    theirs = pb.PutBlocksRequest(
        refs=[r.to_bytes() for r in refs],
        blocks=[b.rstrip(b"\x00") for b in blocks],
        repair=repair,
        defer_flush=defer,
    ).SerializeToString()
    assert ours == theirs
    parsed = pb.PutBlocksRequest.FromString(ours)
    assert [BlockRef.from_bytes(r) for r in parsed.refs] == refs


@settings(max_examples=50, deadline=None)
@given(items=st.lists(st.tuples(refs_st, block_st), max_size=4))
def test_untrimmed_encoding_keeps_every_byte(items: list[tuple[BlockRef, bytes]]) -> None:
    blocks = [b for _, b in items]
    parsed = pb.PutBlocksRequest.FromString(encode_put_blocks([r for r, _ in items], blocks))
    assert list(parsed.blocks) == blocks and not parsed.repair and not parsed.defer_flush


@given(st.integers(0, 2**64 - 1))
def test_varint_matches_protobuf(n: int) -> None:
    msg = pb.PingResponse(total_blocks=n).SerializeToString()
    assert msg == (b"\x20" + varint(n) if n else b"")


def test_trim_zeros_keeps_data_that_does_not_end_in_zero_as_the_same_object() -> None:
    data = b"abc"
    assert trim_zeros(data) is data
    assert trim_zeros(bytearray(b"ab\x00\x00")) == b"ab"
    assert trim_zeros(memoryview(b"\x00\x00")) == b""
    assert trim_zeros(b"") == b""


def test_blocks_sent_trimmed_are_stored_padded_to_the_block_size() -> None:
    bs = 4096
    store = FaultyStore(mem_store_factory()(bs, 8))
    server = PeerServer(store, uuid="p").start()
    client = PeerClient(server.address, timeouts=RPCTimeouts(get=2.0, put=2.0, check=2.0, ping=1.0))
    try:
        mostly_zero = b"inode" + bytes(bs - 5)
        all_zero = bytes(bs)
        refs = [BlockRef(1, 1, 1), BlockRef(1, 1, 2)]
        assert client.put_blocks_deferred(refs, [mostly_zero, all_zero], defer_flush=False, trim=True)[0] == 2
        assert store.get_block(refs[0]) == mostly_zero
        assert store.get_block(refs[1]) == all_zero
        # the same content again (trimmed again) is the usual no-op, not a conflict
        assert client.put_blocks_deferred(refs[:1], [mostly_zero], trim=True)[0] == 1
    finally:
        client.close()
        server.stop(grace=0)
        store.close()


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.tuples(refs_st, block_st), max_size=6),
    repair=st.booleans(),
    defer=st.booleans(),
    trim=st.booleans(),
)
def test_decoding_gives_back_what_was_encoded(
    items: list[tuple[BlockRef, bytes]], repair: bool, defer: bool, trim: bool
) -> None:
    refs = [r for r, _ in items]
    blocks = [b for _, b in items]
    msg = decode_put_blocks(encode_put_blocks(refs, blocks, repair=repair, defer_flush=defer, trim=trim))
    assert not msg.error
    assert [BlockRef.from_bytes(r) for r in msg.refs] == refs
    assert [bytes(b) for b in msg.blocks] == [b.rstrip(b"\x00") if trim else b for b in blocks]
    assert (msg.repair, msg.defer_flush) == (repair, defer)


def test_decoding_skips_fields_it_does_not_know() -> None:
    known = encode_put_blocks([BlockRef(1, 2, 3)], [b"abc"], defer_flush=True)
    # field 9 varint, field 10 fixed64, field 11 bytes, field 12 fixed32
    unknown = b"\x48\x96\x01" + b"\x51" + bytes(8) + b"\x5a\x02hi" + b"\x65" + bytes(4)
    msg = decode_put_blocks(unknown + known)
    assert not msg.error
    assert [bytes(b) for b in msg.blocks] == [b"abc"] and msg.defer_flush


@given(st.binary(max_size=64))
def test_decoding_garbage_never_raises(raw: bytes) -> None:
    msg = decode_put_blocks(raw)
    assert isinstance(msg.error, str)


@pytest.mark.parametrize(
    "raw",
    [b"\x12\x05ab", b"\x0a", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0b", b"\x51\x00"],
    ids=["short-bytes", "no-length", "long-varint", "group-wire-type", "short-fixed64"],
)
def test_malformed_requests_are_reported(raw: bytes) -> None:
    assert decode_put_blocks(raw).error.startswith("malformed PutBlocksRequest")


def test_a_malformed_put_blocks_request_is_refused_with_invalid_argument() -> None:
    store = FaultyStore(mem_store_factory()(4096, 8))
    server = PeerServer(store, uuid="p").start()
    client = PeerClient(server.address, timeouts=RPCTimeouts(get=2.0, put=2.0, check=2.0, ping=1.0))
    try:
        with pytest.raises(InvalidArgument):
            client._call("PutBlocks", client._put_raw, b"\x12\x05ab", 2.0)
        assert store.used_blocks() == 0
    finally:
        client.close()
        server.stop(grace=0)
        store.close()
