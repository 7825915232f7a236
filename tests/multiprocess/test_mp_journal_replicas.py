"""Volume journals on real peers: a journal replica peer is SIGKILLed mid-stream.

Real etcd, three real ``torusd`` peers (file stores, R = 2, each serving ``<data-dir>/journal``)
and, in this process, a :class:`RemoteJournalReplicas` writer outside the ring. Appends go on
past the killed replica (handed to the next peer of the permutation), every acknowledged record
is found afterwards, the killed peer's records survive the SIGKILL (its journal is fdatasynced
before each acknowledgement), and a new epoch fences the old writer out. Every process is
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

from torus_core.cluster import parse_peers
from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import StaleEpoch
from torus_core.journal.record import Extent, decode_record, encode_record
from torus_core.journal.remote import RemoteJournalReplicas, journal_ref
from torus_core.journal.replicas import select_replay
from torus_core.metadata import MetadataService
from torus_core.plugins import make_plugin_manager
from torus_core.ring.builtin import builtin_ring_types
from torus_core.ring.codec import ring_from_spec
from torus_core.rpc.auth import ClusterKey, PeerAuth
from torus_core.rpc.client import PeerClientPool
from torus_core.rpc.options import RPCTimeouts
from torus_core.testing.cluster import writable_volume
from torus_core.testing.procs import TorusdProcess, torusctl, wait_for
from torus_core.testing.services import start_etcd

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

pytestmark = pytest.mark.timeout(300)

VOL = 42
WORKLOAD = Path(__file__).with_name("nbd_workload.py")
FLUSH_WRITER = Path(__file__).with_name("flush_writer.py")
VOLUME = "vol"
SIZE = 16 * 1024 * 1024
FAST = ("--heartbeat-interval", "0.5", "--rebalance-interval", "0.2", "--rebalance-settle", "1")


def rec(seq: int, epoch: int = 1) -> bytes:
    return encode_record(VOL, epoch, seq, [Extent(seq * 4096, 4096, bytes([seq % 251]) * 4096)])


class _Peers:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "etcd").mkdir()
        self.etcd = start_etcd(root / "etcd")
        self.peers: list[TorusdProcess] = []
        backend = make_plugin_manager().collect_registries().metadata.get("etcd").from_url(self.etcd.url)
        self.md = MetadataService(backend, ring_types=RING_TYPES)

    def start_nbd_volume(self) -> tuple[TorusdProcess, TorusdProcess, TorusdProcess]:
        """Three NBD-serving peers (3 s leases) and the volume; returns the first and second
        journal replica of the volume, then the peer that is not one."""
        torusctl(self.etcd.url, "init", "--block-size", "64KiB", "--replication", "2")
        for i in range(3):
            extra = (*FAST, "--lease-ttl", "3")
            peer = TorusdProcess(self.etcd.url, self.root / f"peer{i}", size="128MiB", extra=extra)
            self.peers.append(peer.start())
        assert wait_for(
            lambda: len(ring_from_spec(self.md.ring_types, self.md.get_ring()).members()) == 3, 30.0
        )
        torusctl(self.etcd.url, "volume", "create-block", VOLUME, str(SIZE))
        vid = self.md.get_volume(VOLUME).id
        by_uuid = {p.uuid: p for p in self.peers}
        replicas = ring_from_spec(self.md.ring_types, self.md.get_ring()).get_peers(journal_ref(vid)).owners
        third = next(p for p in self.peers if p.uuid not in replicas)
        return by_uuid[replicas[0]], by_uuid[replicas[1]], third

    def close(self) -> None:
        for p in self.peers:
            p.stop()
        self.md.close()
        self.etcd.stop()


@pytest.fixture
def cluster() -> Iterator[_Peers]:
    root = Path(tempfile.mkdtemp(prefix="torus-mp-journal-"))
    c = _Peers(root)
    try:
        torusctl(c.etcd.url, "init", "--block-size", "64KiB", "--replication", "2")
        for i in range(3):
            p = TorusdProcess(c.etcd.url, root / f"peer{i}", size="64MiB", nbd=False, extra=FAST)
            c.peers.append(p.start())
        assert wait_for(lambda: len(ring_from_spec(c.md.ring_types, c.md.get_ring()).members()) == 3, 30.0)
        yield c
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def test_sigkilled_journal_replica_is_handed_off_and_its_flushed_records_survive(cluster: _Peers) -> None:
    ring = ring_from_spec(cluster.md.ring_types, cluster.md.get_ring())
    infos = parse_peers(cluster.md.list_peers())
    directory = PeerDirectory({u: i.address for u, i in infos.items() if i.address})
    by_uuid = {p.uuid: p for p in cluster.peers}
    assert set(directory.snapshot()) == set(by_uuid)
    # a member of the cluster (it holds the metadata credential, hence the cluster key) writing
    # the journal of a real, locked volume: peers refuse anything else
    auth = PeerAuth(ClusterKey(cluster.md.cluster_key()), "test-writer")
    pool = PeerClientPool(timeouts=RPCTimeouts(journal=3.0), auth=auth)
    first = writable_volume(cluster.md, VOL, size=SIZE)
    assert first.epoch == 1
    writer = RemoteJournalReplicas("test-writer", None, lambda: ring, directory, pool, timeout=3.0)
    try:
        perm = ring.get_peers(journal_ref(VOL)).peers
        assert writer.fence(VOL, 1) == 0
        for seq in range(1, 11):
            writer.append(VOL, 1, [rec(seq)])
        victim = by_uuid[perm[0]]
        victim.kill()  # SIGKILL: no shutdown, no flush beyond what each append already synced
        for seq in range(11, 21):
            writer.append(VOL, 1, [rec(seq)])  # handed off to perm[2]
        replay = select_replay(writer.read(VOL, 0), 0)
        assert [r.seq for r in replay] == list(range(1, 21))
        assert replay[14].extents[0].data == bytes([15]) * 4096
        handoff = pool.get(directory.address(perm[2]) or "")
        assert [decode_record(b).seq for b in handoff.journal_read(VOL, 0)] == list(range(11, 21))

        victim.start()  # same data dir and port
        back = pool.get(directory.address(perm[0]) or "")
        assert wait_for(lambda: _reachable(back), 30.0), victim.log_tail()
        assert [decode_record(b).seq for b in back.journal_read(VOL, 0)] == list(range(1, 11))

        # a new writer (epoch 2) fences every member and continues after the last record
        cluster.md.leases.revoke(first.lease)
        assert writable_volume(cluster.md, VOL, size=SIZE).epoch == 2
        successor = RemoteJournalReplicas("successor", None, lambda: ring, directory, pool, timeout=3.0)
        try:
            assert successor.fence(VOL, 2) == 20
            with pytest.raises(StaleEpoch):
                writer.append(VOL, 1, [rec(21)])
            successor.append(VOL, 2, [rec(21, epoch=2)])
            assert [r.seq for r in select_replay(successor.read(VOL, 0), 0)] == list(range(1, 22))
        finally:
            successor.close()
    finally:
        writer.close()
        pool.close()


def _reachable(client: object) -> bool:
    try:
        client.ping(timeout=1.0)  # type: ignore[attr-defined]
        return True
    except Exception:
        return False


def _read_volume(uri: str, dest: Path, timeout: float = 60.0) -> bytes:
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


def test_nbd_flushes_survive_a_killed_journal_replica_and_then_the_writer() -> None:
    root = Path(tempfile.mkdtemp(prefix="torus-mp-journal-nbd-"))
    c = _Peers(root)
    try:
        writer, victim, third = c.start_nbd_volume()  # the writer serves NBD; the victim dies under load
        model_file = root / "model"
        work = subprocess.Popen(
            [
                "/usr/bin/python3",
                str(WORKLOAD),
                f"{writer.nbd_uri}/{VOLUME}",
                str(SIZE),
                "6",
                "3",
                str(model_file),
                "4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(2.0)
        victim.kill()
        out, _ = work.communicate(timeout=120)
        assert work.returncode == 0, (
            f"I/O stopped after a journal replica was killed: {out}\n{writer.log_tail(60)}"
        )
        model = model_file.read_bytes()
        # (the third peer took the journal records the dead replica missed; the volume's close
        # checkpointed and trimmed them, so they are gone by now: see the crash test below)
        victim.start()
        # the writer crashes; after its lease runs out the third peer serves the volume, replaying
        # the journal from the surviving replicas
        writer.kill()
        assert _read_volume(f"{third.nbd_uri}/{VOLUME}", root / "read-a") == model, third.log_tail(60)
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def _flush_writes(size: int, seed: int, k: int) -> bytearray:
    """The volume after writes 1..k of flush_writer.py (over zeros)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flush_writer", FLUSH_WRITER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = bytearray(size)
    for i, (offset, data) in enumerate(mod.writes(size, seed)):
        if i >= k:
            break
        out[offset : offset + len(data)] = data
    return out


def test_a_crashed_writer_s_journal_is_replayed_from_the_surviving_replicas() -> None:
    """Flushed writes live only in journals (the NBD connection never closes, so nothing is
    checkpointed at close): a journal replica dies, then the writer; another peer serves the
    volume with every acknowledged write."""
    import threading

    root = Path(tempfile.mkdtemp(prefix="torus-mp-journal-crash-"))
    c = _Peers(root)
    try:
        writer, victim, third = c.start_nbd_volume()
        client = subprocess.Popen(
            ["/usr/bin/python3", str(FLUSH_WRITER), f"{writer.nbd_uri}/{VOLUME}", str(SIZE), "60", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        acked = [0]
        lines: list[str] = []

        def reader() -> None:
            assert client.stdout is not None
            for line in client.stdout:
                lines.append(line.strip())
                if line.startswith("ACK "):
                    acked[0] = int(line.split()[1])

        threading.Thread(target=reader, daemon=True).start()
        try:
            assert wait_for(lambda: acked[0] >= 20, 60.0), lines[-5:]
            victim.kill()
            before = acked[0]
            assert wait_for(lambda: acked[0] >= before + 20, 60.0), (lines[-5:], writer.log_tail(40))
            writer.kill()  # the NBD connection is still open: nothing was checkpointed at close
            client.wait(30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(10)
        k = acked[0]
        victim.start()
        got = _read_volume(f"{third.nbd_uri}/{VOLUME}", root / "read", timeout=90.0)
        # write k + 1 was in flight: it may or may not have made it
        assert got in (bytes(_flush_writes(SIZE, 5, k)), bytes(_flush_writes(SIZE, 5, k + 1))), (
            f"acked {k}; {third.log_tail(60)}"
        )
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)
