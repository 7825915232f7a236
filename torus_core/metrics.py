"""Every Prometheus metric torus exports, defined in one place (see docs/metrics.md).

Process-wide counters and histograms live in prometheus_client's default registry, so they also
carry the process/platform/GC collectors it comes with. Instrumented code imports the metric (or a
**pre-bound labelled child** from the tables below) and calls ``inc``/``observe``; nothing here
does I/O. The NBD request path, the hottest, does not even take a lock: each connection updates
its own :class:`NBDConnectionMetrics` from its event-loop thread and :data:`NBD` (a collector)
sums them at scrape time.

Values that are *read* rather than counted (store capacity, open volumes, ring membership,
rebalancer state) come from collectors bound to one running server: :class:`StoreCollector` here,
and :class:`~torus_core.daemon.collectors.ServerCollector` and
:class:`~torus_core.daemon.collectors.ClusterCollector`, which read the daemon's objects and so
live with them. They are not registered globally (a test
process may run several servers); :func:`server_registry` builds the registry one ``/metrics``
endpoint serves: the default registry plus that server's collectors.

Naming follows the Prometheus conventions: base units (``_seconds``, ``_bytes``), ``_total`` for
counters, ``torus_`` prefix.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol, cast

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector as Collector  # re-exported for the collectors' users
from prometheus_client.utils import floatToGoString

from torus_core.errors import TorusError

# prometheus_client leaves these two unannotated; their types, once, here.
_disable_created_metrics = cast(Callable[[], None], disable_created_metrics)
_float_to_go_string = cast(Callable[[float], str], floatToGoString)

# ``*_created`` series (a timestamp per counter/histogram) double the scrape for no use here.
_disable_created_metrics()

#: Latency buckets for requests served from memory up to slow syncs (100 µs .. 10 s).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# --- NBD (torus_core/nbd/transmission.py) --------------------------------------------------------

#: NBD command names used as the ``cmd`` label.
NBD_COMMANDS = ("read", "write", "flush", "trim", "write_zeroes", "block_status")


class LocalHistogram:
    """A histogram updated by **one thread** without locks (an NBD connection's event loop).

    ``observe`` is a bisect, a list increment and a float add: about a tenth of
    ``prometheus_client.Histogram.observe`` (which takes two locks), which matters at tens of
    thousands of NBD requests per second. Readers (the scrape) see a slightly stale value.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one value (``le`` buckets are inclusive upper bounds)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def merge_into(self, other: LocalHistogram) -> None:
        """Add this histogram's counts to ``other``."""
        for i, n in enumerate(self.counts):
            other.counts[i] += n
        other.sum += self.sum


class LocalCounter:
    """A counter updated by one thread without locks (see :class:`LocalHistogram`)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        """Add ``amount``."""
        self.value += amount


class NBDConnectionMetrics:
    """What one NBD connection updates, from its event-loop thread only.

    ``latency`` and ``errors`` are indexed by NBD command number; get one with
    :meth:`NBDCollector.connection` and hand it back with :meth:`NBDCollector.retire`.
    """

    __slots__ = ("errors", "export", "latency", "read_bytes", "written_bytes")

    def __init__(self, export_name: str, commands: Mapping[int, str]) -> None:
        self.export = export_name
        self.latency = {num: LocalHistogram() for num in commands}
        self.errors = {num: LocalCounter() for num in commands}
        self.read_bytes = LocalCounter()
        self.written_bytes = LocalCounter()


class NBDCollector(Collector):
    """Exports the NBD request metrics of every connection of this process, live and closed.

    Registered once in the default registry. Hot-path updates go to per-connection
    :class:`NBDConnectionMetrics` (no locks, no label lookups); a scrape sums the retired totals
    and the live connections.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[NBDConnectionMetrics] = set()
        self._names: dict[NBDConnectionMetrics, dict[int, str]] = {}
        self._latency = {cmd: LocalHistogram() for cmd in NBD_COMMANDS}
        self._errors = dict.fromkeys(NBD_COMMANDS, 0)
        self._read: dict[str, int] = {}
        self._written: dict[str, int] = {}

    def connection(self, export_name: str, commands: Mapping[int, str]) -> NBDConnectionMetrics:
        """Metrics for a new connection to ``export_name``; ``commands`` maps command numbers to
        their ``cmd`` label (one of :data:`NBD_COMMANDS`)."""
        m = NBDConnectionMetrics(export_name, commands)
        with self._lock:
            self._live.add(m)
            self._names[m] = dict(commands)
            self._read.setdefault(export_name, 0)
            self._written.setdefault(export_name, 0)
        return m

    def retire(self, m: NBDConnectionMetrics) -> None:
        """Fold a closed connection's counts into the totals (call from its own thread)."""
        with self._lock:
            if m not in self._live:
                return
            self._live.discard(m)
            self._fold(m, self._names.pop(m), self._latency, self._errors, self._read, self._written)

    @staticmethod
    def _fold(
        m: NBDConnectionMetrics,
        names: Mapping[int, str],
        latency: dict[str, LocalHistogram],
        errors: dict[str, int],
        read: dict[str, int],
        written: dict[str, int],
    ) -> None:
        for num, h in m.latency.items():
            h.merge_into(latency[names[num]])
        for num, c in m.errors.items():
            errors[names[num]] += c.value
        read[m.export] = read.get(m.export, 0) + m.read_bytes.value
        written[m.export] = written.get(m.export, 0) + m.written_bytes.value

    def collect(self) -> Iterator[Metric]:
        """Histogram per command, errors per command, bytes per export."""
        with self._lock:
            latency = {cmd: LocalHistogram() for cmd in NBD_COMMANDS}
            for cmd, h in self._latency.items():
                h.merge_into(latency[cmd])
            errors = dict(self._errors)
            read, written = dict(self._read), dict(self._written)
            for m in self._live:
                self._fold(m, self._names[m], latency, errors, read, written)
        hist = HistogramMetricFamily(
            "torus_nbd_request_duration_seconds",
            "Time from reading an NBD request to its reply being queued, by command.",
            labels=["cmd"],
        )
        for cmd, h in latency.items():
            cumulative, buckets = 0, []
            for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
                cumulative += n
                buckets.append((_float_to_go_string(bound), cumulative))
            hist.add_metric([cmd], buckets, h.sum)
        yield hist
        err = CounterMetricFamily(
            "torus_nbd_request_errors_total",
            "NBD requests answered with an error (after validation), by command.",
            labels=["cmd"],
        )
        for cmd, n in errors.items():
            err.add_metric([cmd], n)
        yield err
        rd = CounterMetricFamily(
            "torus_volume_read_bytes_total",
            "Bytes read by NBD clients, by export (VOL or VOL@SNAP).",
            labels=["volume"],
        )
        for name, n in sorted(read.items()):
            rd.add_metric([name], n)
        yield rd
        wr = CounterMetricFamily(
            "torus_volume_written_bytes_total", "Bytes written by NBD clients, by export.", labels=["volume"]
        )
        for name, n in sorted(written.items()):
            wr.add_metric([name], n)
        yield wr

    def describe(self) -> Iterator[Metric]:
        """The families (names only), so the registry can check for duplicates."""
        yield HistogramMetricFamily("torus_nbd_request_duration_seconds", "", labels=["cmd"])
        yield CounterMetricFamily("torus_nbd_request_errors_total", "", labels=["cmd"])
        yield CounterMetricFamily("torus_volume_read_bytes_total", "", labels=["volume"])
        yield CounterMetricFamily("torus_volume_written_bytes_total", "", labels=["volume"])


#: The process-wide NBD metrics (see :class:`NBDCollector`).
NBD = NBDCollector()
REGISTRY.register(NBD)


# --- volumes (torus_core/block/volume.py) -------------------------------------------------------

VOLUME_FLUSH_SECONDS = Histogram(
    "torus_volume_flush_duration_seconds",
    "Time of a volume sync (NBD FLUSH/FUA, close): dirty blocks durable + INode committed.",
    buckets=LATENCY_BUCKETS,
)

# --- volume write journal (torus_core/journal/writer.py, torus_core/block/journaled.py) ---------

JOURNAL_APPEND_SECONDS = Histogram(
    "torus_journal_append_duration_seconds",
    "Time of one group append of journal records to the volume's journal replicas (durable).",
    buckets=LATENCY_BUCKETS,
)
JOURNAL_RECORDS = Counter("torus_journal_records_total", "Journal records made durable.")
JOURNAL_BYTES = Counter("torus_journal_bytes_total", "Bytes of journal records made durable.")
JOURNAL_APPENDS = Counter(
    "torus_journal_appends_total", "Group appends (records per append = records_total / appends_total)."
)
JOURNAL_CHECKPOINT_SECONDS = Histogram(
    "torus_journal_checkpoint_duration_seconds",
    "Time of one checkpoint: dirty blocks written, INode committed, journal trimmed.",
    buckets=LATENCY_BUCKETS,
)
JOURNAL_REPLAYED_RECORDS = Counter(
    "torus_journal_replayed_records_total", "Journal records replayed when opening a volume after a crash."
)
JOURNAL_FALLBACKS = Counter(
    "torus_journal_fallbacks_total", "Flushes made durable by a checkpoint because the journal append failed."
)

# --- peer RPC client (torus_core/rpc/client.py) -------------------------------------------------

#: The peer RPC methods used as the ``method`` label.
RPC_METHODS = (
    "GetBlock",
    "PutBlocks",
    "Flush",
    "PutBlockStream",
    "RebalanceCheck",
    "Ping",
    "JournalFence",
    "JournalAppend",
    "JournalRead",
    "JournalTrim",
)

RPC_CLIENT_SECONDS = Histogram(
    "torus_rpc_client_duration_seconds",
    "Latency of peer RPC calls made by this process (success or failure), by method.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
RPC_CLIENT_ERRORS = Counter(
    "torus_rpc_client_errors_total", "Peer RPC calls that failed, by method.", ["method"]
)
#: Pre-bound children by method name (the client looks them up in a dict, not with ``labels``).
RPC_CLIENT_SECONDS_BY_METHOD = {m: RPC_CLIENT_SECONDS.labels(m) for m in RPC_METHODS}
RPC_CLIENT_ERRORS_BY_METHOD = {m: RPC_CLIENT_ERRORS.labels(m) for m in RPC_METHODS}

# --- distributor read cache (torus_core/distributor/cache.py) -----------------------------------

READ_CACHE_HITS = Counter("torus_read_cache_hits_total", "Block reads served from the distributor LRU.")
READ_CACHE_MISSES = Counter("torus_read_cache_misses_total", "Block reads not found in the distributor LRU.")

# --- metadata (torus_core/metadata.py) ----------------------------------------------------------

METADATA_APPEND_SECONDS = Histogram(
    "torus_metadata_append_duration_seconds",
    "Latency of one atomic event-batch append to the metadata log, by backend.",
    ["backend"],
    buckets=LATENCY_BUCKETS,
)

# --- leases (torus_core/block/lease.py, torus_core/cluster/heartbeat.py) -------------------------

#: ``kind`` label values: a volume lock's lease, a peer's heartbeat lease.
LEASE_KINDS = ("volume", "peer")
LEASE_RENEWALS = Counter("torus_lease_renewals_total", "Successful lease keepalives, by kind.", ["kind"])
LEASE_RENEWAL_FAILURES = Counter(
    "torus_lease_renewal_failures_total",
    "Lease keepalives that failed transiently (retried), by kind.",
    ["kind"],
)
LEASE_LOSSES = Counter(
    "torus_lease_losses_total",
    "Leases found gone (volume lock lost; peer lease expired and re-granted), by kind.",
    ["kind"],
)
VOLUME_LEASE_RENEWALS = LEASE_RENEWALS.labels("volume")
VOLUME_LEASE_RENEWAL_FAILURES = LEASE_RENEWAL_FAILURES.labels("volume")
VOLUME_LEASE_LOSSES = LEASE_LOSSES.labels("volume")
PEER_LEASE_RENEWALS = LEASE_RENEWALS.labels("peer")
PEER_LEASE_LOSSES = LEASE_LOSSES.labels("peer")
HEARTBEAT_FAILURES = Counter(
    "torus_heartbeat_failures_total", "Heartbeats that failed (metadata errors; retried next beat)."
)

# --- rebalancer and GC (torus_core/cluster/rebalancer.py, torus_core/gc.py) --------------

REBALANCE_PUSHED_BLOCKS = Counter(
    "torus_rebalance_pushed_blocks_total", "Blocks the rebalancer pushed to their ring owners."
)
REBALANCE_PUSHED_BYTES = Counter(
    "torus_rebalance_pushed_bytes_total", "Bytes the rebalancer pushed to their ring owners."
)
REBALANCE_DELETED_BLOCKS = Counter(
    "torus_rebalance_deleted_blocks_total", "Non-owned local copies deleted once every owner confirmed."
)
REBALANCE_PASSES = Counter("torus_rebalance_passes_total", "Complete rebalance passes over the local blocks.")
GC_CYCLES = Counter("torus_gc_cycles_total", "GC cycles that built a complete live set.")
GC_SKIPPED_CYCLES = Counter(
    "torus_gc_skipped_cycles_total", "GC cycles skipped (metadata or an INode unreadable; nothing deleted)."
)
GC_DELETED_BLOCKS = Counter("torus_gc_deleted_blocks_total", "Dead blocks deleted by GC.")
GC_DEAD_BLOCKS = Gauge(
    "torus_gc_dead_blocks", "Dead blocks found by the last GC cycle (deleted after grace)."
)


# --- collectors bound to one server --------------------------------------------------------------


class StoreCapacity(Protocol):
    """What :class:`StoreCollector` reads (a :class:`~torus_core.blockstore.BlockStore` has it)."""

    @property
    def block_size(self) -> int: ...
    def num_blocks(self) -> int: ...
    def used_blocks(self) -> int: ...


class StoreCollector(Collector):
    """Capacity and usage of a block store, read at scrape time.

    :param store: anything with ``block_size``, ``num_blocks()`` and ``used_blocks()``.
    """

    def __init__(self, store: StoreCapacity) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        """Gauges in blocks and bytes (nothing while the store is closed)."""
        store = self.store
        try:
            size = int(store.block_size)
            total = int(store.num_blocks())
            used = int(store.used_blocks())
        except TorusError:  # closed (shutting down): skip rather than fail the scrape
            return
        yield GaugeMetricFamily("torus_store_block_size_bytes", "Block size of the store.", value=size)
        yield GaugeMetricFamily("torus_store_capacity_blocks", "Blocks the store can hold.", value=total)
        yield GaugeMetricFamily("torus_store_used_blocks", "Blocks stored.", value=used)
        yield GaugeMetricFamily("torus_store_capacity_bytes", "Store capacity in bytes.", value=total * size)
        yield GaugeMetricFamily("torus_store_used_bytes", "Bytes of blocks stored.", value=used * size)


class HealthCollector(Collector):
    """``torus_ready`` (1/0, what ``/healthz`` says) and ``torus_metadata_reachable`` (1/0)."""

    def __init__(self, ready: Callable[[], bool], metadata_ok: Callable[[], bool]) -> None:
        self.ready = ready
        self.metadata_ok = metadata_ok

    def collect(self) -> Iterator[Metric]:
        """Two gauges."""
        yield GaugeMetricFamily(
            "torus_ready", "1 if /healthz reports ready, else 0.", value=int(self.ready())
        )
        yield GaugeMetricFamily(
            "torus_metadata_reachable",
            "1 if the metadata backend answered the last probe in time, else 0.",
            value=int(self.metadata_ok()),
        )


class _Forward(Collector):
    """Yields another registry's metrics (the process-wide default registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        """The forwarded registry's metrics."""
        return self.registry.collect()


def server_registry(collectors: Iterable[Collector], *, include_default: bool = True) -> CollectorRegistry:
    """A registry serving the default registry's metrics plus ``collectors`` (one server's).

    Built with ``auto_describe=False``: nothing is collected at registration time.
    """
    registry = CollectorRegistry(auto_describe=False)
    if include_default:
        registry.register(_Forward(REGISTRY))
    for c in collectors:
        registry.register(c)
    return registry
