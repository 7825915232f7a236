"""Hand-encoded ``PutBlocksRequest`` messages: the protobuf wire format without a message object.

Building a :class:`~torus_core.rpc.torus_storage_pb2.PutBlocksRequest` copies every block into
the message and serialising copies it again; :func:`encode_put_blocks` writes the same bytes
(fields in number order, as protobuf does) with a single join. Peers parse it with the
generated class, so the two are interchangeable on the wire.

With ``trim``, blocks are sent without their trailing zero bytes (a store zero-pads shorter
data to the block size, part of the :class:`~torus_core.blockstore.BlockStore` contract every
peer honours): an INode block or a sparse data block of 512 KiB often travels as a few KiB.
Only callers that checked the block length themselves trim (an oversized block of zeros must
still reach the peer whole, to be refused).
"""

from __future__ import annotations

from collections.abc import Sequence

from torus_core.refs import BlockRef

BlockData = bytes | bytearray | memoryview

# field number << 3 | wire type (2 = length-delimited, 0 = varint)
_TAG_REFS = b"\x0a"
_TAG_BLOCKS = b"\x12"
_REPAIR_TRUE = b"\x18\x01"
_DEFER_TRUE = b"\x20\x01"
_REF_HEADER = _TAG_REFS + bytes([BlockRef.SIZE])


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def trim_zeros(data: BlockData) -> BlockData:
    """``data`` without its trailing zero bytes (the same object when it does not end in zero)."""
    if not len(data) or data[-1] != 0:
        return data
    raw = data if isinstance(data, bytes) else bytes(data)
    return raw.rstrip(b"\x00")


def encode_put_blocks(
    refs: Sequence[BlockRef],
    blocks: Sequence[BlockData],
    *,
    repair: bool = False,
    defer_flush: bool = False,
    trim: bool = False,
) -> bytes:
    """The serialized ``PutBlocksRequest`` for ``refs``/``blocks`` (with ``trim``: trailing
    zeros of each block left out)."""
    parts: list[BlockData] = []
    for ref in refs:
        parts.append(_REF_HEADER)
        parts.append(ref.to_bytes())
    for block in blocks:
        body = trim_zeros(block) if trim else block
        parts.append(_TAG_BLOCKS + varint(len(body)))
        parts.append(body)
    if repair:
        parts.append(_REPAIR_TRUE)
    if defer_flush:
        parts.append(_DEFER_TRUE)
    return b"".join(parts)
