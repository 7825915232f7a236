"""Byte layouts of NBD messages (all big-endian) and builders for server messages."""

from __future__ import annotations

import struct

from torus_core.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    ReplyType,
)

#: Server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags.
GREETING = struct.Struct(">QQH")
#: Client flags after the greeting.
CLIENT_FLAGS = struct.Struct(">I")
#: Option request header: IHAVEOPT, u32 option, u32 length.
OPTION_HEADER = struct.Struct(">QII")
#: Option reply header: magic, u32 option, u32 reply type, u32 length.
OPTION_REPLY = struct.Struct(">QIII")
#: Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 transmission flags.
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: Transmission request: magic, u16 flags, u16 type, u64 handle (cookie), u64 offset, u32 length.
REQUEST = struct.Struct(">IHHQQI")
#: Simple reply: magic, u32 error, u64 handle.
SIMPLE_REPLY = struct.Struct(">IIQ")
#: Structured reply chunk header: magic, u16 flags, u16 type, u64 handle, u32 length.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: Structured OFFSET_DATA chunk header with its u64 offset appended.
STRUCTURED_DATA = struct.Struct(">IHHQIQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

ZERO_PAD = bytes(124)


def greeting(flags: int) -> bytes:
    """The server's first message."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """One option reply message."""
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    """NBD_INFO_EXPORT payload."""
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def info_name(name: str) -> bytes:
    """NBD_INFO_NAME payload."""
    return U16.pack(Info.NAME) + name.encode()


def info_description(text: str) -> bytes:
    """NBD_INFO_DESCRIPTION payload."""
    return U16.pack(Info.DESCRIPTION) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_INFO_BLOCK_SIZE payload."""
    return struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


def simple_reply(error: int, handle: int) -> bytes:
    """A simple reply header (read data follows separately)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_none(handle: int) -> bytes:
    """A final NONE chunk (success without data)."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, handle, 0)


def chunk_data_header(handle: int, offset: int, length: int) -> bytes:
    """Header of a final OFFSET_DATA chunk carrying ``length`` bytes read at ``offset``."""
    return STRUCTURED_DATA.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, handle, length + 8, offset
    )


def chunk_error(handle: int, error: int, message: str = "") -> bytes:
    """A final ERROR chunk."""
    msg = message.encode()[:4096]
    payload = struct.pack(">IH", error, len(msg)) + msg
    return (
        STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, handle, len(payload))
        + payload
    )


def chunk_block_status(handle: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """A final BLOCK_STATUS chunk for one metadata context."""
    body = bytearray(U32.pack(context_id))
    for length, flags in extents:
        body += struct.pack(">II", length, flags)
    return (
        STRUCTURED_REPLY.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, handle, len(body)
        )
        + body
    )
