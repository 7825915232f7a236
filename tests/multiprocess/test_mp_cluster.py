"""Multi-process cluster tests: real etcd, real ``torusd`` peers on 127.0.0.1, real NBD clients.

3 peers, R = 2, 64 KiB blocks, a 24 MiB volume, fast heartbeats. Every process is started and
stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.block.volume import BlockVolume
from torus_core.blockset import default_layer_registry
from torus_core.cluster import ClusterNode, ClusterOptions, parse_peers
from torus_core.errors import Locked
from torus_core.metadata import MetadataService
from torus_core.plugins import make_plugin_manager
from torus_core.ring.builtin import builtin_ring_types
from torus_core.testing.procs import TorusdProcess, torusctl, wait_for
from torus_core.testing.services import EtcdServer, start_etcd

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

pytestmark = pytest.mark.timeout(300)

WORKLOAD = Path(__file__).with_name("nbd_workload.py")
VOLUME = "vol"
SIZE = 24 * 1024 * 1024
FAST = (
    "--heartbeat-interval",
    "0.5",
    "--rebalance-interval",
    "0.2",
    "--rebalance-settle",
    "1",
    "--gc-grace",
    "2",
    "--lease-ttl",
    "3",
)


class Cluster:
    """etcd + torusd processes in one temporary directory."""

    def __init__(self, root: Path, etcd: EtcdServer, extra: tuple[str, ...] = ()) -> None:
        self.root = root
        self.etcd = etcd
        self.url = etcd.url
        self.extra = FAST + extra
        self.peers: list[TorusdProcess] = []
        backend = make_plugin_manager().collect_registries().metadata.get("etcd").from_url(self.url)
        self.md = MetadataService(backend, ring_types=RING_TYPES)

    def add_peer(self) -> TorusdProcess:
        p = TorusdProcess(self.url, self.root / f"peer{len(self.peers)}", size="256MiB", extra=self.extra)
        self.peers.append(p.start())
        return p

    def live(self) -> list[TorusdProcess]:
        return [p for p in self.peers if p.pid is not None]

    def replicated(self, since: float) -> bool:
        """Every live peer finished a pass on the current ring after ``since`` with nothing missing,
        and every peer's record was written after the last of those passes ended.

        The second condition makes the records one consistent picture: a peer's ``used_blocks``
        is as of its last heartbeat, so a receiver that last beat while the others were still
        pushing to it would otherwise report a fraction of what it holds.
        """
        version = self.md.get_ring().version
        infos = parse_peers(self.md.list_peers())
        rows = []
        for p in self.live():
            info = infos.get(p.uuid)
            if info is None:
                return False
            r = info.rebalance
            if r.ring_version != version or r.last_finish <= since or r.under_replicated or r.unconfirmed:
                return False
            rows.append(info)
        last_pass_end = max(i.rebalance.last_finish for i in rows)
        return all(i.last_seen > last_pass_end for i in rows)

    def close(self) -> None:
        for p in self.peers:
            p.stop()
        self.md.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="torus-mp-"))
    (root / "etcd").mkdir()
    etcd = start_etcd(root / "etcd")
    c = Cluster(root, etcd)  # the default write level "all"
    try:
        torusctl(c.url, "init", "--block-size", "64KiB", "--replication", "2")
        for _ in range(3):
            c.add_peer()
        torusctl(c.url, "volume", "create-block", VOLUME, str(SIZE))
        yield c
    finally:
        c.close()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def _workload(uri: str, seconds: float, seed: int, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["/usr/bin/python3", str(WORKLOAD), uri, str(SIZE), str(seconds), str(seed), str(out), "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_volume(uri: str, dest: Path, timeout: float = 30.0) -> bytes:
    """Read the whole volume with nbdcopy, retrying (bounded) while its lock is still held."""
    deadline = time.monotonic() + timeout
    while True:
        dest.unlink(missing_ok=True)
        proc = subprocess.run(["nbdcopy", uri, str(dest)], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return dest.read_bytes()
        if time.monotonic() > deadline:
            raise AssertionError(f"nbdcopy {uri} failed: {proc.stderr}")
        time.sleep(0.5)


def test_kill_remove_and_add_peers_under_nbd_load_keeps_every_flushed_byte(cluster: Cluster) -> None:
    p0, _p1, p2 = cluster.peers
    model_file = cluster.root / "model"
    # (a) SIGKILL a peer while an NBD client writes with periodic flushes
    work = _workload(f"{p0.nbd_uri}/{VOLUME}", 8.0, 1, model_file)
    time.sleep(2.5)
    p2.kill()
    out, _ = work.communicate(timeout=120)
    assert work.returncode == 0, f"I/O stopped after the peer was killed: {out}\n{p0.log_tail(60)}"
    model = model_file.read_bytes()
    assert _read_volume(f"{p0.nbd_uri}/{VOLUME}", cluster.root / "read-a") == model

    # (b) forced removal of the dead peer: every block gets back to R copies, in bounded time
    assert wait_for(lambda: "DOWN" in torusctl(cluster.url, "peer", "list"), 10.0)
    t_remove = time.time()
    torusctl(cluster.url, "peer", "remove", "--force", p2.uuid)
    assert wait_for(lambda: cluster.replicated(t_remove), 90.0), torusctl(cluster.url, "peer", "list")
    print(f"re-replication after removal took {time.time() - t_remove:.1f} s")
    assert _read_volume(f"{p0.nbd_uri}/{VOLUME}", cluster.root / "read-b") == model

    # (c) a fourth peer joins: it receives roughly its share and nothing is lost
    t_add = time.time()
    p3 = cluster.add_peer()
    assert wait_for(lambda: cluster.replicated(t_add), 90.0), torusctl(cluster.url, "peer", "list")
    infos = parse_peers(cluster.md.list_peers())
    used = {p.uuid: infos[p.uuid].used_blocks for p in cluster.live()}
    fair = sum(used.values()) / len(used)
    assert used[p3.uuid] >= 0.4 * fair, used
    assert _read_volume(f"{p3.nbd_uri}/{VOLUME}", cluster.root / "read-c") == model


def test_sigkill_of_every_process_then_restart_keeps_flushed_data(cluster: Cluster) -> None:
    p0 = cluster.peers[0]
    model_file = cluster.root / "model"
    work = _workload(f"{p0.nbd_uri}/{VOLUME}", 3.0, 2, model_file)
    out, _ = work.communicate(timeout=120)
    assert work.returncode == 0, out
    model = model_file.read_bytes()
    # (d) everything dies at once (the NBD client had flushed; the daemons and etcd are killed)
    for p in cluster.peers:
        p.kill()
    cluster.etcd.kill()
    cluster.etcd.start()
    for p in cluster.peers:
        p.start()
    assert _read_volume(f"{cluster.peers[1].nbd_uri}/{VOLUME}", cluster.root / "read-d", timeout=60) == model


def test_a_writer_whose_lease_expired_cannot_commit_after_another_took_the_volume(cluster: Cluster) -> None:
    # (e) fencing, with the data path through the real peers
    opts = ClusterOptions(heartbeat_interval=0.5)
    nodes = [
        ClusterNode(cluster.md, f"client-{i}", options=opts, layer_registry=LAYERS).start() for i in range(2)
    ]
    try:
        old = BlockVolume.open(
            cluster.md, nodes[0].distributor, VOLUME, owner="old", lease_ttl=1.0, layer_registry=LAYERS
        )
        old.write_at(0, b"A" * 65536)
        old.sync()
        assert old.keeper is not None
        old.keeper.stop()  # the old client stalls: its lease is no longer renewed
        assert wait_for(lambda: cluster.md.lock_status(VOLUME).locked is False, 10.0)
        new = BlockVolume.open(
            cluster.md, nodes[1].distributor, VOLUME, owner="new", lease_ttl=5.0, layer_registry=LAYERS
        )
        new.write_at(0, b"B" * 65536)
        committed = new.sync()
        with pytest.raises(Locked):
            old.write_at(65536, b"C" * 65536)
            old.sync()
        assert cluster.md.current_inode(new.volume_id) == committed
        assert new.read_at(0, 65536) == b"B" * 65536
        assert new.read_at(65536, 65536) != b"C" * 65536
        old.close()  # a lost volume releases quietly and commits nothing
        assert cluster.md.current_inode(new.volume_id) == committed
        new.close()
    finally:
        for n in nodes:
            n.close()
