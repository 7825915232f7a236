"""An idle cluster converges: real etcd, three real ``torusd`` peers (R = 2) on 127.0.0.1.

A client overwrites a volume a lot (with flushes, so there is plenty of garbage), disconnects,
and a peer is SIGKILLed and restarted. With no client connected, rebalance traffic and GC
deletions must then stop within a bounded time (measured on the peers' published counters over
a quiet window), ``torusctl peer list`` must say ``Balanced: yes``, every live block must be on
its R ring owners (asked with ``RebalanceCheck``), and -- read offline from the stopped peers'
stores -- no block GC calls dead is left and every other block is on exactly its R owners.

Every process is started and stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from torus_core.blockset import default_layer_registry
from torus_core.blockstore import BlockStoreConfig
from torus_core.cluster import ClusterNode, ClusterOptions, GarbageCollector, LiveSet, parse_peers
from torus_core.inode import INodeStore
from torus_core.metadata import MetadataService
from torus_core.plugins import make_plugin_manager
from torus_core.refs import BlockRef, BlockType
from torus_core.ring.builtin import builtin_ring_types
from torus_core.ring.codec import ring_from_spec
from torus_core.rpc.auth import ClusterKey, PeerAuth
from torus_core.rpc.client import PeerClientPool
from torus_core.testing.procs import TorusdProcess, torusctl, wait_for
from torus_core.testing.services import EtcdServer, start_etcd

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

pytestmark = pytest.mark.timeout(240)

WORKLOAD = Path(__file__).with_name("nbd_workload.py")
VOLUME = "vol"
SIZE = 16 * 1024 * 1024
BLOCK_SIZE = 64 * 1024  # --block-size 64KiB
STORE_BYTES = 256 * 1024 * 1024  # --size 256MiB
REPLICATION = 2
FAST = (
    "--heartbeat-interval",
    "0.5",
    "--rebalance-interval",
    "0.2",
    "--rebalance-settle",
    "1",
    "--gc-grace",
    "2",
)
#: seconds the counters must stay still for the cluster to count as converged
QUIET = 4.0
#: bound on the time from the restart to convergence
CONVERGE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Counters:
    """Summed since-start maintenance counters of the live peers (from their heartbeats)."""

    gc_deleted: int
    pushed_blocks: int
    pushed_bytes: int
    rebalance_deleted: int
    used_blocks: int

    def minus(self, other: Counters) -> Counters:
        """The change from ``other`` to self."""
        return Counters(
            self.gc_deleted - other.gc_deleted,
            self.pushed_blocks - other.pushed_blocks,
            self.pushed_bytes - other.pushed_bytes,
            self.rebalance_deleted - other.rebalance_deleted,
            self.used_blocks - other.used_blocks,
        )

    @property
    def moved(self) -> int:
        """Blocks moved or deleted (what must be zero on an idle, converged cluster)."""
        return self.gc_deleted + self.pushed_blocks + self.rebalance_deleted


class Cluster:
    """etcd + torusd processes in one temporary directory."""

    def __init__(self, root: Path, etcd: EtcdServer) -> None:
        self.root = root
        self.etcd = etcd
        self.url = etcd.url
        self.peers: list[TorusdProcess] = []
        backend = make_plugin_manager().collect_registries().metadata.get("etcd").from_url(self.url)
        self.md = MetadataService(backend, ring_types=RING_TYPES)

    def add_peer(self) -> TorusdProcess:
        p = TorusdProcess(self.url, self.root / f"peer{len(self.peers)}", size="256MiB", extra=FAST)
        self.peers.append(p.start())
        return p

    def live(self) -> list[TorusdProcess]:
        return [p for p in self.peers if p.pid is not None]

    def counters(self) -> Counters:
        infos = parse_peers(self.md.list_peers())
        rows = [infos[p.uuid] for p in self.live() if p.uuid in infos]
        return Counters(
            sum(i.rebalance.gc_deleted for i in rows),
            sum(i.rebalance.pushed_blocks_total for i in rows),
            sum(i.rebalance.pushed_bytes_total for i in rows),
            sum(i.rebalance.deleted_total for i in rows),
            sum(i.used_blocks for i in rows),
        )

    def balanced(self) -> bool:
        return "Balanced: yes" in torusctl(self.url, "peer", "list", timeout=30)

    def wait_quiet(self, timeout: float, quiet: float = QUIET) -> tuple[bool, float]:
        """Wait (bounded) until no peer moved, pushed or deleted anything for ``quiet`` seconds
        and ``peer list`` says balanced; returns (converged, seconds waited)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = self.counters()
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.counters()
            if now != last:
                last, still_since = now, time.monotonic()
                continue
            if time.monotonic() - still_since >= quiet and self.balanced():
                return True, time.monotonic() - t0
        return False, time.monotonic() - t0

    def close(self) -> None:
        for p in self.peers:
            p.stop()
        self.md.close()


def _live_blocks(md: MetadataService) -> tuple[LiveSet, set[BlockRef]]:
    """GC's live set, and every block a current INode or snapshot references, INode blocks
    included (read through a client node's distributor, so from whichever peer holds them)."""
    node = ClusterNode(
        md, "convergence-checker", options=ClusterOptions(heartbeat_interval=0.5), layer_registry=LAYERS
    ).start()
    try:
        gc = GarbageCollector(md, node.distributor, node.distributor, layer_registry=LAYERS)
        live = gc.live_set()
        blocks = set(live.refs)
        istore = INodeStore(node.distributor)
        for iref in live.inodes:
            length = len(istore.get_inode(iref).to_bytes()) + 4
            for n in range(1, -(-length // node.block_size) + 1):
                blocks.add(BlockRef(iref.volume, iref.inode, n, BlockType.INODE))
        return live, blocks
    finally:
        node.close()


def _stored_refs(peer: TorusdProcess) -> set[BlockRef]:
    """The refs in a stopped peer's file store (opened offline from its data dir)."""
    cls = make_plugin_manager().collect_registries().block_stores.get("file")
    store = cls.open(BlockStoreConfig(BLOCK_SIZE, STORE_BYTES, path=str(peer.data_dir / "block")))
    try:
        return set(store.iter_refs())
    finally:
        store.close()


def _missing_copies(cluster: Cluster, blocks: set[BlockRef]) -> list[tuple[BlockRef, str]]:
    """(block, owner) pairs where a ring owner does not hold the block (RebalanceCheck)."""
    ring = ring_from_spec(cluster.md.ring_types, cluster.md.get_ring())
    addresses = {u: p.address for u, p in parse_peers(cluster.md.list_peers()).items() if p.address}
    by_owner: dict[str, list[BlockRef]] = {}
    for ref in blocks:
        owners = ring.get_peers(ref).owners
        assert len(owners) == REPLICATION
        for uuid in owners:
            by_owner.setdefault(uuid, []).append(ref)
    missing: list[tuple[BlockRef, str]] = []
    with PeerClientPool(auth=PeerAuth(ClusterKey(cluster.md.cluster_key()), "convergence-checker")) as pool:
        for uuid, refs in by_owner.items():
            has = pool.get(addresses[uuid]).rebalance_check(refs, timeout=10.0)
            missing += [(r, uuid) for r, h in zip(refs, has, strict=True) if not h]
    return missing


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="torus-mp-idle-"))
    (root / "etcd").mkdir()
    etcd = start_etcd(root / "etcd")
    c = Cluster(root, etcd)
    try:
        torusctl(c.url, "init", "--block-size", "64KiB", "--replication", str(REPLICATION))
        for _ in range(3):
            c.add_peer()
        torusctl(c.url, "volume", "create-block", VOLUME, str(SIZE))
        yield c
    finally:
        c.close()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def _unlocked(cluster: Cluster) -> bool:
    """Whether the scratch volume's lock is released (its NBD export closed)."""
    return not cluster.md.lock_status("scratch").locked


def _overwrite(uri: str, seconds: float, seed: int, out: Path) -> None:
    """Overwrite the volume over NBD with a flush every 8 writes, then disconnect."""
    proc = subprocess.run(
        ["/usr/bin/python3", str(WORKLOAD), uri, str(SIZE), str(seconds), str(seed), str(out), "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (from /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def _assert_converged(cluster: Cluster, label: str, since: Counters) -> None:
    """Bounded wait for a still, balanced cluster; then a measured quiet window and the
    placement of every referenced block. ``since``: the counters when the scenario's
    events began (after the last restart: a restarted peer starts counting from zero)."""
    converged, took = cluster.wait_quiet(CONVERGE_TIMEOUT)
    settling = cluster.counters().minus(since)
    table = torusctl(cluster.url, "peer", "list")
    pids = [p.pid for p in cluster.live() if p.pid is not None]
    start, cpu0 = cluster.counters(), _cpu_seconds(pids)
    time.sleep(QUIET)
    window, cpu = cluster.counters().minus(start), _cpu_seconds(pids) - cpu0
    assert converged, (
        f"{label}: no convergence in {took:.0f} s ({settling}); in the next {QUIET:.0f} s: {window}, "
        f"{cpu:.2f} CPU s\n{table}"
    )
    print(
        f"\n{label}: still and balanced {took:.1f} s after the last event (incl. the {QUIET:.0f} s "
        f"still period); since the events: GC deleted {settling.gc_deleted} blocks, the rebalancers "
        f"pushed {settling.pushed_blocks} blocks ({settling.pushed_bytes} B) and dropped "
        f"{settling.rebalance_deleted} copies; in the next {QUIET:.0f} s idle window: "
        f"{window.gc_deleted} deleted, {window.pushed_blocks} blocks / {window.pushed_bytes} B pushed, "
        f"{cpu:.2f} CPU s over {len(pids)} torusd"
    )
    assert window.moved == 0 and window.pushed_bytes == 0, f"{label}: still churning: {window}"
    assert "Balanced: yes" in torusctl(cluster.url, "peer", "list"), table
    _, blocks = _live_blocks(cluster.md)
    assert blocks
    assert _missing_copies(cluster, blocks) == [], f"{label}: live blocks short of R copies"


def _assert_stores_exact(cluster: Cluster, label: str) -> None:
    """Stop every peer (by its PID) and read the stores offline: no block GC calls dead is left
    anywhere, and every other block -- referenced ones and those GC keeps for a write session
    since the last checkpoint -- is on exactly its R ring owners (no stray copies)."""
    live, referenced = _live_blocks(cluster.md)
    ring = ring_from_spec(cluster.md.ring_types, cluster.md.get_ring())
    for p in cluster.peers:
        p.stop()
    held: dict[BlockRef, set[str]] = {}
    for p in cluster.peers:
        for ref in _stored_refs(p):
            held.setdefault(ref, set()).add(p.uuid)
    dead = [r for r in held if live.is_dead(r)]
    assert dead == [], f"{label}: {len(dead)} dead blocks left, e.g. {dead[:3]}"
    assert referenced <= set(held), f"{label}: referenced blocks lost"
    misplaced = {r: h for r, h in held.items() if h != set(ring.get_peers(r).owners)}
    assert misplaced == {}, f"{label}: {len(misplaced)} blocks not on exactly their owners"
    print(f"{label}: stores hold {len(held)} blocks x {REPLICATION} ({len(referenced)} referenced)")


def test_an_idle_cluster_stops_moving_and_deleting_blocks_after_a_peer_is_killed_and_restarted(
    cluster: Cluster,
) -> None:
    p0, _p1, p2 = cluster.peers
    _overwrite(f"{p0.nbd_uri}/{VOLUME}", 6.0, 11, cluster.root / "model")
    # a scratch volume written in full and deleted: all its blocks become garbage at once, and
    # p2 is killed before any GC grace is over, so it comes back holding them with fresh GC
    # timers while the other owners collect theirs (what made the rebalancers push them back)
    torusctl(cluster.url, "volume", "create-block", "scratch", str(SIZE))
    _overwrite(f"{p0.nbd_uri}/scratch", 2.0, 12, cluster.root / "scratch-model")
    assert wait_for(lambda: "scratch" in torusctl(cluster.url, "volume", "list") and _unlocked(cluster), 15.0)
    torusctl(cluster.url, "volume", "delete", "scratch")
    p2.kill()
    assert wait_for(lambda: "DOWN" in torusctl(cluster.url, "peer", "list"), 15.0)
    p2.start()
    _assert_converged(cluster, "kill+restart", cluster.counters())
    _assert_stores_exact(cluster, "kill+restart")


def test_an_idle_cluster_converges_after_kill_restart_add_and_remove(cluster: Cluster) -> None:
    p0, p1, p2 = cluster.peers
    _overwrite(f"{p0.nbd_uri}/{VOLUME}", 4.0, 12, cluster.root / "model")
    p1.kill()
    assert wait_for(lambda: "DOWN" in torusctl(cluster.url, "peer", "list"), 15.0)
    p1.start()
    since = cluster.counters()
    p3 = cluster.add_peer()  # joins the ring (--auto-join): a quarter of the blocks move to it
    torusctl(cluster.url, "peer", "remove", p2.uuid)  # live removal: p2 drains to the new owners
    _assert_converged(cluster, "kill+restart+add+remove", since)
    infos = parse_peers(cluster.md.list_peers())
    assert infos[p3.uuid].used_blocks > 0
    assert infos[p2.uuid].used_blocks == 0  # drained
    _assert_stores_exact(cluster, "kill+restart+add+remove")
