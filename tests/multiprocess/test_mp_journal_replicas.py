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
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.cluster import parse_peers
from torus_core.cluster.procs import TorusdProcess, torusctl, wait_for
from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import StaleEpoch
from torus_core.journal.record import Extent, decode_record, encode_record
from torus_core.journal.remote import RemoteJournalReplicas, journal_ref
from torus_core.journal.replicas import select_replay
from torus_core.metadata import MetadataService
from torus_core.plugins import make_plugin_manager
from torus_core.ring.codec import ring_from_spec
from torus_core.rpc.client import PeerClientPool
from torus_core.rpc.options import RPCTimeouts
from torus_core.testing.services import start_etcd

pytestmark = pytest.mark.timeout(300)

VOL = 42
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
        self.md = MetadataService(backend)

    def close(self) -> None:
        for p in self.peers:
            p.stop()
        self.md.backend.close()
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
        assert wait_for(lambda: len(ring_from_spec(None, c.md.get_ring()).members()) == 3, 30.0)
        yield c
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def test_sigkilled_journal_replica_is_handed_off_and_its_flushed_records_survive(cluster: _Peers) -> None:
    ring = ring_from_spec(None, cluster.md.get_ring())
    infos = parse_peers(cluster.md.list_peers())
    directory = PeerDirectory({u: i.address for u, i in infos.items() if i.address})
    by_uuid = {p.uuid: p for p in cluster.peers}
    assert set(directory.snapshot()) == set(by_uuid)
    pool = PeerClientPool(timeouts=RPCTimeouts(journal=3.0))
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
