"""Latency of one flushed 4 KiB journal record at QD1: cluster replicas vs local references.

Run: ``.venv/bin/python bench/journal.py [--seconds S] [--peers procs|inproc]``

Measured in the same run, each case appending one record (a 4 KiB DATA extent) per call,
one call at a time (QD1), for ``--seconds`` each:

* ``raw write+fdatasync`` -- ``os.write`` + ``os.fdatasync`` of the record's bytes to a file in
  the same directory (the floor of any durable append here);
* ``local JournalStore`` -- :meth:`JournalStore.append` (the single-node journal);
* ``rpc-1 JournalAppend`` -- one ``JournalAppend`` RPC to one peer (transport + its fdatasync);
* ``remote: writer is a replica`` -- :meth:`RemoteJournalReplicas.append` from a ring peer that
  is one of the volume's R=2 replicas (its own fdatasync on a helper thread in parallel with one
  blocking RPC): what a cluster torusd's NBD FLUSH pays for 2 volumes in 3;
  ``same, local fsync inline`` swaps the threads (the RPC on the helper);
* ``remote: writer not a replica`` -- the same from a ring peer that is not among the first R
  (two RPCs in parallel, one on a helper thread); ``same, prefer_local`` places the journal on
  the writer plus the next peer instead (``RemoteJournalReplicas(prefer_local=True)``).
* ``chan-1 append`` -- one append over a peer's journal channel (``torus_core.journal.channel``:
  framed TCP, a kept-open connection) instead of the ``JournalAppend`` RPC; ``chan: ...`` --
  the ``remote`` cases with ``RemoteJournalReplicas`` appending over the peers' channels.

``--e2e`` measures the goal itself instead: etcd and three real ``torusd`` peers (file stores,
R=2, journaling FLUSHes), and ``fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=1
--fsync=1`` against a peer that holds one of the volume's journal replicas and one that does not.

Peers: 3 storage peers, ketama ring R=2. ``--peers procs`` (default) runs two of them as
separate processes (``bench/journal.py --serve``), the third is this process (so the replica
case has a real local store); ``--peers inproc`` runs all three in this process (they then
share its GIL). Printed per case: appends/s, p50/p99 latency, and ratios to the raw and local
references. The goal (issue 8) is >= 1,600 flushed 4 KiB writes/s at QD1 on 3 peers R=2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from torus_core.distributor.peers import PeerDirectory
from torus_core.journal.channel import JournalChannelClient, JournalChannelServer
from torus_core.journal.record import Extent, encode_record
from torus_core.journal.remote import RemoteJournalReplicas, journal_ref
from torus_core.journal.store import JournalStore
from torus_core.ring.base import RingMember
from torus_core.ring.ketama import KetamaRing
from torus_core.rpc.client import PeerClientPool
from torus_core.rpc.options import RPCTimeouts
from torus_core.rpc.server import PeerServer
from torus_core.testing.distributor import mem_store_factory

PAYLOAD = 4096
SELF = "peer-a"


def serve(directory: str, uuid: str) -> None:
    """``--serve``: one storage peer with a journal store; prints its RPC and journal channel
    addresses, runs until stdin closes."""
    store = mem_store_factory()(PAYLOAD, 16)
    journal = JournalStore(directory)
    server = PeerServer(store, uuid=uuid, journal=journal).start()
    chan = JournalChannelServer(journal).start()
    print(server.address, chan.address, flush=True)
    try:
        sys.stdin.read()
    finally:
        chan.stop()
        server.stop(grace=0)
        journal.close()
        store.close()


class Case:
    """One measured operation: ``fn(seq)`` with seq = 1, 2, ... across rounds."""

    def __init__(self, name: str, fn: Callable[[int], object]) -> None:
        self.name = name
        self.fn = fn
        self.seq = 1
        self.latencies: list[float] = []
        self.cpu = 0.0

    def run(self, seconds: float, warmup: int = 20) -> None:
        """Call ``fn`` for ``seconds`` after ``warmup`` untimed calls."""
        for _ in range(warmup):
            self.fn(self.seq)
            self.seq += 1
        cpu0 = time.process_time()
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            self.fn(self.seq)
            t1 = time.perf_counter()
            self.latencies.append(t1 - t0)
            self.seq += 1
            if t1 >= end:
                break
        self.cpu += time.process_time() - cpu0


def record(volume: int, seq: int) -> bytes:
    """One journal record carrying a 4 KiB write."""
    return encode_record(volume, 1, seq, [Extent(seq * PAYLOAD, PAYLOAD, os.urandom(16) * (PAYLOAD // 16))])


def e2e(seconds: float) -> None:
    """``--e2e``: flushed 4 KiB random writes at QD1 through NBD on a real 3-peer cluster."""
    import json
    import shutil

    from torus_core.metadata import MetadataService
    from torus_core.plugins import make_plugin_manager
    from torus_core.ring.codec import ring_from_spec
    from torus_core.testing.procs import TorusdProcess, torusctl, wait_for
    from torus_core.testing.services import start_etcd

    root = Path(tempfile.mkdtemp(prefix="torus-bench-journal-e2e-"))
    (root / "etcd").mkdir()
    etcd = start_etcd(root / "etcd")
    peers: list[TorusdProcess] = []
    md: MetadataService | None = None
    try:
        torusctl(etcd.url, "init", "--replication", "2")
        for i in range(3):
            p = TorusdProcess(
                etcd.url, root / f"peer{i}", size="512MiB", extra=("--heartbeat-interval", "0.5")
            )
            peers.append(p.start())
        regs = make_plugin_manager().collect_registries()
        md = MetadataService(regs.metadata.get("etcd").from_url(etcd.url), ring_types=regs.ring_types)
        assert md is not None
        members = lambda: ring_from_spec(md.ring_types, md.get_ring()).members()  # noqa: E731
        if not wait_for(lambda: len(members()) == 3, 30.0):
            raise SystemExit("the peers did not join the ring")
        torusctl(etcd.url, "volume", "create-block", "vol", "64MiB")
        vid = md.get_volume("vol").id
        owners = ring_from_spec(md.ring_types, md.get_ring()).get_peers(journal_ref(vid)).owners
        by_uuid = {p.uuid: p for p in peers}
        other = next(p for p in peers if p.uuid not in owners)
        print(f"3 torusd R=2, fio 4k randwrite --fsync=1 QD1, {seconds:g} s per run")
        print(f"{'NBD served by':32} {'IOPS':>8} {'write p50 ms':>13} {'flush p50 ms':>13}")
        for label, p in (("a journal replica", by_uuid[owners[0]]), ("a peer that is not a replica", other)):
            cmd = [
                "fio", "--name=journal", "--ioengine=nbd", f"--uri={p.nbd_uri}/vol", "--rw=randwrite",
                "--bs=4k", "--iodepth=1", "--fsync=1", "--size=64M", "--time_based",
                f"--runtime={seconds:g}", "--output-format=json",
            ]  # fmt: skip
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=seconds + 120, check=True
            ).stdout
            job = json.loads(out[out.index("{") :])["jobs"][0]
            write_p50 = job["write"]["clat_ns"]["percentile"]["50.000000"] / 1e6
            sync_p50 = (
                job["sync"]["lat_ns"]["percentile"]["50.000000"] / 1e6 if "sync" in job else float("nan")
            )
            print(f"{label:32} {job['write']['iops']:8.0f} {write_p50:13.3f} {sync_p50:13.3f}")
            # the next client opens the volume on another peer: wait until this one let it go
            wait_for(lambda: not md.lock_status("vol").locked, 30.0)
    finally:
        for p in peers:
            p.stop()
        if md is not None:
            md.close()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="per case, over all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="cases run interleaved, this many times")
    ap.add_argument("--peers", choices=("procs", "inproc"), default="procs")
    ap.add_argument("--e2e", action="store_true", help="fio through NBD on 3 real torusd peers instead")
    ap.add_argument("--serve", nargs=2, metavar=("DIR", "UUID"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    if args.e2e:
        e2e(args.seconds)
        return

    uuids = [SELF, "peer-b", "peer-c"]
    with tempfile.TemporaryDirectory(prefix="torus-bench-journal-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        procs: list[subprocess.Popen[str]] = []
        servers: list[PeerServer] = []
        chans: list[JournalChannelServer] = []
        chan_addresses: dict[str, str] = {}
        stores = []
        journals: dict[str, JournalStore] = {}
        addresses: dict[str, str] = {}
        pool = PeerClientPool(timeouts=RPCTimeouts(journal=10.0))
        try:
            for uuid in uuids:
                if args.peers == "procs" and uuid != SELF:
                    proc = subprocess.Popen(
                        [sys.executable, __file__, "--serve", str(root / uuid / "journal"), uuid],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    procs.append(proc)
                    assert proc.stdout is not None
                    line = proc.stdout.readline().split()
                    if len(line) != 2:
                        raise SystemExit(f"peer {uuid} did not start")
                    addresses[uuid], chan_addresses[uuid] = line
                else:
                    store = mem_store_factory()(PAYLOAD, 16)
                    stores.append(store)
                    journals[uuid] = JournalStore(root / uuid / "journal")
                    server = PeerServer(store, uuid=uuid, journal=journals[uuid]).start()
                    servers.append(server)
                    addresses[uuid] = server.address
                    chans.append(JournalChannelServer(journals[uuid]).start())
                    chan_addresses[uuid] = chans[-1].address
            ring = KetamaRing([RingMember(u, 1024, addresses[u]) for u in uuids], replication=2)
            directory = PeerDirectory(addresses)
            writers: list[RemoteJournalReplicas] = []

            def writer(channels: bool = False, **kwargs: bool) -> RemoteJournalReplicas:
                w = RemoteJournalReplicas(SELF, journals[SELF], lambda: ring, directory, pool)
                for k, v in kwargs.items():
                    setattr(w, k, v)
                if channels:
                    w.channel_address = chan_addresses.get
                writers.append(w)
                return w

            def owned(mine: bool) -> int:
                vol = next(v for v in vols if (SELF in ring.get_peers(journal_ref(v)).owners) == mine)
                return vol

            vols = iter(range(1, 1 << 20))
            local_vol, rpc_vol = next(vols), next(vols)
            rpc_client = pool.get(addresses["peer-b"])
            chan_vol = next(vols)
            chan_client = JournalChannelClient(chan_addresses["peer-b"], timeout=10.0)
            chan_client.fence(chan_vol, 1)

            raw_fd = os.open(root / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            raw_rec = record(9, 1)

            def raw(seq: int) -> None:
                os.write(raw_fd, raw_rec)
                os.fdatasync(raw_fd)

            def appender(w: RemoteJournalReplicas, vol: int) -> Callable[[int], object]:
                w.fence(vol, 1)
                return lambda s: w.append(vol, 1, [record(vol, s)])

            cases = [
                Case("raw write+fdatasync", raw),
                Case(
                    "local JournalStore",
                    lambda s: journals[SELF].append(local_vol, 1, [record(local_vol, s)]),
                ),
                Case(
                    "rpc-1 JournalAppend",
                    lambda s: rpc_client.journal_append(rpc_vol, 1, [record(rpc_vol, s)]),
                ),
                Case("remote: writer is a replica", appender(writer(), owned(True))),
                Case("  same, local fsync inline", appender(writer(local_inline=True), owned(True))),
                Case("remote: writer not a replica", appender(writer(), owned(False))),
                Case("  same, prefer_local", appender(writer(prefer_local=True), owned(False))),
                Case(
                    "chan-1 append",
                    lambda s: chan_client.append(chan_vol, 1, [record(chan_vol, s)]),
                ),
                Case("chan: writer is a replica", appender(writer(True), owned(True))),
                Case("  same, local fsync inline", appender(writer(True, local_inline=True), owned(True))),
                Case("chan: writer not a replica", appender(writer(True), owned(False))),
                Case("  same, prefer_local", appender(writer(True, prefer_local=True), owned(False))),
            ]
            for _ in range(max(1, args.rounds)):
                for case in cases:
                    case.run(args.seconds / max(1, args.rounds))
            os.close(raw_fd)
            for w in writers:
                w.close()
            chan_client.close()
        finally:
            for chan in chans:
                chan.stop()
            pool.close()
            for server in servers:
                server.stop(grace=0)
            for j in journals.values():
                j.close()
            for store in stores:
                store.close()
            for proc in procs:
                if proc.stdin is not None:
                    proc.stdin.close()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    def rate(lat: list[float]) -> float:
        return len(lat) / sum(lat)

    raw_rate = rate(cases[0].latencies)
    local_rate = rate(cases[1].latencies)
    print(
        f"3 peers R=2 ({args.peers}), one {PAYLOAD} B record per append, QD1, "
        f"{args.seconds:g} s per case in {args.rounds} interleaved rounds"
    )
    print(
        f"{'case':30} {'appends/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu us':>7} {'/raw':>6} {'/local':>7}"
    )
    for case in cases:
        lat = case.latencies
        q = statistics.quantiles(lat, n=100)
        r = rate(lat)
        print(
            f"{case.name:30} {r:10.0f} {statistics.median(lat) * 1e3:8.3f} {q[98] * 1e3:8.3f} "
            f"{case.cpu / len(lat) * 1e6:7.0f} {r / raw_rate:6.2f} {r / local_rate:7.2f}"
        )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
