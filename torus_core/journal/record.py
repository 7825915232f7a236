"""Journal record format, version 1 (all integers little-endian).

A record is what one group-committed FLUSH made durable for one volume: the byte ranges written
since the previous record, with their contents.

Header (44 bytes)::

    magic      4s   b"TJR1"
    version    u8   1
    flags      u8   0 (reserved)
    reserved   u16  0
    volume_id  u64
    epoch      u64  the writer's volume-lock epoch (peers refuse older epochs)
    seq        u64  1, 2, 3 ... per volume, across writers (a new writer continues the numbering)
    n_extents  u32
    body_len   u32  bytes of the body that follows
    crc        u32  CRC-32 of the header's first 40 bytes followed by the body

Body: ``n_extents`` extent headers ``(offset u64, length u32, kind u8, pad 3)`` then the data of
every DATA and REF extent, concatenated in order. Extent kinds:

* DATA (0): ``length`` bytes of data follow.
* ZERO (1): no data; the range reads as zeros (a TRIM or WRITE_ZEROES).
* REF (2): 24 bytes follow, a BlockRef; the range (one whole block, ``length`` = the block's
  bytes within the volume) holds that stored block's contents. A flush writes blocks it
  mostly rewrote as new blocks (made durable before the record) instead of copying them into
  the journal.

Decoding a stream of records stops at the first record that is short, has a wrong magic or
version, or fails its CRC: that is a torn or lost tail, and everything before it is whole.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from torus_core.crc32 import crc32
from torus_core.errors import InvalidArgument

MAGIC = b"TJR1"
VERSION = 1
KIND_DATA = 0
KIND_ZERO = 1
KIND_REF = 2
REF_SIZE = 24

_HEADER = struct.Struct("<4sBBHQQQII")  # without the CRC
_CRC = struct.Struct("<I")
_EXTENT = struct.Struct("<QIB3x")
HEADER_SIZE = _HEADER.size + _CRC.size
#: ``_HEADER`` unpacked: magic, version, flags, reserved, volume_id, epoch, seq, n_extents, body_len.
_HeaderFields = tuple[bytes, int, int, int, int, int, int, int, int]
#: Upper bound of one record's body (a FLUSH after writing this much makes several records).
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Extent:
    """``length`` bytes at ``offset``: ``data`` for a DATA extent, ``None`` for zeros, or the
    24 bytes of a BlockRef (``kind == KIND_REF``) whose stored block holds them."""

    offset: int
    length: int
    data: bytes | None = None
    kind: int = KIND_DATA

    @property
    def is_zero(self) -> bool:
        """True for a ZERO extent (no data; the range reads as zeros)."""
        return self.data is None

    @property
    def is_ref(self) -> bool:
        """True for a REF extent (``data`` is a BlockRef's bytes)."""
        return self.kind == KIND_REF


@dataclass(frozen=True)
class JournalRecord:
    """One decoded record."""

    volume_id: int
    epoch: int
    seq: int
    extents: tuple[Extent, ...]

    @property
    def data_bytes(self) -> int:
        """Bytes of data the record carries."""
        return sum(e.length for e in self.extents if e.kind == KIND_DATA and e.data is not None)


def encode_record(volume_id: int, epoch: int, seq: int, extents: Sequence[Extent]) -> bytes:
    """The wire/disk bytes of one record."""
    for name, v in (("volume_id", volume_id), ("epoch", epoch), ("seq", seq)):
        if not isinstance(v, int) or not 0 <= v < 1 << 64:
            raise InvalidArgument(f"journal record {name} must be a u64, got {v!r}")
    heads = []
    datas: list[bytes] = []
    for e in extents:
        if e.kind == KIND_REF:
            if e.data is None or len(e.data) != REF_SIZE:
                raise InvalidArgument(f"REF extent at {e.offset} needs {REF_SIZE} bytes of BlockRef")
        elif e.data is not None and len(e.data) != e.length:
            raise InvalidArgument(f"extent at {e.offset}: {len(e.data)} bytes for length {e.length}")
        if not 0 <= e.offset < 1 << 64 or not 0 < e.length < 1 << 32:
            raise InvalidArgument(f"bad extent ({e.offset}, {e.length})")
        kind = e.kind if e.kind == KIND_REF else KIND_ZERO if e.data is None else KIND_DATA
        heads.append(_EXTENT.pack(e.offset, e.length, kind))
        if e.data is not None:
            datas.append(e.data)
    body = b"".join(heads) + b"".join(datas)
    if len(body) > MAX_BODY:
        raise InvalidArgument(f"journal record body of {len(body)} bytes exceeds {MAX_BODY}")
    head = _HEADER.pack(MAGIC, VERSION, 0, 0, volume_id, epoch, seq, len(extents), len(body))
    return head + _CRC.pack(crc32(body, crc32(head))) + body


def _unpack_header(buf: bytes | bytearray | memoryview, pos: int) -> _HeaderFields:
    """The header fields of the record at ``buf[pos:]`` (not validated)."""
    return cast(_HeaderFields, _HEADER.unpack_from(buf, pos))


def _unpack_extent(buf: memoryview, pos: int) -> tuple[int, int, int]:
    """``(offset, length, kind)`` of the extent header at ``buf[pos:]``."""
    return cast(tuple[int, int, int], _EXTENT.unpack_from(buf, pos))


def record_id(buf: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """``(volume_id, epoch, seq)`` from the header of an encoded record (not validated)."""
    _m, _v, _f, _r, vol, epoch, seq, _n, _len = _unpack_header(buf, 0)
    return vol, epoch, seq


def record_seq(buf: bytes | bytearray | memoryview) -> int:
    """The sequence number in an encoded record's header."""
    return record_id(buf)[2]


def record_length(buf: bytes | bytearray | memoryview, pos: int = 0) -> int | None:
    """Total length of the whole, valid record at ``buf[pos:]``, or None if there is none."""
    if len(buf) - pos < HEADER_SIZE:
        return None
    magic, version, _flags, _res, _vol, _epoch, _seq, _n, body_len = _unpack_header(buf, pos)
    if magic != MAGIC or version != VERSION or body_len > MAX_BODY:
        return None
    end = pos + HEADER_SIZE + body_len
    if end > len(buf):
        return None
    (want,) = _CRC.unpack_from(buf, pos + _HEADER.size)
    mv = memoryview(buf)
    if crc32(mv[pos + HEADER_SIZE : end], crc32(mv[pos : pos + _HEADER.size])) != want:
        return None
    return HEADER_SIZE + body_len


def decode_record(buf: bytes | bytearray | memoryview) -> JournalRecord:
    """Decode exactly one whole record; InvalidArgument if it is not one."""
    n = record_length(buf)
    if n is None or n != len(buf):
        raise InvalidArgument("not one whole, valid journal record")
    return _decode_valid(memoryview(buf), 0)


def _decode_valid(mv: memoryview, pos: int) -> JournalRecord:
    _m, _v, _f, _r, vol, epoch, seq, n_ext, body_len = _unpack_header(mv, pos)
    body = pos + HEADER_SIZE
    if n_ext * _EXTENT.size > body_len:
        raise InvalidArgument("journal record: extent table exceeds the body")
    data_pos = body + n_ext * _EXTENT.size
    extents = []
    for k in range(n_ext):
        off, length, kind = _unpack_extent(mv, body + k * _EXTENT.size)
        if kind == KIND_ZERO:
            extents.append(Extent(off, length))
        elif kind in (KIND_DATA, KIND_REF):
            n = length if kind == KIND_DATA else REF_SIZE
            if data_pos + n > body + body_len:
                raise InvalidArgument("journal record: extent data exceeds the body")
            extents.append(Extent(off, length, bytes(mv[data_pos : data_pos + n]), kind))
            data_pos += n
        else:
            raise InvalidArgument(f"journal record: unknown extent kind {kind}")
    return JournalRecord(vol, epoch, seq, tuple(extents))


def decode_records(buf: bytes | bytearray | memoryview) -> tuple[list[JournalRecord], int]:
    """Decode consecutive records from the start of ``buf``; stops at the first record that is
    not whole and valid. Returns the records and the number of bytes they span."""
    mv = memoryview(buf)
    out: list[JournalRecord] = []
    pos = 0
    while True:
        n = record_length(mv, pos)
        if n is None:
            return out, pos
        try:
            out.append(_decode_valid(mv, pos))
        except InvalidArgument:
            return out, pos
        pos += n
