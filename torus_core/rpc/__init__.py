"""Peer-to-peer block RPC on gRPC (service ``torus.rpc.v1.TorusStorage``).

* :class:`PeerServer` serves a local block store (binds 127.0.0.1 by default).
* :class:`PeerClientPool` hands out one reusable :class:`PeerClient` per peer address.
* :class:`TLSConfig` enables mutual TLS on either side; plaintext is allowed only on loopback
  unless ``allow_insecure=True``.

The generated modules ``torus_storage_pb2*.py`` are checked in; regenerate them with
``python -m torus_core.rpc.codegen``.
"""

from __future__ import annotations

from torus_core.rpc.client import PeerClient, PeerClientPool, PeerInfoReply
from torus_core.rpc.options import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, RPCTimeouts
from torus_core.rpc.server import PeerServer, ServerStats, StorageServicer, write_replacing_corrupt
from torus_core.rpc.tls import TLSConfig, check_insecure_allowed, is_loopback

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "PeerClient",
    "PeerClientPool",
    "PeerInfoReply",
    "PeerServer",
    "RPCTimeouts",
    "ServerStats",
    "StorageServicer",
    "TLSConfig",
    "check_insecure_allowed",
    "is_loopback",
    "write_replacing_corrupt",
]
