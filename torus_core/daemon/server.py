"""The single-node torus server object behind ``torusd`` and ``torusblk nbdserve``.

A :class:`Server` owns the metadata backend, the :class:`MetadataService`, the local block
store and the volume export provider, and optionally runs the NBD listener and the metrics HTTP
endpoint (``/metrics`` from :mod:`torus_core.metrics`, ``/healthz`` from readiness checks: the
metadata backend answers a background probe, plus what components add with
:meth:`Server.add_health_check`). It is built from a :class:`~torus_core.config.Config` with
:meth:`Server.from_config` and is meant to be extended (peer RPC, ring membership) by adding
components that are started after it and stopped before :meth:`Server.close`.

Shutdown order (:meth:`close`): stop the NBD listener (disconnects clients, whose exports close:
sync + unlock), close any still-open volumes, stop HTTP and the metadata probe, close the block
store (flush), close the metadata backend.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from torus_core.block.identity import DataDirClaim
from torus_core.block.malloc import limit_arenas
from torus_core.block.nbd_export import VolumeExportProvider
from torus_core.block.volume import DEFAULT_LEASE_TTL, check_store, default_owner
from torus_core.blockstore import BlockStore
from torus_core.config import Config
from torus_core.daemon.collectors import JournalCollector, ServerCollector
from torus_core.datadir import bind_cluster, private_dir
from torus_core.errors import AlreadyExists, ConfigError, InvalidArgument, TorusError, UsageError
from torus_core.eventlog import MetadataBackend
from torus_core.file import DEFAULT_CACHE_BYTES
from torus_core.http import BackgroundProbe, HealthCheck, MetricsServer
from torus_core.journal import JournalReplicas, JournalStore, LocalJournalReplicas
from torus_core.metadata import MetadataService
from torus_core.metrics import Collector, HealthCollector, StoreCollector, server_registry
from torus_core.nbd.server import NBDServer, ServerThread
from torus_core.opener import Opener
from torus_core.plugins import Registries
from torus_core.rpc.tls import is_loopback

log = logging.getLogger(__name__)

#: What ``--debug-init`` formats an empty cluster with (the lead's ``torusctl init`` defaults).
DEBUG_INIT_BLOCK_SIZE = 512 * 1024
DEBUG_INIT_BLOCK_SPEC = "crc,base"


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def parse_listen(value: str, default_port: int = 10809) -> tuple[str, int]:
    """``HOST:PORT`` / ``:PORT`` / ``HOST`` / ``[V6]:PORT`` → ``(host, port)``; an empty host
    means 127.0.0.1.

    Strict: the port is 1-5 decimal digits in 0..65535, the host an IP address or a host name,
    an IPv6 address is bracketed, and a bare number (``12345``) is refused instead of being
    taken as a host (``inet_aton`` would read it as ``0.0.48.57``). Raises UsageError.
    """
    if not isinstance(value, str) or not value.strip():
        raise UsageError("listen address must be HOST:PORT")
    text = value.strip()
    if text.isdigit():
        raise UsageError(
            f"listen address {value!r} is a bare number: write HOST:PORT, e.g. 127.0.0.1:{text} "
            f"(or :{text} for 127.0.0.1)"
        )
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"bad listen address {value!r}: expected [IPV6]:PORT")
        port_s = rest[1:] if rest else str(default_port)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"bad IPv6 address in listen address {value!r}") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            host, port_s = port_s, str(default_port)
        if ":" in host:
            raise UsageError(f"bad listen address {value!r}: put an IPv6 address in brackets, [ADDR]:PORT")
        host = host or "127.0.0.1"
        if not _HOSTNAME.fullmatch(host):
            raise UsageError(f"bad host in listen address {value!r}")
    if not (port_s.isascii() and port_s.isdigit() and len(port_s) <= 5):
        raise UsageError(f"bad port in listen address {value!r}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise UsageError(f"port out of range in listen address {value!r}")
    return host, port


def warn_if_plaintext(what: str, host: str, tls: bool) -> bool:
    """Log a warning (and return True) when ``what`` listens without TLS on a non-loopback
    address: anyone who can reach it reads and writes in clear text (peer RPC refuses this)."""
    if tls or is_loopback(host):
        return False
    log.warning(
        "%s listens on %s without TLS: anyone who can reach this address can use it and "
        "read its traffic; bind a loopback address or configure TLS",
        what,
        host,
    )
    return True


def tls_context(cert_file: str, key_file: str, ca_file: str | None = None) -> ssl.SSLContext:
    """A server-side TLS context (client certificates required when ``ca_file`` is given)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
        if ca_file:
            ctx.load_verify_locations(ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load TLS certificate/key: {exc}") from None
    return ctx


class Server:
    """Metadata + block store + volume exports of one node."""

    def __init__(
        self,
        md: MetadataService,
        store: BlockStore,
        *,
        backend: MetadataBackend | None = None,
        owner: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        registries: Registries,
        claim: DataDirClaim | None = None,
        journal: JournalReplicas | None = None,
        journal_store: JournalStore | None = None,
        journal_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.md = md
        #: this node's journal files (closed with the server), and the replicas volume journals
        #: append to (this store on a single node, R peers in a cluster)
        self.journal_store = journal_store
        self.journal = journal
        self.store = store
        #: the metadata backend this server opened and closes (None: the caller owns it)
        self.backend = backend
        #: the process's plugin registries (built by the CLI, the composition root)
        self.registries = registries
        #: the data directory's identity claim (released at close); with it, the volume locks of
        #: this peer's dead earlier incarnations are taken over at once
        self.claim = claim
        self.owner = owner or (claim.identity.owner if claim is not None else default_owner())
        self.exports = VolumeExportProvider(
            md,
            store,
            owner=self.owner,
            take_over=claim is not None and claim.held and self.owner == claim.identity.owner,
            lease_ttl=lease_ttl,
            cache_bytes=cache_bytes,
            layer_registry=registries.blockset_layers,
            journal=journal,
            journal_options=journal_options,
        )
        self.nbd: ServerThread | None = None
        self.http: MetricsServer | None = None
        self.metadata_probe: BackgroundProbe | None = None
        self._collectors: list[Collector] = [StoreCollector(store), ServerCollector(self)]
        if journal_store is not None:
            self._collectors.append(JournalCollector(journal_store))
        self._health_checks: list[HealthCheck] = []
        #: extra components' stop functions, called newest first before the core shuts down
        self._stoppers: list[Callable[[], None]] = []
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        debug_init: bool = False,
        registries: Registries,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        journal: bool = True,
        journal_options: Mapping[str, Any] | None = None,
    ) -> Server:
        """Open the configured metadata backend and block store.

        With ``journal`` (the default) and a persistent store, volume FLUSHes go through write
        journals kept in ``<data-dir>/journal`` (docs/durability.md).

        An unformatted cluster raises :class:`~torus_core.errors.NoGlobalMetadata` unless
        ``debug_init`` is set, which formats it (512 KiB blocks, ``crc,base``, empty ring).
        """
        regs = registries
        opener = Opener(regs, config)
        backend_cls = opener.metadata_class()  # an unknown scheme fails before any directory is made
        store_cls = opener.block_store_class()
        if store_cls.persistent:
            try:
                private_dir(config.data_dir, fix_existing=False)
            except OSError as exc:
                raise ConfigError(f"cannot create data directory {config.data_dir}: {exc}") from exc
        backend_cls.prepare_local(config.metadata)
        backend = opener.open_metadata()
        try:
            md = MetadataService(backend, ring_types=regs.ring_types)
            if debug_init:
                with contextlib.suppress(AlreadyExists):
                    if md.state().global_metadata is None:
                        md.format(DEBUG_INIT_BLOCK_SIZE, DEBUG_INIT_BLOCK_SPEC)
                        log.info("formatted the cluster (--debug-init)")
            gm = md.global_metadata()
            if store_cls.persistent:
                # before the store opens: a server of another cluster must never GC its blocks
                bind_cluster(config.data_dir, gm.cluster_id)
            store = opener.open_block_store(gm.block_size)
            try:
                check_store(store, gm)
                # A persistent store's data dir is this node's: claim its identity (see
                # torus_core.block.identity) so a restart takes over its own volume locks.
                persistent = store_cls.persistent
                claim = DataDirClaim.acquire(config.data_dir) if persistent else None
                # journal files are per cluster formatting: a data dir reused after a wipe + init
                # must not replay the old cluster's records into the new cluster's volume 1
                jdir = os.path.join(config.data_dir, "journal", gm.cluster_id or "legacy")
                jstore = JournalStore(jdir) if persistent else None
            except BaseException:
                store.close()
                raise
        except BaseException:
            backend.close()
            raise
        return cls(
            md,
            store,
            backend=backend,
            lease_ttl=lease_ttl,
            registries=regs,
            claim=claim,
            journal_store=jstore,
            journal=LocalJournalReplicas(jstore) if jstore is not None and journal else None,
            journal_options=journal_options,
        )

    # --- components ----------------------------------------------------------------------------

    def serve_nbd(
        self,
        host: str = "127.0.0.1",
        port: int = 10809,
        *,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        **options: Any,
    ) -> ServerThread:
        """Start the NBD listener in a thread; returns it (``.port`` is the bound port)."""
        if self.nbd is not None:
            raise InvalidArgument("the NBD server is already running")
        limit_arenas()  # before the worker threads start: bounds retained buffers (see its module)
        # A new connection to a volume whose previous connection is still closing waits in its
        # handshake for up to CLOSE_WAIT; that server-side wait is not counted against the
        # client's handshake timeout (see Negotiator._server_time), so the 10 s default holds.
        server = NBDServer(self.exports, host, port, tls=tls, tls_required=tls_required, **options)
        self.nbd = ServerThread(server).start()
        return self.nbd

    def serve_metrics(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
    ) -> MetricsServer:
        """Start the ``/metrics`` + ``/healthz`` endpoint and the metadata backend probe.

        The backend is probed every ``probe_interval`` s (its log head position); ``/healthz``
        reports not-ready when the last probe failed or none answered within
        ``probe_interval + probe_timeout`` s, and when any added health check fails.
        """
        if self.http is not None:
            raise InvalidArgument("the HTTP server is already running")
        probe = BackgroundProbe(
            "metadata backend", self.md.head_position, interval=probe_interval, timeout=probe_timeout
        )
        checks: list[HealthCheck] = [probe.status, *self._health_checks]
        health = HealthCollector(lambda: http.health()[0], lambda: probe.healthy)
        http = MetricsServer(server_registry([*self._collectors, health]), checks, host, port)
        self.metadata_probe = probe.start()
        self.http = http.start()
        return http

    #: The endpoint's former name.
    serve_http = serve_metrics

    def add_collector(self, collector: Collector) -> None:
        """Expose ``collector`` on ``/metrics`` (call before :meth:`serve_metrics`)."""
        self._collectors.append(collector)

    def add_health_check(self, check: HealthCheck) -> None:
        """Add a readiness check to ``/healthz`` (cheap and non-blocking: it runs per request)."""
        self._health_checks.append(check)
        if self.http is not None:
            self.http.checks.append(check)

    def add_stopper(self, stop: Callable[[], None]) -> None:
        """Register a component's stop function (run newest first at :meth:`close`)."""
        self._stoppers.append(stop)

    # --- shutdown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything in order; sync and unlock open volumes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        while self._stoppers:
            self._quietly("component", self._stoppers.pop())
        if self.nbd is not None:
            self._quietly("NBD server", self.nbd.stop)
        self._quietly("open volumes", self.exports.close)
        if self.http is not None:
            self._quietly("HTTP server", self.http.stop)
        if self.metadata_probe is not None:
            self._quietly("metadata probe", self.metadata_probe.stop)
        if self.journal_store is not None:
            self._quietly("journal store", self.journal_store.close)
        self._quietly("block store", self.store.close)
        if self.backend is not None:
            self._quietly("metadata backend", self.backend.close)
        if self.claim is not None:
            self.claim.release()

    @staticmethod
    def _quietly(what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except TorusError as exc:
            log.error("closing %s: %s", what, exc)
        except Exception:
            log.exception("closing %s failed", what)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
