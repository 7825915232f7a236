"""Hand-encoded ``PutBlocksRequest`` messages: the protobuf wire format without a message object.

Building a :class:`~torus_core.rpc.torus_storage_pb2.PutBlocksRequest` copies every block into
the message and serialising copies it again; :func:`encode_put_blocks` writes the same bytes
(fields in number order, as protobuf does) with a single join. Peers parse it with the
generated class, so the two are interchangeable on the wire. :func:`decode_put_blocks` is the
server's side: the blocks come out as memoryviews into the received bytes, which the file store
writes with one ``pwrite`` (the generated class would copy each block twice).

With ``trim``, blocks are sent without their trailing zero bytes (a store zero-pads shorter
data to the block size, part of the :class:`~torus_core.blockstore.BlockStore` contract every
peer honours): an INode block or a sparse data block of 512 KiB often travels as a few KiB.
Only callers that checked the block length themselves trim (an oversized block of zeros must
still reach the peer whole, to be refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


@dataclass
class PutBlocksMessage:
    """A ``PutBlocksRequest`` decoded by :func:`decode_put_blocks`: blocks are memoryviews into
    the received bytes (no copy). ``error`` is set (and the rest incomplete) if it was malformed."""

    refs: list[bytes] = field(default_factory=list)
    blocks: list[memoryview] = field(default_factory=list)
    repair: bool = False
    defer_flush: bool = False
    error: str = ""


def _varint_at(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if pos >= len(raw):
            raise ValueError("truncated varint")
        b = raw[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def decode_put_blocks(raw: bytes) -> PutBlocksMessage:
    """Parse a serialized ``PutBlocksRequest`` without copying its blocks (unknown fields are
    skipped, as protobuf does); never raises -- see :attr:`PutBlocksMessage.error`."""
    msg = PutBlocksMessage()
    view = memoryview(raw)
    pos, end = 0, len(raw)
    try:
        while pos < end:
            key, pos = _varint_at(raw, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 2:
                length, pos = _varint_at(raw, pos)
                stop = pos + length
                if stop > end:
                    raise ValueError(f"field {number} runs past the end of the message")
                if number == 1:
                    msg.refs.append(raw[pos:stop])
                elif number == 2:
                    msg.blocks.append(view[pos:stop])
                pos = stop
            elif wire_type == 0:
                value, pos = _varint_at(raw, pos)
                if number == 3:
                    msg.repair = bool(value)
                elif number == 4:
                    msg.defer_flush = bool(value)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            else:
                raise ValueError(f"unsupported wire type {wire_type}")
            if pos > end:
                raise ValueError("truncated field")
    except ValueError as exc:
        msg.error = f"malformed PutBlocksRequest: {exc}"
    return msg


# JournalAppendRequest: volume_id = 1 (varint), epoch = 2 (varint), records = 3 (bytes, repeated)
_TAG_J_VOLUME = b"\x08"
_TAG_J_EPOCH = b"\x10"
_TAG_J_RECORD = b"\x1a"


def encode_journal_append(volume_id: int, epoch: int, records: Sequence[BlockData]) -> bytes:
    """The serialized ``JournalAppendRequest`` (one join; zero fields left out, as protobuf does)."""
    parts: list[BlockData] = []
    if volume_id:
        parts.append(_TAG_J_VOLUME + varint(volume_id))
    if epoch:
        parts.append(_TAG_J_EPOCH + varint(epoch))
    for rec in records:
        parts.append(_TAG_J_RECORD + varint(len(rec)))
        parts.append(rec)
    return b"".join(parts)
