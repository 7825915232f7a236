# mypy: allow-untyped-defs
"""A SIGKILLed single-node ``torusd`` (SQLite + file store), restarted on the same data dir,
serves its volume again at once: it takes over the lock of its own dead incarnation instead of
waiting for the lease. Real processes, real libnbd clients; every process is killed by its PID
and every wait is bounded."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.nbd_clients, pytest.mark.timeout(180)]

BIN = Path(sys.executable).parent
SYSTEM_PYTHON = "/usr/bin/python3"  # has the libnbd ``nbd`` module
TIMEOUT = 60
#: Bound asserted between the restarted server listening and a client being served (its old
#: lease is 30 s here, so only the takeover can meet it).
TAKEOVER_BOUND = 3.0


def _env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORUS_")}
    env["TORUS_METADATA"] = f"sqlite:///{data}/metadata.db"
    return env


def _ctl(data: Path, *args: str) -> str:
    proc = subprocess.run(
        [str(BIN / "torusctl"), "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(data),
    )
    assert proc.returncode == 0, f"torusctl {args}: {proc.stderr}"
    return proc.stdout


class _Torusd:
    """One torusd process; :meth:`start` returns once it printed ``NBD LISTENING``."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.listening_at = 0.0
        self.log = data / "torusd.err"

    def start(self) -> _Torusd:
        self.proc = subprocess.Popen(
            [str(BIN / "torusd"), "--data-dir", str(self.data), "--size", "64MiB", *self.args],
            stdout=subprocess.PIPE,
            stderr=self.log.open("ab"),
            text=True,
            env=_env(self.data),
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.kill()
                pytest.fail(f"torusd exited early: {self.log.read_text()}")
            if line.startswith("NBD LISTENING "):
                self.port = int(line.rsplit(":", 1)[1])
                self.listening_at = time.monotonic()
                return self
            assert time.monotonic() < deadline, "torusd did not report listening"

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture
def procs() -> Iterator[list]:
    """Processes to stop (torusd) or kill (clients) after the test, by PID."""
    started: list = []
    yield started
    for p in reversed(started):
        if isinstance(p, _Torusd):
            p.stop()
        elif p.poll() is None:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


def _client(prog: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-c", prog], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(10)
        raise AssertionError(f"client said nothing: {proc.stderr.read() if proc.stderr else ''}")
    return line


def test_a_sigkilled_torusd_restarted_on_its_data_dir_serves_its_volume_again_at_once(tmp_path, procs):
    data = tmp_path / "data"
    data.mkdir()
    _ctl(data, "init", "--block-size", "64KiB")
    _ctl(data, "volume", "create-block", "demo", "8MiB")
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(300_000))
    args = ("--nbd-listen", "127.0.0.1:0", "--lease-ttl", "30", "--no-gc")
    first = _Torusd(data, *args).start()
    procs.append(first)
    writer = _client(
        f"import nbd, time\nh = nbd.NBD()\nh.connect_uri({first.uri('demo')!r})\n"
        f"h.pwrite(open({str(payload)!r}, 'rb').read(), 12345)\nh.flush()\n"
        "h.pwrite(b'unflushed' * 100, 4 * 1024 * 1024)\nprint('flushed', flush=True)\ntime.sleep(60)\n"
    )
    procs.append(writer)
    assert _line(writer) == "flushed"
    first.kill()  # the writer's connection dies with it
    writer.kill()
    writer.wait(10)

    again = _Torusd(data, *args).start()
    procs.append(again)
    reader = _client(
        "import nbd, time\n"
        "deadline = time.monotonic() + 40\n"
        "while True:\n"
        "    h = nbd.NBD()\n"
        "    try:\n"
        f"        h.connect_uri({again.uri('demo')!r})\n"
        "        break\n"
        "    except nbd.Error as e:\n"
        "        if time.monotonic() > deadline: raise\n"
        "        time.sleep(0.1)\n"
        "print('served', flush=True)\n"
        f"ok = h.pread(300000, 12345) == open({str(payload)!r}, 'rb').read()\n"
        "print('intact' if ok else 'corrupt', flush=True)\n"
    )
    procs.append(reader)
    assert _line(reader) == "served"
    took = time.monotonic() - again.listening_at
    assert _line(reader) == "intact"
    assert took < TAKEOVER_BOUND, f"served {took:.2f} s after the restarted torusd listened"
    log = again.log.read_text()
    assert "broke the lock of 'peer=" in log and "an earlier incarnation of this peer" in log
    print(f"single-node takeover: served {took:.2f} s after the restarted torusd listened")
