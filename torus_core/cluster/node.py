"""``ClusterNode``: one process's membership in a torus cluster.

A storage peer (``ClusterNode(md, uuid, store=..., listen="127.0.0.1:40000")``) wires:

* its local block store behind a :class:`~torus_core.rpc.PeerServer`,
* a :class:`~torus_core.distributor.Distributor` over the current ring (what volumes use as
  their block store),
* a :class:`~torus_core.cluster.heartbeat.Heartbeat` publishing its
  :class:`~torus_core.cluster.peerinfo.PeerInfo` and feeding
  :class:`~torus_core.cluster.membership.Membership` (the peer directory),
* a :class:`~torus_core.cluster.membership.RingWatcher` applying ring changes within a second,
* a maintenance thread running GC cycles and rebalance passes (storage peers only).

A client (``store=None``, no ``listen``) gets the distributor, heartbeat (empty address, so
``peer list`` hides it) and ring watcher, but never runs GC or rebalancing (fix of §12.2 #2).

Shutdown: :meth:`stop_background` stops the threads and the RPC server (the distributor keeps
working, so open volumes can still sync); :meth:`close` also closes the distributor and pool.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field, replace

from torus_core.blockstore import BlockStore
from torus_core.cluster.heartbeat import Heartbeat
from torus_core.cluster.membership import Membership, RingWatcher
from torus_core.cluster.memory import HeapTrimmer
from torus_core.cluster.peerinfo import MIN_PROTOCOL_VERSION, PeerInfo
from torus_core.cluster.rebalancer import RebalanceOptions, Rebalancer

# Moved below block/ and cluster/ (torus_core.datadir); re-exported for existing importers.
from torus_core.datadir import load_or_create_uuid as load_or_create_uuid
from torus_core.distributor.distributor import DEFAULT_READ_CACHE_BYTES, Distributor, DistributorTimeouts
from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import (
    Again,
    AlreadyExists,
    ConfigError,
    InvalidArgument,
    NonSequentialRing,
    NotSupported,
    TorusError,
)
from torus_core.gc import GarbageCollector
from torus_core.journal.channel import JournalChannelServer
from torus_core.journal.remote import RemoteJournalReplicas
from torus_core.journal.store import JournalStore
from torus_core.metadata import MetadataService
from torus_core.refs import BlockRef
from torus_core.registry import Registry
from torus_core.ring.base import Ring, RingMember
from torus_core.ring.codec import make_ring, ring_from_spec
from torus_core.rpc.auth import ClusterKey, PeerAuth
from torus_core.rpc.client import PeerClientPool
from torus_core.rpc.guard import ReplicaGuard
from torus_core.rpc.options import RPCTimeouts
from torus_core.rpc.server import PeerServer
from torus_core.rpc.tls import TLSConfig, split_host_port

log = logging.getLogger(__name__)

#: Attempts of ``join`` against concurrent ring changes.
JOIN_ATTEMPTS = 50
#: Store fill ratio from which a storage peer's GC runs every maintenance round (no idle
#: back-off) with ``GC_PRESSURE_GRACE`` instead of its grace. Lower than a single node's 75 %:
#: a cluster frees superseded blocks only through GC, so garbage builds up at the write rate
#: times the grace (measured: 81 % peaks with 75 % under bench/soak.py --workload mixed).
GC_PRESSURE = 0.5
#: Dead-block grace (s) under space pressure. Deadness is monotonic (gc.py), so no grace is
#: needed for safety; a block is still deleted only on the second cycle that finds it dead.
#: Under an overwrite load garbage builds up at the write rate times the reclaim lag, and a
#: 2 s grace let a degraded 3-peer cluster's stores fill at 8x a 16 MiB volume (issue 16).
GC_PRESSURE_GRACE = 0.0
#: Pause (s) between GC cycles under space pressure, on their own thread: a rebalance pass
#: (pushing to a peer that is down, say) must not hold back reclaim while a store fills.
GC_PRESSURE_INTERVAL = 0.25


@dataclass(frozen=True)
class ClusterOptions:
    """Settings of a :class:`ClusterNode` (all times in seconds).

    :param heartbeat_interval: seconds between heartbeats.
    :param lease_ttl: heartbeat lease TTL (default 3 x interval).
    :param maintenance_interval: pause between GC + rebalance rounds (on an idle cluster GC
        walks and rebalance passes back off further, up to ``rebalance.idle_max``).
    :param gc: delete garbage on this storage peer (without it the peer still computes the
        live set each round, so that its rebalancer leaves garbage alone).
    :param gc_grace: seconds a block must stay dead before GC deletes it.
    :param rebalance: rebalancer tuning (rate limit, batch, settle time).
    :param read_level: distributor read level.
    :param write_level: distributor write level.
    :param read_cache_bytes: distributor LRU size.
    :param timeouts: distributor deadlines.
    :param rpc_timeouts: RPC deadlines of the shared client pool.
    :param write_behind: the distributor replicates in background workers and surfaces errors
        at flush (see :mod:`torus_core.distributor.writebehind`).
    :param journal_prefer_local: volume journals this peer writes keep one replica on this peer
        (plus the permutation's first R-1 others) instead of the permutation's first R: one RPC
        per flush instead of two for a writer outside its volume's first R (see
        :class:`~torus_core.journal.remote.RemoteJournalReplicas`).
    :param journal_channel: a storage peer with a journal store also serves it on a journal
        channel (:mod:`torus_core.journal.channel`; same host and TLS as the peer RPC, advertised
        as ``PeerInfo.journal_address``), and this node's journal writers append over the
        channels other peers advertise (else over gRPC).
    :param journal_channel_port: port of the journal channel (0: any free port).
    """

    heartbeat_interval: float = 2.0
    lease_ttl: float | None = None
    maintenance_interval: float = 1.0
    gc: bool = True
    gc_grace: float = 30.0
    rebalance: RebalanceOptions = field(default_factory=RebalanceOptions)
    read_level: str = "block"
    write_level: str = "all"
    read_cache_bytes: int = DEFAULT_READ_CACHE_BYTES
    timeouts: DistributorTimeouts | None = None
    rpc_timeouts: RPCTimeouts | None = None
    write_behind: bool = True
    journal_prefer_local: bool = False
    journal_channel: bool = True
    journal_channel_port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.maintenance_interval, int | float) or self.maintenance_interval < 0:
            raise InvalidArgument(f"maintenance interval must be >= 0, got {self.maintenance_interval!r}")


class ClusterNode:
    """Membership, data path and maintenance of one process (see the module docstring).

    :param md: metadata service (not closed by the node); its ``ring_types``, the process's ring
        registry, decode the rings.
    :param uuid: this process's peer UUID.
    :param store: the local block store (None for a client).
    :param listen: ``host:port`` for the peer RPC server (None: no listener, like a client).
    :param advertise: address published to others (default: the bound address).
    :param block_size: required for a client without a store (default: the cluster's).
    :param tls: mutual TLS for peer RPC.
    :param options: timing and levels.
    :param layer_registry: blockset layers, for GC's INode decoding.
    :param close_store: whether closing the distributor closes ``store``.
    :param journal: this storage peer's volume journal files (``<data-dir>/journal``), served to
        other peers' journal writers over RPC and used directly by this node's own
        :attr:`journal_replicas` (not closed by the node).
    """

    def __init__(
        self,
        md: MetadataService,
        uuid: str,
        *,
        store: BlockStore | None = None,
        listen: str | None = None,
        advertise: str | None = None,
        block_size: int | None = None,
        tls: TLSConfig | None = None,
        options: ClusterOptions | None = None,
        layer_registry: Registry,
        close_store: bool = False,
        journal: JournalStore | None = None,
    ) -> None:
        if not isinstance(uuid, str) or not uuid:
            raise InvalidArgument("a cluster node needs a non-empty uuid")
        if listen is not None and store is None:
            raise ConfigError("a peer RPC listener needs a local block store")
        self.md = md
        self.uuid = uuid
        self.store = store
        self.options = options or ClusterOptions()
        self.ring_types = md.ring_types
        self.layer_registry = layer_registry
        self.tls = tls
        gm = md.global_metadata()
        if store is not None and store.block_size != gm.block_size:
            raise ConfigError(
                f"store block size {store.block_size} differs from the cluster's {gm.block_size}"
            )
        self.block_size = block_size or gm.block_size
        self.heap = HeapTrimmer(interval=0.25)
        #: the cluster key (from the metadata backend) this node proves membership with and
        #: demands of every caller; there is no way to turn it off
        self.auth = PeerAuth(ClusterKey(md.cluster_key()), uuid)
        #: what this storage peer refuses of other peers (checked against the metadata log)
        self.guard = ReplicaGuard(md) if store is not None else None
        self.server: PeerServer | None = None
        if listen is not None and store is not None:
            # replication batches are what leaves freed heap behind: trim after them (rate-limited)
            self.server = PeerServer(
                store,
                uuid=uuid,
                address=listen,
                tls=tls,
                on_put=self._after_put,
                journal=journal,
                auth=self.auth.key,
                guard=self.guard,
            )
        self._advertise = advertise
        self.directory = PeerDirectory()
        self.pool = PeerClientPool(tls=tls, timeouts=self.options.rpc_timeouts, auth=self.auth)
        ring = ring_from_spec(self.ring_types, md.get_ring())
        self.distributor = Distributor(
            uuid,
            store,
            ring,
            self.directory,
            self.pool,
            read_level=self.options.read_level,
            write_level=self.options.write_level,
            write_behind=self.options.write_behind,
            read_cache_bytes=self.options.read_cache_bytes,
            timeouts=self.options.timeouts,
            block_size=None if store is not None else self.block_size,
            close_local_store=close_store,
        )
        if self.guard is not None:
            self.guard.inodes = self.distributor  # trims are checked against the committed INode
        #: this node's journal files (served by the RPC server) and the cluster's volume journals
        #: as this node's writers append to them (R ring peers per volume, see torus_core.journal.remote)
        self.journal = journal if self.server is not None else None
        self.journal_replicas = RemoteJournalReplicas(
            uuid,
            self.journal,
            lambda: self.distributor.ring,
            self.directory,
            self.pool,
            timeout=self.pool.timeouts.journal,
            prefer_local=self.options.journal_prefer_local,
        )
        self.membership = Membership(
            self.directory,
            uuid,
            ring_members=lambda: self.distributor.ring.members(),
            on_change=self._peers_changed,
        )
        #: this peer's journal channel (its journal store, for other peers' journal writers)
        self.journal_channel: JournalChannelServer | None = None
        if self.journal is not None and listen is not None and self.options.journal_channel:
            self.journal_channel = JournalChannelServer(
                self.journal,
                store=store,
                boot_id=self.server.servicer.boot_id if self.server is not None else "",
                on_put=self._after_put,
                host=split_host_port(listen)[0],
                port=self.options.journal_channel_port,
                tls=tls,
                auth=self.auth.key,
                guard=self.guard,
            )
        if self.options.journal_channel:
            self.journal_replicas.channel_address = self._journal_channel_of
            # block reads take the same channel (one framed round trip, not a gRPC call)
            self.distributor.calls.channel_address = self._journal_channel_of
            self.distributor.calls.channel_timeout = self.pool.timeouts.get
        self.rebalancer: Rebalancer | None = None
        self.gc: GarbageCollector | None = None
        if self.is_storage:
            assert store is not None
            # Always built on a storage peer: with ``gc`` off it only computes the live set, which
            # the rebalancer needs so that it never pushes (or counts) garbage.
            self.gc = GarbageCollector(
                md,
                self.distributor,
                store,
                grace=self.options.gc_grace,
                layer_registry=layer_registry,
                delete=self.options.gc,
                idle_max=self.options.rebalance.idle_max,
            )
            gc = self.gc
            rebalance = self.options.rebalance
            if self.options.write_level == "local":
                # blocks written here wait for the rebalancer to reach their owners: no back-off
                rebalance = replace(rebalance, idle_max=0.0)
            self.rebalancer = Rebalancer(
                uuid,
                store,
                lambda: self.distributor.ring,
                self.directory,
                self.pool,
                rebalance,
                live_fn=gc.refresh_live,
            )
            self.rebalancer.ring_changed(ring.version)
        self.heartbeat = Heartbeat(
            md,
            self.peer_info,
            self.membership.apply,
            interval=self.options.heartbeat_interval,
            ttl=self.options.lease_ttl,
        )
        self.watcher = RingWatcher(md, self._apply_ring)
        self._stop = threading.Event()
        self._maint: threading.Thread | None = None
        self._gc_pressure: threading.Thread | None = None
        self._gc_lock = threading.Lock()  # one GC cycle at a time (candidates are per cycle)
        self._started = False
        self._closed = False

    # --- identity ------------------------------------------------------------------------------

    @property
    def is_storage(self) -> bool:
        """A storage peer: it has a store and serves it to others."""
        return self.store is not None and self.server is not None

    @property
    def address(self) -> str:
        """The advertised peer address ('' for clients)."""
        if self.server is None:
            return ""
        return self._advertise or self.server.address

    @property
    def journal_address(self) -> str:
        """The advertised journal channel address ('' without one, or before :meth:`start`)."""
        chan = self.journal_channel
        if chan is None or not self.address:
            return ""
        try:
            return f"{self.address.rsplit(':', 1)[0]}:{chan.port}"
        except TorusError:
            return ""

    def _journal_channel_of(self, uuid: str) -> str | None:
        """Peer ``uuid``'s journal channel address as its last heartbeat said (None: unknown)."""
        info = self.membership.live.get(uuid)
        return info.journal_address if info is not None else None

    def peer_info(self) -> PeerInfo:
        """This node's current :class:`PeerInfo` (what the heartbeat publishes)."""
        store = self.store
        info = PeerInfo(
            uuid=self.uuid,
            address=self.address,
            total_blocks=store.num_blocks() if store is not None else 0,
            used_blocks=store.used_blocks() if store is not None else 0,
            block_size=self.block_size,
            boot_id=self.server.servicer.boot_id if self.server is not None else "",
            journal_address=self.journal_address,
            journal_bytes=self.journal.disk_bytes() if self.journal is not None else 0,
        )
        if self.rebalancer is not None:
            info.rebalance = self.rebalancer.info()
            if self.gc is not None:
                info.rebalance.gc_deleted = self.gc.total_deleted
                info.rebalance.gc_skipped = self.gc.skipped_cycles
                last = self.gc.last_result
                info.rebalance.gc_dead = last.dead if last is not None else 0
        return info

    # --- ring ----------------------------------------------------------------------------------

    def _apply_ring(self, ring: Ring) -> None:
        if self.distributor.set_ring(ring) and self.rebalancer is not None:
            self.rebalancer.ring_changed(ring.version)

    def join(self) -> bool:
        """Add this storage peer to the ring (``--auto-join``); False if already a member.

        Retries on concurrent ring changes (NonSequentialRing / Again). An ``empty`` ring is
        replaced by a ketama ring with the cluster's replication.
        """
        if not self.is_storage:
            raise ConfigError("only a storage peer (with a listener and a store) can join the ring")
        assert self.store is not None
        me = RingMember(self.uuid, max(1, self.store.num_blocks()), self.address)
        for attempt in range(JOIN_ATTEMPTS):
            spec = self.md.get_ring()
            ring = ring_from_spec(self.ring_types, spec)
            if self.uuid in ring.members():
                return False
            try:
                new = ring.add_peers([me])
            except AlreadyExists:
                return False
            except NotSupported:
                rep = self.md.global_metadata().replication or 2
                new = make_ring(
                    "ketama", [me], replication=rep, version=ring.version + 1, registry=self.ring_types
                )
            try:
                self.md.set_ring(new.to_spec())
            except (NonSequentialRing, Again):
                time.sleep(random.uniform(0.01, 0.05) * (1 + attempt % 5))
                continue
            log.info("joined the ring as %s (ring v%d)", self.uuid, new.version)
            with contextlib.suppress(TorusError):
                self._apply_ring(new)
            return True
        raise Again(f"could not join the ring after {JOIN_ATTEMPTS} attempts (too many concurrent changes)")

    # --- life cycle ----------------------------------------------------------------------------

    def start(self, *, auto_join: bool = False) -> ClusterNode:
        """Start the RPC server, one synchronous heartbeat (protocol check), the ring watcher,
        optionally join the ring, then the background threads."""
        if self._started:
            return self
        self._started = True
        try:
            if self.server is not None:
                self.server.start()
                self.membership.self_address = self.address
                if self.journal_channel is not None:
                    self.journal_channel.start()
            peers = self.heartbeat.beat()
            old = [p for p in peers.values() if p.protocol_version < MIN_PROTOCOL_VERSION]
            if old:
                raise ConfigError(
                    "peers with an unsupported protocol version: "
                    + ", ".join(f"{p.uuid} (v{p.protocol_version})" for p in old)
                )
            self.watcher.start()
            if auto_join:
                self.join()
            self.heartbeat.start()
            if self.is_storage:
                self._maint = threading.Thread(target=self._maintenance, name="torus-maint", daemon=True)
                self._maint.start()
                if self.gc is not None:
                    self._gc_pressure = threading.Thread(
                        target=self._pressure_gc, name="torus-gc-pressure", daemon=True
                    )
                    self._gc_pressure.start()
        except BaseException:
            self.close()
            raise
        return self

    def _after_put(self, refs: list[BlockRef]) -> None:
        """After a replication batch was stored: freed heap back to the OS (rate-limited).
        Only here -- trimming the NBD-serving side's heap would make it page-fault its block
        buffers afresh (see torus_core.block.malloc). A batch holding blocks this peer does not
        own (handoff copies) wakes a backed-off rebalancer, so they go home without delay."""
        self.heap.maybe_trim()
        reb = self.rebalancer
        if reb is not None and reb.idle:
            ring = self.distributor.ring
            if any(self.uuid not in ring.get_peers(ref).owners for ref in refs):
                reb.poke()

    def _peers_changed(self) -> None:
        """A peer joined, left, moved or restarted: check placement at the next round."""
        if self.rebalancer is not None:
            self.rebalancer.poke()

    def maintenance_round(self) -> None:
        """A GC cycle, then a rebalance pass, each unless it is backing off on an idle cluster
        (what the maintenance thread loops over; see :attr:`RebalanceOptions.idle_max`)."""
        self.gc_round()
        if self.rebalancer is not None:
            self.rebalancer.maybe_run_pass(self._stop)

    def gc_round(self, *, pressure_only: bool = False) -> None:
        """A GC cycle: under space pressure at once and with ``GC_PRESSURE_GRACE`` (overwrites
        free space only through GC on every peer: do not let it wait), else unless it is backing
        off on an idle cluster (skipped altogether with ``pressure_only``)."""
        gc = self.gc
        if gc is None:
            return
        with self._gc_lock:
            if self._under_space_pressure():
                gc.grace = min(self.options.gc_grace, GC_PRESSURE_GRACE)
                gc.run_cycle()
            elif not pressure_only:
                gc.grace = self.options.gc_grace
                gc.maybe_run_cycle()

    def _pressure_gc(self) -> None:
        self._stop.wait(GC_PRESSURE_INTERVAL)
        while not self._stop.is_set():
            try:
                self.gc_round(pressure_only=True)
            except TorusError as exc:
                log.warning("GC cycle under space pressure failed: %s", exc)
            except Exception:
                log.exception("GC cycle under space pressure crashed")
            self._stop.wait(GC_PRESSURE_INTERVAL)

    def _under_space_pressure(self) -> bool:
        """Whether the local store is at least ``GC_PRESSURE`` full."""
        store = self.store
        if store is None:
            return False
        try:
            total = store.num_blocks()
            return bool(total) and store.used_blocks() >= GC_PRESSURE * total
        except TorusError:
            return False

    def _maintenance(self) -> None:
        self._stop.wait(random.uniform(0.25, 0.5))
        while not self._stop.is_set():
            try:
                self.maintenance_round()
            except TorusError as exc:
                log.warning("maintenance round failed: %s", exc)
            except Exception:
                log.exception("maintenance round crashed")
            self._stop.wait(self.options.maintenance_interval)

    def stop_background(self, *, unregister: bool = True) -> None:
        """Stop heartbeat (unregistering), ring watcher, maintenance and the RPC server."""
        self._stop.set()
        self.heartbeat.stop(unregister=unregister)
        self.watcher.stop()
        if self._maint is not None:
            self._maint.join(30)
            self._maint = None
        if self._gc_pressure is not None:
            self._gc_pressure.join(30)
            self._gc_pressure = None
        if self.server is not None:
            self.server.stop()
        if self.journal_channel is not None:
            self.journal_channel.stop()

    def abort(self) -> None:
        """Like a crash: stop at once without revoking the lease (peers see us time out)."""
        if self.server is not None:
            self.server.stop(grace=0)
        if self.journal_channel is not None:
            self.journal_channel.stop()
        self._close(unregister=False)

    def close(self) -> None:
        """Stop everything and close the distributor and the client pool. Idempotent."""
        self._close(unregister=True)

    def _close(self, *, unregister: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop_background(unregister=unregister)
        self.journal_replicas.close()
        self.distributor.close()
        self.pool.close()

    def __enter__(self) -> ClusterNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
