# mypy: allow-untyped-defs
"""Space stays bounded on the write path, a truly full store answers ENOSPC quickly, and the
daemons stop on their signals while a writer is blocked (issue 16). Real ``torusd`` processes on
a temp data dir (SQLite + file store), driven by fio's nbd engine and libnbd; every process is
stopped by PID and every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.nbd_clients

BIN = Path(sys.executable).parent
SYSTEM_PYTHON = "/usr/bin/python3"
MiB = 1 << 20
TIMEOUT = 60


def env_for(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORUS_")}
    env["TORUS_METADATA"] = f"sqlite:///{data}/metadata.db"
    return env


def ctl(data: Path, *args: str) -> str:
    proc = subprocess.run(
        [str(BIN / "torusctl"), "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env_for(data),
    )
    if proc.returncode != 0:
        pytest.fail(f"torusctl {args} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


class Torusd:
    """A single-node ``torusd`` with NBD and HTTP on free ports."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.err = data / "torusd.err"
        cmd = [str(BIN / "torusd"), "--data-dir", str(data), "--nbd-listen", "127.0.0.1:0"]
        cmd += ["--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.err.open("wb"), text=True, env=env_for(data)
        )
        self.nbd_port = self.http_port = 0
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while not (self.nbd_port and self.http_port):
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                pytest.fail(f"torusd exited early: {self.err.read_text()}")
            kind, _, addr = line.partition(" LISTENING ")
            if kind == "NBD":
                self.nbd_port = int(addr.rsplit(":", 1)[1])
            elif kind == "HTTP":
                self.http_port = int(addr.rsplit(":", 1)[1])
            assert time.monotonic() < deadline, "torusd did not report listening"

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{name}"

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in body.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise AssertionError(f"no {name} in /metrics")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def daemons() -> Iterator[list[Torusd]]:
    started: list[Torusd] = []
    yield started
    for d in started:
        d.stop()


class PeakSampler:
    """Samples ``torus_store_used_bytes`` every 0.2 s in a thread; ``peak`` is the highest seen."""

    def __init__(self, d: Torusd) -> None:
        self.d = d
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, self.d.metric("torus_store_used_bytes"))

    def close(self) -> float:
        self._stop.set()
        self._thread.join(15)
        return self.peak


def fio(uri: str, *args: str, timeout: float = 80) -> tuple[int, dict[str, object], str]:
    """Run fio's nbd engine; (return code, parsed JSON or {}, stderr)."""
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


def test_unflushed_sequential_overwrites_far_beyond_the_store_get_no_enospc(data, daemons):
    vol = 64 * MiB
    ctl(data, "init", "--block-size", "512KiB")
    ctl(data, "volume", "create-block", "v", str(vol))
    # room for the live data, its committed copy and the documented headroom (docs/durability.md)
    store = 192 * MiB
    d = Torusd(data, "--size", str(store))
    daemons.append(d)
    sampler = PeakSampler(d)
    # ~15 s of 1 MiB sequential writes at QD16 with no FLUSH: dozens of passes over the volume,
    # far more than the store holds if superseded blocks waited for a FLUSH
    rc, out, err = fio(d.uri("v"), "--rw=write", "--bs=1m", "--iodepth=16", "--runtime=15", "--time_based")
    peak = sampler.close()
    assert rc == 0, err[-2000:]
    (job,) = out["jobs"]  # type: ignore[misc]
    written = job["write"]["io_bytes"]
    assert written > 2 * store, f"only {written} bytes written: not a test of reclaim"
    assert job["error"] == 0
    assert "out of space" not in d.err.read_text()
    print(f"peak {peak / MiB:.0f} MiB written {written / MiB:.0f} MiB")
    assert 0 < peak <= store * 0.9, f"store peaked at {peak / MiB:.0f} MiB of {store / MiB:.0f}"


def test_sigint_stops_torusblk_nbdserve_while_a_writer_is_busy(data):
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", str(32 * MiB))
    err = (data / "torusblk.err").open("wb")
    proc = subprocess.Popen(
        [
            str(BIN / "torusblk"),
            "nbdserve",
            "--data-dir",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--size",
            "256MiB",
            "--shutdown-timeout",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env_for(data),
    )
    writer: subprocess.Popen[str] | None = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("NBD LISTENING "), line
        port = int(line.rsplit(":", 1)[1])
        writer = subprocess.Popen(
            [
                "fio",
                "--name=w",
                "--ioengine=nbd",
                f"--uri=nbd://127.0.0.1:{port}/v",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=8",
                "--runtime=60",
                "--time_based",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(3)
        assert writer.poll() is None, "the writer stopped before the signal"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        took = time.monotonic() - started
        assert took < 10 + 2, f"SIGINT took {took:.1f}s"
        assert code == 0, (data / "torusblk.err").read_text()[-2000:]
    finally:
        if writer is not None:
            writer.kill()
            writer.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        err.close()


def test_a_truly_full_store_answers_enospc_within_seconds_without_flushes(data, daemons):
    ctl(data, "init", "--block-size", "512KiB")
    ctl(data, "volume", "create-block", "v", str(128 * MiB))
    d = Torusd(data, "--size", "48MiB")  # less than the volume's data: nothing to reclaim
    daemons.append(d)
    started = time.monotonic()
    rc, _, err = fio(d.uri("v"), "--rw=write", "--bs=1m", "--iodepth=16", "--size=128m")
    took = time.monotonic() - started
    assert rc != 0 and "No space left on device" in err, err[-2000:]
    assert took < 30, f"ENOSPC after {took:.1f}s"
    assert "out of space, answering ENOSPC" in d.err.read_text()
