"""Byte encoding of one stored event in Redis lists.

A list entry is ``b"<position>|" + body``; the position prefix is written by the append Lua
script (positions are assigned on the server). The body is (big endian)::

    f64 timestamp | u64 version | u16 len(stream) | u16 len(topic) | 16 B batch id
    | stream (UTF-8) | topic (UTF-8) | state

The batch id identifies the append that wrote the event, so a retried append whose first
attempt's outcome is unknown can recognise its own events (see ``RedisEventLog.append``).
"""

from __future__ import annotations

import struct

from torus_core.errors import InvalidArgument, MetadataError
from torus_core.eventlog import NewEvent, StoredEvent

_HEAD = struct.Struct(">dQHH16s")


def encode_body(event: NewEvent, timestamp: float, batch_id: bytes) -> bytes:
    """Encode ``event`` (without its position) for the append script."""
    stream = event.stream_id.encode()
    topic = event.topic.encode()
    if len(stream) > 0xFFFF or len(topic) > 0xFFFF:
        raise InvalidArgument("stream id and topic must be shorter than 64 KiB")
    return (
        _HEAD.pack(timestamp, event.version, len(stream), len(topic), batch_id)
        + stream
        + topic
        + bytes(event.state)
    )


def decode_entry(entry: bytes) -> tuple[StoredEvent, bytes]:
    """Decode a list entry ``<position>|body``; return the event and its batch id."""
    try:
        sep = entry.index(b"|")
        pos = int(entry[:sep])
        ts, version, ls, lt, batch = _HEAD.unpack_from(entry, sep + 1)
        off = sep + 1 + _HEAD.size
        stream = entry[off : off + ls].decode()
        topic = entry[off + ls : off + ls + lt].decode()
        state = bytes(entry[off + ls + lt :])
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise MetadataError(f"corrupt event record in redis: {exc}") from exc
    return StoredEvent(stream, version, topic, state, pos, ts), batch
