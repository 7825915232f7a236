# mypy: allow-untyped-defs
"""``/metrics`` and ``/healthz`` of real ``torusd`` processes (``--metrics HOST:PORT``).

Real daemons (SQLite + file store; etcd for the readiness test), a real NBD client (libnbd's
Python binding under the system interpreter), scrapes parsed with ``prometheus_client.parser``.
Every process is stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from torus_core.cli.serving import metrics_address
from torus_core.errors import ConfigError, InvalidArgument, UsageError
from torus_core.http import BackgroundProbe, MetricsServer
from torus_core.testing.procs import TorusdProcess, child_env, torusctl, wait_for
from torus_core.testing.services import free_port, start_etcd

pytestmark = pytest.mark.nbd_clients

SYSTEM_PYTHON = "/usr/bin/python3"
DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"
MiB = 1 << 20
VOLUME = "vol"

#: A short NBD workload: 4 MiB written, flushed, read back, a trim, a zeroed range, a FUA write;
#: the connection stays open a little so the volume lease is renewed (--lease-ttl 0.6).
WORKLOAD = """
import nbd, os, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = os.urandom(4 << 20)
for i in range(4):
    h.pwrite(data[i << 20:(i + 1) << 20], i << 20)
h.flush()
for i in range(4):
    assert h.pread(1 << 20, i << 20) == data[i << 20:(i + 1) << 20]
h.trim(1 << 20, 4 << 20)
h.zero(1 << 20, 5 << 20)
h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)
h.flush()
time.sleep(1.0)
h.shutdown()
print("done")
"""


# --- helpers ---------------------------------------------------------------------------------


class Torusd:
    """A single-node ``torusd`` (no peer RPC) on a temp data dir; ``start`` waits for its lines."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> Torusd:
        cmd = [sys.executable, "-m", "torus_core.cli.torusd", "--data-dir", str(self.data), *self.args]
        env = {k: v for k, v in child_env().items() if not k.startswith("TORUS_")}
        env["TORUS_METADATA"] = f"sqlite:///{self.data}/metadata.db"
        err = (self.data / "torusd.err").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        err.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while not {"NBD", "HTTP"} <= set(self.ports):
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                pytest.fail(f"torusd exited early: {(self.data / 'torusd.err').read_text()}")
            kind, _, addr = line.strip().partition(" LISTENING ")
            if addr:
                self.ports[kind] = int(addr.rsplit(":", 1)[1])
            assert time.monotonic() < deadline, "torusd did not report listening"
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def ctl_sqlite(data: Path, *args: str) -> str:
    return torusctl(f"sqlite:///{data}/metadata.db", *args)


def start_workload(uri: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-c", WORKLOAD, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_workload(proc: subprocess.Popen[str]) -> None:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0 and "done" in out, err


def run_workload(uri: str) -> None:
    finish_workload(start_workload(uri))


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of ``GET http://127.0.0.1:port/path`` (error statuses too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening yet (the daemon binds after its peer line)
        return 0, str(exc)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of ``/metrics`` keyed by (sample name, sorted labels)."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_health(port: int, status: int, timeout: float) -> tuple[float, str]:
    """Poll /healthz until it answers ``status``; (seconds it took, body). Fails after ``timeout``."""
    t0 = time.monotonic()
    last = (0, "")
    while time.monotonic() - t0 < timeout:
        last = get(port, "/healthz")
        if last[0] == status:
            return time.monotonic() - t0, last[1]
        time.sleep(0.1)
    pytest.fail(f"/healthz stayed {last} instead of {status} for {timeout} s")


# --- unit-level behaviour ------------------------------------------------------------------------


def test_metrics_flag_accepts_the_older_host_port_spelling_and_refuses_both():
    assert metrics_address("127.0.0.1:9101") == "127.0.0.1:9101"
    assert metrics_address(None, "127.0.0.1", 0) == "127.0.0.1:0"
    assert metrics_address(None, "::1", 9) == "[::1]:9"
    assert metrics_address(None) is None
    with pytest.raises(UsageError):
        metrics_address("127.0.0.1:1", "127.0.0.1", 2)
    with pytest.raises(InvalidArgument):
        metrics_address("127.0.0.1:notaport")


def test_background_probe_reports_a_hung_call_unhealthy_without_blocking_and_recovers():
    hang = [False]

    def probe() -> None:
        while hang[0]:
            time.sleep(0.01)

    p = BackgroundProbe("thing", probe, interval=0.05, timeout=0.2).start()
    try:
        assert wait_for(lambda: p.healthy, 2.0, 0.02)
        hang[0] = True
        t0 = time.monotonic()
        assert wait_for(lambda: not p.healthy, 2.0, 0.02)
        assert time.monotonic() - t0 < 1.0
        t1 = time.monotonic()
        ok, reason = p.status()
        assert time.monotonic() - t1 < 0.05  # reading the status never waits for the probe
        assert not ok and "thing did not answer" in reason
        hang[0] = False
        assert wait_for(lambda: p.healthy, 2.0, 0.02)
    finally:
        hang[0] = False
        p.stop()


def test_background_probe_reports_the_error_of_a_failing_call():
    def probe() -> None:
        raise ConnectionError("refused")

    p = BackgroundProbe("backend", probe, interval=0.05, timeout=0.1)
    p.probe_once()
    assert p.status() == (False, "backend unreachable: ConnectionError: refused")


def test_metrics_endpoint_closes_silent_connections_and_refuses_beyond_its_cap():
    """Idle sockets neither pin a thread each forever nor lock scrapers out: a silent
    connection is closed after the timeout, and past the cap a newcomer gets a 503 at once."""
    http = MetricsServer(CollectorRegistry(), (), "127.0.0.1", 0, timeout=0.5, max_connections=4).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", http.port), timeout=5))
        assert wait_for(lambda: http._httpd.active == 4, 3.0, 0.02)
        with socket.create_connection(("127.0.0.1", http.port), timeout=5) as extra:
            extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply
        t0 = time.monotonic()
        for s in idle:  # the server hangs up on each silent socket after ~0.5 s
            s.settimeout(5)
            assert s.recv(1) == b""
        assert time.monotonic() - t0 < 3.0
        assert wait_for(lambda: http._httpd.active == 0, 3.0, 0.02)
        assert get(http.port, "/healthz") == (200, "ok\n")
    finally:
        for s in idle:
            s.close()
        http.stop()


def test_metrics_endpoint_bind_failure_is_a_config_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:\d+ for /metrics"):
            MetricsServer(CollectorRegistry(), (), "127.0.0.1", taken.getsockname()[1])


# --- real daemons ----------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def test_counters_move_and_histograms_fill_while_a_real_nbd_client_works(data: Path):
    ctl_sqlite(data, "init", "--block-size", "64KiB")
    ctl_sqlite(data, "volume", "create-block", VOLUME, "16MiB")
    d = Torusd(
        data, "--size", "64MiB", "--nbd-listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        "--lease-ttl", "0.6", "--gc-interval", "0.3", "--gc-grace", "0",
    ).start()  # fmt: skip
    try:
        port = d.ports["HTTP"]
        assert get(port, "/healthz") == (200, "ok\n")
        before = scrape(port)
        work = start_workload(f"nbd://127.0.0.1:{d.ports['NBD']}/{VOLUME}")
        try:
            # while the client is still connected (it idles 1 s after its last request), the
            # scrape includes the live connection's counts
            def connected_and_written() -> bool:
                s = scrape(port)
                return (
                    value(s, "torus_nbd_connections") == 1
                    and value(s, "torus_volume_written_bytes_total", volume=VOLUME) == 4 * MiB + 4096
                )

            assert wait_for(connected_and_written, 30.0, 0.05), scrape(port)
            during = scrape(port)
        finally:
            finish_workload(work)
        after = scrape(port)
    finally:
        d.stop()

    def moved(name: str, at_least: float = 1, **labels: str) -> float:
        delta = value(after, name, **labels) - value(before, name, **labels)
        assert delta >= at_least, f"{name}{labels} moved by {delta}, expected >= {at_least}"
        return delta

    # NBD latency per command: counts and bucket samples (the +Inf bucket equals the count)
    for cmd, n in (("write", 5), ("read", 4), ("flush", 2), ("trim", 1), ("write_zeroes", 1)):
        moved("torus_nbd_request_duration_seconds_count", n, cmd=cmd)
        count = value(after, "torus_nbd_request_duration_seconds_count", cmd=cmd)
        assert value(after, "torus_nbd_request_duration_seconds_bucket", cmd=cmd, le="+Inf") == count
        assert value(after, "torus_nbd_request_duration_seconds_sum", cmd=cmd) > 0
    # bytes per volume, as the client moved them
    assert moved("torus_volume_written_bytes_total", volume=VOLUME) == 4 * MiB + 4096
    assert moved("torus_volume_read_bytes_total", volume=VOLUME) == 4 * MiB
    # 2 FLUSH + 1 FUA are 3 syncs; the two after changes commit an INode (a metadata append)
    moved("torus_volume_flush_duration_seconds_count", 3)
    moved("torus_metadata_append_duration_seconds_count", 2, backend="sqlite")
    assert value(after, "torus_metadata_append_duration_seconds_bucket", backend="sqlite", le="+Inf") > 0
    moved("torus_lease_renewals_total", 1, kind="volume")  # 0.2 s keepalives while connected
    moved("torus_gc_cycles_total", 1)
    assert value(after, "torus_nbd_request_errors_total", cmd="write") == 0
    # store gauges from the custom collector
    assert value(after, "torus_store_capacity_bytes") == 64 * MiB
    assert value(after, "torus_store_block_size_bytes") == 64 * 1024
    assert value(after, "torus_store_used_bytes") >= 4 * MiB
    assert value(after, "torus_store_used_blocks") * 64 * 1024 == value(after, "torus_store_used_bytes")
    assert value(after, "torus_volumes") == 1
    assert value(after, "torus_ready") == 1 and value(after, "torus_metadata_reachable") == 1
    # during the workload: one connection on the opened volume, its requests already counted
    assert value(during, "torus_nbd_volume_connections", volume=VOLUME) == 1
    assert value(during, "torus_nbd_open_volumes") == 1
    assert value(during, "torus_nbd_request_duration_seconds_count", cmd="write") >= 5


def test_torusblk_nbdserve_serves_metrics_and_healthz(data: Path):
    ctl_sqlite(data, "init", "--block-size", "64KiB")
    ctl_sqlite(data, "volume", "create-block", VOLUME, "8MiB")
    env = {k: v for k, v in child_env().items() if not k.startswith("TORUS_")}
    env["TORUS_METADATA"] = f"sqlite:///{data}/metadata.db"
    cmd = [sys.executable, "-m", "torus_core.cli.torusblk", "nbdserve", "--data-dir", str(data)]
    cmd += ["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        ports = {}
        deadline = time.monotonic() + 30
        while len(ports) < 2 and time.monotonic() < deadline:
            kind, _, addr = proc.stdout.readline().strip().partition(" LISTENING ")
            if addr:
                ports[kind] = int(addr.rsplit(":", 1)[1])
        assert set(ports) == {"NBD", "HTTP"}, ports
        assert wait_health(ports["HTTP"], 200, 10.0)[1] == "ok\n"
        samples = scrape(ports["HTTP"])
        assert value(samples, "torus_store_block_size_bytes") == 64 * 1024
        assert value(samples, "torus_volumes") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_healthz_is_not_ready_out_of_the_ring_and_while_etcd_is_stopped(tmp_path: Path):
    (tmp_path / "etcd").mkdir()
    etcd = start_etcd(tmp_path / "etcd")
    port = free_port()
    peer = TorusdProcess(
        etcd.url, tmp_path / "peer", size="64MiB", auto_join=False, nbd=False,
        extra=("--metrics", f"127.0.0.1:{port}", "--heartbeat-interval", "0.5"),
    )  # fmt: skip
    try:
        torusctl(etcd.url, "init", "--block-size", "64KiB", "--replication", "1")
        peer.start()
        # not in the ring yet: not ready, and the reason says so
        _, body = wait_health(port, 503, 10.0)
        assert "not in the ring" in body and peer.uuid in body
        torusctl(etcd.url, "peer", "add", peer.uuid)
        wait_health(port, 200, 10.0)
        with etcd.paused():
            took, body = wait_health(port, 503, 15.0)
            assert "metadata backend" in body, body
            assert took < 10.0
            print(f"/healthz not ready {took:.2f} s after etcd was stopped: {body.strip()}")
            # /metrics still answers at once, and says the metadata is unreachable
            t0 = time.monotonic()
            samples = scrape(port)
            assert time.monotonic() - t0 < 3.0
            assert value(samples, "torus_metadata_reachable") == 0 and value(samples, "torus_ready") == 0
        took, _ = wait_health(port, 200, 15.0)
        print(f"/healthz ready again {took:.2f} s after etcd resumed")
        assert value(scrape(port), "torus_ready") == 1
    finally:
        peer.stop()
        etcd.stop()


# --- the Grafana dashboard ---------------------------------------------------------------------------

#: PromQL words that are not metric names.
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "le", "inf", "nan",
}  # fmt: skip


def dashboard_expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and templating queries."""
    exprs: list[str] = []

    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and q:
            exprs.append(q)
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (or a ``label_values(metric, label)`` query)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # dashboard variables
    names: set[str] = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = m.group(0)
        following = text[m.end() :].lstrip()
        if following.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(word)
    if expr.startswith("label_values("):
        names.discard(expr[len("label_values(") :].split(")")[0].split(",")[-1].strip())
    return names


def test_metric_name_extraction_skips_functions_labels_and_variables():
    expr = (
        "histogram_quantile(0.99, sum by (le, cmd) (rate(torus_nbd_request_duration_seconds_bucket"
        '{instance=~"$instance", cmd!="x"}[$__rate_interval]))) / on(instance) torus_ready'
    )
    assert metric_names(expr) == {"torus_nbd_request_duration_seconds_bucket", "torus_ready"}
    assert metric_names("label_values(torus_build_info, instance)") == {"torus_build_info"}


def test_every_metric_of_the_grafana_dashboard_exists_in_a_real_scrape(tmp_path: Path):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_expressions(dashboard)
    assert len(exprs) >= 20
    used = set().union(*(metric_names(e) for e in exprs))
    # a one-peer cluster (SQLite + file store, peer RPC on) so ring/rebalance metrics exist too
    url = f"sqlite:///{tmp_path}/metadata.db"
    torusctl(url, "init", "--block-size", "64KiB", "--replication", "1")
    torusctl(url, "volume", "create-block", VOLUME, "16MiB")
    port = free_port()
    peer = TorusdProcess(
        url, tmp_path / "peer", size="64MiB",
        extra=("--metrics", f"127.0.0.1:{port}", "--heartbeat-interval", "0.5", "--lease-ttl", "0.6",
               "--rebalance-interval", "0.2", "--gc-grace", "0"),
    )  # fmt: skip
    try:
        peer.start()
        wait_health(port, 200, 10.0)
        run_workload(f"{peer.nbd_uri}/{VOLUME}")
        assert wait_for(lambda: value(scrape(port), "torus_rebalance_passes_total") >= 1, 20.0)
        present = {name for name, _labels in scrape(port)}
    finally:
        peer.stop()
    missing = sorted(used - present)
    assert not missing, f"dashboard uses metrics absent from a real scrape: {missing}"
