"""Wiring a :class:`ClusterNode` into the ``torusd`` server (``--peer-address``).

:func:`start_cluster_server` takes the single-node :class:`~torus_core.daemon.server.Server` that
``Server.from_config`` built (metadata + local store) and returns a server whose volumes and NBD
exports use the node's :class:`~torus_core.distributor.Distributor` as their block store, so
every block a client writes goes to its ring owners. The node's background threads are stopped
first at shutdown (before the NBD listener and the volumes), and closing the server's store
closes the distributor and, through it, the local store.

Volume journals (issue 8): when ``server`` journals FLUSHes (a persistent store; its journal
files are ``<data-dir>/journal``), this peer serves those files to the other peers' journal
writers, and the cluster server's volumes append their journals to R ring peers
(:class:`~torus_core.journal.remote.RemoteJournalReplicas`) instead of the local files alone.
"""

from __future__ import annotations

import contextlib

from torus_core.block.malloc import limit_arenas
from torus_core.block.volume import DEFAULT_LEASE_TTL
from torus_core.cluster.node import ClusterNode, ClusterOptions, load_or_create_uuid
from torus_core.config import Config
from torus_core.daemon.collectors import ClusterCollector
from torus_core.daemon.server import Server
from torus_core.errors import ConfigError, TorusError
from torus_core.rpc.tls import TLSConfig


def peer_tls(config: Config) -> TLSConfig | None:
    """Mutual TLS for peer RPC from the config's certificate paths, or None (loopback only)."""
    tls = config.tls
    if not tls.enabled:
        return None
    if not (tls.cert_file and tls.key_file and tls.ca_file):
        raise ConfigError("peer TLS needs a certificate, a key and a CA file")
    return TLSConfig(cert_file=tls.cert_file, key_file=tls.key_file, ca_file=tls.ca_file)


def start_cluster_server(
    server: Server,
    config: Config,
    *,
    listen: str,
    advertise: str | None = None,
    auto_join: bool = False,
    options: ClusterOptions | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
) -> tuple[Server, ClusterNode]:
    """Start a storage :class:`ClusterNode` over ``server``'s store; returns the cluster server.

    On failure everything opened (including ``server``) is closed and the error propagates.
    One glibc malloc arena is used from here on (before the RPC, replication and NBD threads
    start), as for a single-node NBD server: it bounds the block buffers each thread's arena
    would otherwise keep resident.
    """
    limit_arenas()
    journal_store = server.journal_store
    try:
        node = ClusterNode(
            server.md,
            load_or_create_uuid(config.data_dir),
            store=server.store,
            listen=listen,
            advertise=advertise,
            options=options,
            tls=peer_tls(config),
            layer_registry=server.registries.blockset_layers,
            close_store=True,
            journal=journal_store,
        )
    except BaseException:
        server.close()
        raise
    try:
        node.start(auto_join=auto_join)
    except BaseException:
        with contextlib.suppress(TorusError):
            node.close()
        server.close()
        raise
    clustered = Server(
        server.md,
        node.distributor,
        backend=server.backend,
        owner=server.owner,
        lease_ttl=lease_ttl,
        registries=server.registries,
        claim=server.claim,
        journal_store=journal_store,
        journal=node.journal_replicas if server.journal is not None else None,
        journal_options=server.exports.journal_options,
    )
    clustered.add_stopper(node.stop_background)
    clustered.add_collector(ClusterCollector(node))
    clustered.add_health_check(lambda: ring_membership(node))
    return clustered, node


def ring_membership(node: ClusterNode) -> tuple[bool, str]:
    """Readiness check: this peer is a member of the ring in force here."""
    ring = node.distributor.ring
    if node.uuid in ring.members():
        return True, ""
    return False, f"peer {node.uuid} is not in the ring (v{ring.version}); add it with torusctl peer add"
