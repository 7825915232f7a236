"""Peer probes against real peers: every one fails with a typed error and changes nothing.

Real etcd, two real ``torusd`` peers (file stores, R = 2, journal channels) formatted by a real
``torusctl init``, and a real NBD client (libnbd under the system Python) that wrote and
flushed: some of its data is checkpointed into blocks, the rest sits in the peers' journals
while its connection stays open. This process then probes both peers on both peer transports
(gRPC and the journal channel) without the cluster key, and as a member with requests no
honest writer sends. Afterwards the journals hold what they held, the writer still writes and
flushes, and the volume reads back exactly what the writer wrote. Every process is stopped by
its PID; every wait is bounded.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from torus_core.cluster import parse_peers
from torus_core.errors import PeerUnavailable, ReplicaRefused, Unauthenticated
from torus_core.journal.channel import JournalChannelClient
from torus_core.journal.record import Extent, decode_record, encode_record
from torus_core.metadata import MetadataService
from torus_core.plugins import make_plugin_manager
from torus_core.refs import BlockRef, BlockType
from torus_core.ring.builtin import builtin_ring_types
from torus_core.ring.codec import ring_from_spec
from torus_core.rpc import torus_storage_pb2 as pb
from torus_core.rpc.auth import ClusterKey, PeerAuth
from torus_core.rpc.client import PeerClient
from torus_core.rpc.options import RPCTimeouts
from torus_core.testing.procs import TorusdProcess, proc_status_kib, torusctl, wait_for
from torus_core.testing.services import EtcdServer, free_port, start_etcd

pytestmark = pytest.mark.timeout(300)

SYSTEM_PYTHON = "/usr/bin/python3"
VOLUME = "vol"
SIZE = 4 * 1024 * 1024
BS = 64 * 1024
FAST = ("--heartbeat-interval", "0.5", "--rebalance-interval", "0.2", "--rebalance-settle", "1")
TIMEOUTS = RPCTimeouts(get=3.0, put=3.0, check=3.0, ping=3.0, journal=5.0, stream=10.0)
U64_MAX = (1 << 64) - 1

#: NBD writer: ``pattern(i)`` at block i, flush, ``ACK i`` -- one block per stdin line; exits at EOF.
WRITER = textwrap.dedent(
    """
    import sys, nbd
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    for line in sys.stdin:
        i = int(line)
        h.pwrite(bytes([i + 1]) * 65536, i * 65536)
        h.flush()
        print("ACK", i, flush=True)
    h.shutdown()
    """
)


def expected(blocks: list[int]) -> bytes:
    out = bytearray(SIZE)
    for i in blocks:
        out[i * BS : (i + 1) * BS] = bytes([i + 1]) * BS
    return bytes(out)


class Writer:
    """One NBD connection kept open; :meth:`write` writes, flushes and waits for the ACK."""

    def __init__(self, uri: str) -> None:
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", WRITER, uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def write(self, i: int, timeout: float = 30.0) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        assert got and got[0].strip() == f"ACK {i}", f"writer did not acknowledge block {i}: {got}"

    def close(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        assert self.proc.returncode == 0, self.proc.stdout.read() if self.proc.stdout else ""


def read_volume(uri: str, dest: Path, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        dest.unlink(missing_ok=True)
        proc = subprocess.run(["nbdcopy", uri, str(dest)], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return dest.read_bytes()
        if time.monotonic() > deadline:
            raise AssertionError(f"nbdcopy {uri} failed: {proc.stderr}")
        time.sleep(0.5)


@dataclass
class Cluster:
    root: Path
    etcd: EtcdServer
    md: MetadataService
    peers: list[TorusdProcess] = field(default_factory=list)
    rpc: dict[str, str] = field(default_factory=dict)
    chan: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="torus-mp-auth-"))
    (root / "etcd").mkdir()
    etcd = start_etcd(root / "etcd")
    backend = make_plugin_manager().collect_registries().metadata.get("etcd").from_url(etcd.url)
    c = Cluster(root, etcd, MetadataService(backend, ring_types=builtin_ring_types()))
    try:
        torusctl(etcd.url, "init", "--block-size", "64KiB", "--replication", "2")
        for i in range(2):
            extra = (*FAST, "--journal-channel-port", str(free_port()))
            peer = TorusdProcess(etcd.url, root / f"peer{i}", size="128MiB", nbd=(i == 0), extra=extra)
            c.peers.append(peer.start())
        assert wait_for(lambda: len(ring_from_spec(c.md.ring_types, c.md.get_ring()).members()) == 2, 30.0)

        def advertised() -> bool:
            infos = parse_peers(c.md.list_peers())
            c.rpc = {u: i.address for u, i in infos.items() if i.address}
            c.chan = {u: i.journal_address for u, i in infos.items() if i.journal_address}
            return len(c.rpc) == 2 and len(c.chan) == 2

        assert wait_for(advertised, 30.0)
        torusctl(etcd.url, "volume", "create-block", VOLUME, str(SIZE))
        yield c
    finally:
        for p in c.peers:
            p.stop()
        c.md.close()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def _idle_streams(address: str, n: int, release: threading.Event) -> list[grpc.Future]:
    channel = grpc.insecure_channel(address)

    def requests() -> Iterator[pb.PutBlocksRequest]:
        release.wait(30.0)
        return
        yield

    call = channel.stream_unary(
        "/torus.rpc.v1.TorusStorage/PutBlockStream",
        request_serializer=pb.PutBlocksRequest.SerializeToString,
        response_deserializer=pb.PutBlocksResponse.FromString,
    )
    return [call.future(requests(), timeout=20.0) for _ in range(n)]


def test_probes_without_the_cluster_key_or_outside_what_a_writer_sends_change_nothing(
    cluster: Cluster,
) -> None:
    vid = cluster.md.get_volume(VOLUME).id
    nbd_uri = f"{cluster.peers[0].nbd_uri}/{VOLUME}"
    # a first session writes block 0 and closes: checkpointed into blocks and a committed INode
    first = Writer(nbd_uri)
    first.write(0)
    first.close()
    writer = Writer(nbd_uri)  # the second session's flushes stay in the journals
    member_auth = PeerAuth(ClusterKey(cluster.md.cluster_key()), "test-member")
    clients: list[PeerClient | JournalChannelClient] = []

    def client(address: str, auth: PeerAuth | None = None) -> PeerClient:
        c = PeerClient(address, timeouts=TIMEOUTS, auth=auth)
        clients.append(c)
        return c

    def chan(address: str, auth: PeerAuth | None = None) -> JournalChannelClient:
        c = JournalChannelClient(address, timeout=5.0, auth=auth)
        clients.append(c)
        return c

    try:
        writer.write(1)
        state = cluster.md.state().volumes[vid]
        inode_block = BlockRef(vid, state.inode.inode, 1, BlockType.INODE)
        before = {u: client(a, member_auth).journal_read(vid, 0) for u, a in cluster.rpc.items()}
        assert all(before.values()), "the open session's flush is in both peers' journals"
        assert any(client(a, member_auth).rebalance_check([inode_block])[0] for a in cluster.rpc.values())
        journal_dirs = {
            p.uuid: sorted(x.name for x in (p.data_dir / "journal").iterdir()) for p in cluster.peers
        }
        own_record = encode_record(vid, state.lock_epoch, 10_000, [Extent(0, BS, b"\xee" * BS)])

        for uuid, address in cluster.rpc.items():
            anonymous = client(address)
            stranger = client(address, PeerAuth(ClusterKey.generate(), "stranger"))
            member = client(address, member_auth)
            anon_chan = chan(cluster.chan[uuid])
            member_chan = chan(cluster.chan[uuid], member_auth)
            for c in (anonymous, stranger):
                # read every block and journal record
                with pytest.raises(Unauthenticated):
                    c.get_block(inode_block)
                with pytest.raises(Unauthenticated):
                    c.journal_read(vid, 0)
                # append a record putting its own bytes at offset 0
                with pytest.raises(Unauthenticated):
                    c.journal_append(vid, state.lock_epoch, [own_record])
                # trim after the acknowledged flush
                with pytest.raises(Unauthenticated):
                    c.journal_trim(vid, state.lock_epoch, U64_MAX)
                # fence at 2^64 - 1
                with pytest.raises(Unauthenticated):
                    c.journal_fence(vid, U64_MAX)
                # store blocks under future INode refs
                with pytest.raises(Unauthenticated):
                    c.put_blocks([BlockRef(vid, state.inode.inode + 100, i) for i in range(1, 4)], [b"f"] * 3)
                with pytest.raises(Unauthenticated):
                    c.put_block_stream([(BlockRef(vid, state.inode.inode + 101, 1), b"f")])
            with pytest.raises(Unauthenticated):
                anon_chan.append(vid, state.lock_epoch, [own_record])
            with pytest.raises(Unauthenticated):
                anon_chan.trim(vid, state.lock_epoch, U64_MAX)
            with pytest.raises(Unauthenticated):
                anon_chan.fence(vid, U64_MAX)
            # a member's fence at an epoch that is not the lock's is refused too, on both transports
            with pytest.raises(ReplicaRefused):
                member.journal_fence(vid, U64_MAX)
            with pytest.raises(ReplicaRefused):
                member_chan.fence(vid, U64_MAX)
            with pytest.raises(ReplicaRefused):
                member_chan.fence(U64_MAX >> 30, 1)  # a volume that does not exist: no directory
            # a member's trim after the acknowledged flush (past the last checkpoint) is refused
            flushed = max(decode_record(r).seq for r in before[uuid])
            with pytest.raises(ReplicaRefused, match="checkpoint"):
                member.journal_trim(vid, state.lock_epoch, flushed)
            with pytest.raises(ReplicaRefused, match="checkpoint"):
                member_chan.trim(vid, state.lock_epoch, U64_MAX)
            assert (
                member.rebalance_check(
                    [BlockRef(vid, state.inode.inode + 100, i) for i in range(1, 4)]
                    + [BlockRef(vid, state.inode.inode + 101, 1)]
                )
                == [False] * 4
            )

        # 24 idle streaming calls per peer: refused at once, and the peer keeps serving
        release = threading.Event()
        streams = [f for a in cluster.rpc.values() for f in _idle_streams(a, 24, release)]
        try:
            t0 = time.monotonic()
            for f in streams:
                err = f.exception(timeout=10.0)
                assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            for a in cluster.rpc.values():
                t1 = time.monotonic()
                client(a, member_auth).ping(timeout=2.0)
                assert time.monotonic() - t1 < 2.0
            assert time.monotonic() - t0 < 15.0
        finally:
            release.set()
            for f in streams:
                f.cancel()

        # 192 MiB of journal for a volume that does not exist: refused record by record
        ghost = vid + 1000
        big = encode_record(ghost, 1, 1, [Extent(0, 48 << 20, b"\x55" * (48 << 20))])
        by_uuid = {p.uuid: p for p in cluster.peers}
        for uuid, address in cluster.chan.items():
            anon_chan = chan(address)
            member_chan = chan(address, member_auth)
            with pytest.raises(Unauthenticated):
                anon_chan.append(ghost, 1, [big])
            pid = by_uuid[uuid].pid
            assert pid is not None
            for _ in range(4):
                with pytest.raises(ReplicaRefused, match="does not exist"):
                    member_chan.append(ghost, 1, [big])
            with pytest.raises(ReplicaRefused, match="does not exist"):
                client(cluster.rpc[uuid], member_auth).journal_read(ghost, 0)
            rss_mib = proc_status_kib(pid, "VmRSS") / 1024
            assert rss_mib < 700, f"peer {uuid} RSS {rss_mib:.0f} MiB after the refused appends"

        # nothing changed: the journals, the journal directories, the writer, the data
        after = {u: client(a, member_auth).journal_read(vid, 0) for u, a in cluster.rpc.items()}
        assert {u: [decode_record(r).seq for r in rs] for u, rs in after.items()} == {
            u: [decode_record(r).seq for r in rs] for u, rs in before.items()
        }
        assert {
            p.uuid: sorted(x.name for x in (p.data_dir / "journal").iterdir()) for p in cluster.peers
        } == journal_dirs
        writer.write(2)  # still the volume's writer: no fence took the volume away
        writer.close()
        assert read_volume(nbd_uri, cluster.root / "read") == expected([0, 1, 2])
        # and the honest writer's own trims (after each checkpoint) were all accepted
        for p in cluster.peers:
            log_text = (p.data_dir / "torusd.log").read_text()
            assert "trimming the journal" not in log_text, p.log_tail(20)
    finally:
        for c in clients:
            c.close()
        if writer.proc.poll() is None:
            writer.proc.kill()
            writer.proc.wait(10)


def test_a_peer_without_the_cluster_key_cannot_join_the_data_path(cluster: Cluster) -> None:
    """Every peer call of a real torusd demands the key: a process that only knows the peer
    addresses (not the metadata credential) gets Unauthenticated from each, and Ping too."""
    for address in cluster.rpc.values():
        c = PeerClient(address, timeouts=TIMEOUTS)
        try:
            with pytest.raises(Unauthenticated):
                c.ping()
            with pytest.raises(PeerUnavailable):  # what the distributor routes around
                c.flush()
        finally:
            c.close()
