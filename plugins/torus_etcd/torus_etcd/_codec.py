"""Byte encoding of one stored event (the value of an etcd event key).

Layout (big endian)::

    u64 position | f64 timestamp | u64 version | u16 len(stream) | u16 len(topic)
    | 16 B batch id | stream (UTF-8) | topic (UTF-8) | state

The batch id identifies the append that wrote the event; it lets a retried append whose first
attempt timed out find out that the first attempt did commit (see ``EtcdEventLog.append``).
"""

from __future__ import annotations

import struct

from torus_core.errors import InvalidArgument, MetadataError
from torus_core.eventlog import NewEvent, StoredEvent

_HEAD = struct.Struct(">QdQHH16s")


def encode_event(event: NewEvent, position: int, timestamp: float, batch_id: bytes) -> bytes:
    """Encode ``event`` stored at ``position`` by batch ``batch_id``."""
    stream = event.stream_id.encode()
    topic = event.topic.encode()
    if len(stream) > 0xFFFF or len(topic) > 0xFFFF:
        raise InvalidArgument("stream id and topic must be shorter than 64 KiB")
    return _HEAD.pack(position, timestamp, event.version, len(stream), len(topic), batch_id) + (
        stream + topic + bytes(event.state)
    )


def decode_event(data: bytes) -> tuple[StoredEvent, bytes]:
    """Decode a stored event; return it and its batch id."""
    try:
        pos, ts, version, ls, lt, batch = _HEAD.unpack_from(data)
        off = _HEAD.size
        stream = data[off : off + ls].decode()
        topic = data[off + ls : off + ls + lt].decode()
        state = bytes(data[off + ls + lt :])
    except (struct.error, UnicodeDecodeError) as exc:
        raise MetadataError(f"corrupt event record in etcd: {exc}") from exc
    return StoredEvent(stream, version, topic, state, pos, ts), batch
