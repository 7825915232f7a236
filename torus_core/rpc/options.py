"""Deadlines, message-size limits and keepalive settings shared by the RPC server and client."""

from __future__ import annotations

from dataclasses import dataclass

from torus_core.errors import InvalidArgument

#: Wire protocol version reported by Ping (the Go original's current version was 1).
PROTOCOL_VERSION = 2

#: Default maximum message size both ways: room for a batch of 512 KiB blocks.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RPCTimeouts:
    """Per-call deadlines in seconds. Every client call carries one.

    :param get: GetBlock.
    :param put: PutBlocks (includes the remote flush).
    :param stream: a whole PutBlockStream call.
    :param check: RebalanceCheck.
    :param ping: Ping.
    :param journal: each journal RPC (JournalAppend includes the peer's fdatasync; a whole
        streamed JournalRead).
    """

    get: float = 2.0
    put: float = 5.0
    stream: float = 60.0
    check: float = 5.0
    ping: float = 1.0
    journal: float = 5.0

    def __post_init__(self) -> None:
        for name in ("get", "put", "stream", "check", "ping", "journal"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise InvalidArgument(f"RPC timeout {name!r} must be a positive number, got {value!r}")


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """gRPC client channel options: message limits, keepalive, fast reconnect backoff."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """gRPC server options: message limits and a keepalive policy matching :func:`channel_options`."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]
