"""On-disk layout of the file block store: header, index records and block checksums.

Two files live in the store directory:

``data.blk``
    ``capacity x block_size`` bytes, created sparse. Slot ``i`` holds one block at offset
    ``i * block_size``.

``index.blk``
    A 4 KiB header followed by one 64-byte record per slot (slot ``i`` at
    ``HEADER_SIZE + i * RECORD_SIZE``). An all-zero record means the slot is free.

Header (little-endian)::

    offset 0    static part, 32 bytes:  magic "TORUSBS1" | u32 version | u32 checksum algo
                                        | u64 block_size | u32 reserved | u32 crc32(bytes 0..28)
    offset 512  durable part, 16 bytes: u64 durable_seq | u32 reserved | u32 crc32(bytes 0..12)
    offset 2048 a second copy of the static part (used if the first fails its CRC)

The parts sit in different 512-byte sectors, so updating ``durable_seq`` can never tear the
static part, and one damaged static copy does not make the store unopenable.

Record (64 bytes)::

    24 B BlockRef | u64 seq | u64 block checksum | 20 B reserved (zero) | u32 crc32(bytes 0..60)

``seq`` is a store-wide counter, strictly increasing per record written. ``durable_seq`` is the
highest ``seq`` whose record *and* data were fsynced by a completed ``flush``; records above it
are verified against their data at open (see :mod:`torus_blockstore_file.store`).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from torus_core.crc32 import crc32
from torus_core.errors import InvalidArgument
from torus_core.refs import BlockRef

MAGIC = b"TORUSBS1"
VERSION = 1
#: Checksum algorithm ids stored in the header. Only CRC-32 (IEEE, zlib's) is implemented: zlib
#: runs at ~1.7-2.3 GB/s here, ISA-L's (torus_core.crc32) at ~15 GB/s, blake2b-8 at ~0.4 GB/s
#: (measured on 512 KiB blocks).
CHECKSUM_CRC32 = 1

HEADER_SIZE = 4096
DURABLE_OFFSET = 512
STATIC_COPY_OFFSET = 2048
RECORD_SIZE = 64

_STATIC = struct.Struct("<8sIIQI")  # 28 bytes, followed by a u32 crc
_DURABLE = struct.Struct("<QI")  # 12 bytes, followed by a u32 crc
_RECORD = struct.Struct("<24sQQ20s")  # 60 bytes, followed by a u32 crc
_CRC = struct.Struct("<I")

ZERO_RECORD = bytes(RECORD_SIZE)


def block_checksum(data: bytes | bytearray | memoryview) -> int:
    """Checksum of one full (padded) block: CRC-32 (IEEE), via :mod:`torus_core.crc32`."""
    return crc32(data)


def _seal(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def _unseal(raw: bytes | memoryview, body_len: int) -> bytes | None:
    body = bytes(raw[:body_len])
    (crc,) = _CRC.unpack(raw[body_len : body_len + 4])
    return body if zlib.crc32(body) == crc else None


def pack_static_header(block_size: int) -> bytes:
    """Encode the static header part for a new store."""
    return _seal(_STATIC.pack(MAGIC, VERSION, CHECKSUM_CRC32, block_size, 0))


def unpack_static_header(raw: bytes) -> int:
    """Decode the static header part and return the block size.

    :raises InvalidArgument: the file is not a torus block-store index, or uses an unknown
        version / checksum algorithm.
    """
    if len(raw) < _STATIC.size + 4 or raw[:8] != MAGIC:
        raise InvalidArgument("not a torus file block store index (bad magic)")
    body = _unseal(raw, _STATIC.size)
    if body is None:
        raise InvalidArgument("torus file block store header is corrupt (checksum mismatch)")
    _magic, version, algo, block_size, _ = _STATIC.unpack(body)
    if version != VERSION:
        raise InvalidArgument(f"unsupported file block store version {version}")
    if algo != CHECKSUM_CRC32:
        raise InvalidArgument(f"unsupported checksum algorithm id {algo}")
    return int(block_size)


def pack_durable(durable_seq: int) -> bytes:
    """Encode the durable-sequence header part."""
    return _seal(_DURABLE.pack(durable_seq, 0))


def unpack_durable(raw: bytes) -> int:
    """Decode the durable sequence; a torn or zero part yields 0 (verify everything)."""
    body = _unseal(raw, _DURABLE.size) if len(raw) >= _DURABLE.size + 4 else None
    if body is None:
        return 0
    return int(_DURABLE.unpack(body)[0])


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded index record."""

    ref: BlockRef
    seq: int
    checksum: int

    def pack(self) -> bytes:
        """Encode as 64 bytes (with its own CRC)."""
        return _seal(_RECORD.pack(self.ref.to_bytes(), self.seq, self.checksum, bytes(20)))


def unpack_record(raw: bytes | memoryview) -> Record | None:
    """Decode a non-zero record; ``None`` if it is torn/corrupt (bad CRC or undecodable ref)."""
    body = _unseal(raw, _RECORD.size)
    if body is None:
        return None
    ref_bytes, seq, checksum, _ = _RECORD.unpack(body)
    try:
        ref = BlockRef.from_bytes(ref_bytes)
    except InvalidArgument:
        return None
    return Record(ref, int(seq), int(checksum))


def record_offset(slot: int) -> int:
    """Byte offset of ``slot``'s record in the index file."""
    return HEADER_SIZE + slot * RECORD_SIZE
