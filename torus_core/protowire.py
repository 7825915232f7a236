"""A minimal protobuf (proto3) wire-format encoder/decoder.

Only what torus's stored messages need: varints (wire type 0) and length-delimited fields
(wire type 2). Unknown fields of other wire types (fixed32/fixed64) are skipped when decoding,
so messages written by newer versions still parse. Used for the ``models.Ring`` and
``models.INode`` encodings, which stay byte-compatible with the Go original's gogoproto output.
"""

from __future__ import annotations

from collections.abc import Iterator

from torus_core.errors import InvalidArgument

__all__ = [
    "FIXED32",
    "FIXED64",
    "LENGTH_DELIMITED",
    "VARINT",
    "bytes_field",
    "decode_map_entry",
    "decode_varint",
    "encode_varint",
    "expect_bytes",
    "expect_int",
    "iter_fields",
    "key",
    "map_entry",
    "string_field",
    "uint_field",
]

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5

_U64 = (1 << 64) - 1


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer (< 2**64) as a protobuf varint."""
    if value < 0 or value > _U64:
        raise InvalidArgument(f"varint out of range: {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; returns ``(value, next_pos)``. Raises InvalidArgument if truncated."""
    result = 0
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise InvalidArgument("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise InvalidArgument("varint too long")
    return result & _U64, pos


def key(field: int, wire_type: int) -> bytes:
    """The tag bytes of a field."""
    return encode_varint((field << 3) | wire_type)


def uint_field(field: int, value: int) -> bytes:
    """A varint field; proto3 omits zero values."""
    if not value:
        return b""
    return key(field, VARINT) + encode_varint(value)


def bytes_field(field: int, value: bytes, *, keep_empty: bool = False) -> bytes:
    """A length-delimited field; proto3 omits empty values unless ``keep_empty``."""
    if not value and not keep_empty:
        return b""
    return key(field, LENGTH_DELIMITED) + encode_varint(len(value)) + value


def string_field(field: int, value: str) -> bytes:
    """A UTF-8 string field (omitted when empty)."""
    return bytes_field(field, value.encode("utf-8"))


def iter_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field_number, wire_type, value)``; varints as int, length-delimited as bytes.

    Fixed-width fields are yielded as ints too. Raises InvalidArgument on malformed input.
    """
    mv = memoryview(data)
    pos = 0
    end = len(mv)
    while pos < end:
        tag, pos = decode_varint(mv, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise InvalidArgument("protobuf field number 0")
        if wire_type == VARINT:
            value, pos = decode_varint(mv, pos)
            yield field, wire_type, value
        elif wire_type == LENGTH_DELIMITED:
            length, pos = decode_varint(mv, pos)
            if pos + length > end:
                raise InvalidArgument("truncated length-delimited field")
            yield field, wire_type, bytes(mv[pos : pos + length])
            pos += length
        elif wire_type in (FIXED32, FIXED64):
            width = 4 if wire_type == FIXED32 else 8
            if pos + width > end:
                raise InvalidArgument("truncated fixed-width field")
            yield field, wire_type, int.from_bytes(mv[pos : pos + width], "little")
            pos += width
        else:
            raise InvalidArgument(f"unsupported protobuf wire type {wire_type}")


def expect_int(value: int | bytes, what: str) -> int:
    """Check a decoded field is a varint."""
    if not isinstance(value, int):
        raise InvalidArgument(f"{what}: expected a varint")
    return value


def expect_bytes(value: int | bytes, what: str) -> bytes:
    """Check a decoded field is length-delimited."""
    if not isinstance(value, bytes):
        raise InvalidArgument(f"{what}: expected length-delimited bytes")
    return value


def decode_map_entry(data: bytes) -> tuple[bytes, bytes]:
    """Decode a ``map<string, string|bytes>`` entry (key = field 1, value = field 2)."""
    k, v = b"", b""
    for field, _wt, value in iter_fields(data):
        if field == 1:
            k = expect_bytes(value, "map key")
        elif field == 2:
            v = expect_bytes(value, "map value")
    return k, v


def map_entry(field: int, k: bytes, v: bytes) -> bytes:
    """Encode one map entry as a length-delimited submessage (gogoproto writes both parts)."""
    inner = bytes_field(1, k, keep_empty=True) + bytes_field(2, v, keep_empty=True)
    return bytes_field(field, inner, keep_empty=True)
