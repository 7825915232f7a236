"""Space on a real 3-peer cluster (R = 2) stays bounded under overwrites that are never FLUSHed,
and a truly full cluster answers ENOSPC within seconds instead of hanging (issue 16).

Real etcd, three real ``torusd`` peers (file stores) and fio's nbd engine. Every process is
stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.cluster import parse_peers
from torus_core.metadata import MetadataService
from torus_core.plugins import make_plugin_manager
from torus_core.ring.builtin import builtin_ring_types
from torus_core.ring.codec import ring_from_spec
from torus_core.testing.procs import TorusdProcess, torusctl, wait_for
from torus_core.testing.services import start_etcd

pytestmark = [pytest.mark.timeout(240), pytest.mark.nbd_clients]

MiB = 1 << 20
FAST = (
    *("--heartbeat-interval", "0.5", "--rebalance-interval", "0.2", "--rebalance-settle", "1"),
    *("--gc-grace", "5"),
)


class _Cluster:
    def __init__(self, root: Path, store: str, n: int = 3, extra: tuple[str, ...] = ()) -> None:
        self.root = root
        (root / "etcd").mkdir()
        self.etcd = start_etcd(root / "etcd")
        self.peers: list[TorusdProcess] = []
        backend = make_plugin_manager().collect_registries().metadata.get("etcd").from_url(self.etcd.url)
        self.md = MetadataService(backend, ring_types=builtin_ring_types())
        try:
            torusctl(self.etcd.url, "init", "--block-size", "512KiB", "--replication", "2")
            for i in range(n):
                p = TorusdProcess(self.etcd.url, root / f"peer{i}", size=store, extra=(*FAST, *extra))
                self.peers.append(p)
                p.start()
            ring = lambda: ring_from_spec(self.md.ring_types, self.md.get_ring())  # noqa: E731
            assert wait_for(lambda: len(ring().members()) == n, 30)
        except BaseException:
            self.close()  # the peers started so far and etcd, by PID
            raise

    def used_bytes(self) -> int:
        """Sum of the peers' store usage as their last heartbeats said."""
        return sum(i.used_blocks for i in parse_peers(self.md.list_peers()).values()) * 512 * 1024

    def close(self) -> None:
        for p in self.peers:
            p.stop()
        self.md.close()
        self.etcd.stop()


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="torus-mp-space-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class _Peak:
    """Samples the cluster's store usage every 0.5 s; ``peak`` is the highest seen."""

    def __init__(self, c: _Cluster) -> None:
        self.c = c
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.peak = max(self.peak, self.c.used_bytes())
            except Exception:  # a sample lost to a slow etcd is no failure
                pass

    def close(self) -> int:
        self._stop.set()
        self._t.join(15)
        return self.peak


def fio(uri: str, *args: str, timeout: float = 80) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    proc = subprocess.run(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    try:
        out = json.loads(proc.stdout[proc.stdout.find("{") :])
    except ValueError:
        out = {}
    return proc.returncode, out, proc.stderr


def test_unflushed_overwrites_on_three_peers_get_no_enospc_and_stay_bounded(root: Path) -> None:
    store = 256 * MiB
    c = _Cluster(root, f"{store // MiB}MiB")
    try:
        vol = 64 * MiB
        torusctl(c.etcd.url, "volume", "create-block", "v", str(vol))
        peak = _Peak(c)
        rc, out, err = fio(
            f"{c.peers[0].nbd_uri}/v", "--rw=write", "--bs=1m", "--iodepth=16", "--runtime=15", "--time_based"
        )
        top = peak.close()
        assert rc == 0, err[-2000:] + c.peers[0].log_tail()
        written = out["jobs"][0]["write"]["io_bytes"]
        print(f"written {written / MiB:.0f} MiB, cluster peak {top / MiB:.0f} MiB of {3 * store / MiB:.0f}")
        assert written > 3 * store, f"only {written} bytes written: not a test of reclaim"
        # the writer is gone (its volume closed, the last checkpoint committed): what the
        # overwrites superseded is garbage on every peer and GC gives it back
        live = 2 * vol
        assert wait_for(lambda: c.used_bytes() <= 1.25 * live, 40), f"{c.used_bytes() / MiB:.0f} MiB used"
    finally:
        c.close()


def stop_time_with_a_stalled_peer(root: Path, shutdown_timeout: float) -> tuple[float, int | None]:
    """Two peers (R = 2) and fio writing through peer 0; peer 1 is SIGSTOPped (it answers
    nothing, the writer blocks on it), then peer 0 gets SIGTERM: (seconds it took to exit,
    its exit status; None if it was still running after 60 s)."""
    c = _Cluster(root, "128MiB", n=2, extra=("--shutdown-timeout", str(shutdown_timeout)))
    writer: subprocess.Popen[str] | None = None
    serving, stalled = c.peers
    try:
        torusctl(c.etcd.url, "volume", "create-block", "v", str(32 * MiB))
        writer = subprocess.Popen(
            [
                *("fio", "--name=w", "--ioengine=nbd", f"--uri={serving.nbd_uri}/v", "--rw=randwrite"),
                *("--bs=64k", "--iodepth=8", "--runtime=120", "--time_based", "--fsync=16"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(3)
        assert stalled.pid is not None and serving.pid is not None
        os.kill(stalled.pid, signal.SIGSTOP)
        time.sleep(3)  # the writer is now blocked on the stalled peer
        assert serving.proc is not None
        started = time.monotonic()
        os.kill(serving.pid, signal.SIGTERM)
        try:
            code: int | None = serving.proc.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        return time.monotonic() - started, code
    finally:
        if stalled.pid is not None:
            os.kill(stalled.pid, signal.SIGCONT)
        if writer is not None:
            writer.kill()
            writer.wait(10)
        c.close()


def test_sigterm_stops_torusd_within_its_shutdown_timeout_while_a_writer_is_blocked(root: Path) -> None:
    took, code = stop_time_with_a_stalled_peer(root, 5.0)
    assert code is not None, "torusd still running 60 s after SIGTERM"
    assert took < 5.0 + 3.0, f"SIGTERM took {took:.1f}s (shutdown timeout 5 s)"


def test_a_truly_full_cluster_answers_enospc_within_seconds_instead_of_hanging(root: Path) -> None:
    c = _Cluster(root, "64MiB")  # 3 x 64 MiB at R = 2: 96 MiB of data at most
    try:
        torusctl(c.etcd.url, "volume", "create-block", "v", str(256 * MiB))
        started = time.monotonic()
        rc, _, err = fio(f"{c.peers[0].nbd_uri}/v", "--rw=write", "--bs=1m", "--iodepth=16", "--size=256m")
        took = time.monotonic() - started
        assert rc != 0 and "No space left on device" in err, err[-2000:]
        assert took < 30, f"ENOSPC after {took:.1f}s"
    finally:
        c.close()
