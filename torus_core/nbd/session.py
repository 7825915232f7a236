"""Configuration shared by the handshake and transmission phases, and what negotiation yields."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from torus_core.nbd.constants import TransmissionFlag
from torus_core.nbd.export import Export, ExportInfo

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    """Tunables of an :class:`~torus_core.nbd.server.NBDServer`."""

    tls: ssl.SSLContext | None = None
    #: FORCEDTLS mode: every option but STARTTLS/ABORT is refused with NBD_REP_ERR_TLS_REQD.
    tls_required: bool = False
    #: Seconds a client has to complete the handshake (time the server spends opening the
    #: export, e.g. waiting for a previous connection's close, is not counted).
    handshake_timeout: float = 10.0
    #: Seconds an established session may go with no request in flight and no bytes moving
    #: either way before it may be closed to make room for a new connection that a limit would
    #: otherwise refuse (0: never). An idle session is not closed while no one needs its slot.
    idle_timeout: float = 60.0
    #: Connections admitted at once; more are refused with a reason (NBD_REP_ERR_POLICY).
    max_connections: int = 64
    #: Connections admitted at once from one client address (0: no per-address limit).
    max_connections_per_address: int = 16
    #: Largest READ/WRITE payload accepted (advertised as the maximum block size).
    max_payload: int = 32 * MiB
    #: Largest option payload read during the handshake; bigger ones get NBD_REP_ERR_TOO_BIG.
    max_option_length: int = 64 * 1024
    #: Per-connection bound on requests being processed at once.
    max_inflight: int = 128
    #: Per-connection bound on payload bytes of requests being processed at once plus reply
    #: bytes waiting to be sent.
    max_inflight_bytes: int = 64 * MiB
    #: Server-wide bound on the same, over all connections (see :mod:`torus_core.nbd.budget`).
    max_total_inflight_bytes: int = 256 * MiB
    #: Worker threads for data calls of blocking exports (None: ``min(32, cpus + 4)``).
    workers: int | None = None


@dataclass
class Session:
    """The outcome of a successful negotiation: an opened export and the agreed features."""

    export: Export
    flags: int
    structured: bool
    #: Metadata context id of ``base:allocation`` if the client selected it, else None.
    allocation_context: int | None
    max_block_size: int


def transmission_flags(info: ExportInfo, structured: bool) -> int:
    """Transmission flags advertised for an export."""
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
    if info.read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
    if structured:
        flags |= TransmissionFlag.SEND_DF
    if info.multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


def block_sizes(info: ExportInfo, max_payload: int) -> tuple[int, int, int]:
    """(minimum, preferred, maximum) block sizes advertised for an export."""
    maximum = max(1, min(info.max_block_size, max_payload))
    minimum = max(1, min(info.min_block_size, maximum))
    preferred = max(minimum, min(info.preferred_block_size, maximum))
    return minimum, preferred, maximum
