# mypy: allow-untyped-defs
"""``torusd`` and ``torusblk nbdserve`` as real subprocesses on a temp data dir (SQLite + file
store), driven by torusctl and real NBD clients. Every process is stopped by PID, every wait is
bounded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.journal.store import SEGMENT_CHUNK

pytestmark = pytest.mark.nbd_clients

BIN = Path(sys.executable).parent
SYSTEM_PYTHON = "/usr/bin/python3"
MiB = 1 << 20
TIMEOUT = 60


def env_for(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORUS_")}
    env["TORUS_METADATA"] = f"sqlite:///{data}/metadata.db"
    return env


def ctl(data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "torusctl"), "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env_for(data),
    )
    if check and proc.returncode != 0:
        pytest.fail(f"torusctl {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def run(*cmd: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


class Daemon:
    """A torusd (or torusblk) process; ``start`` waits for its LISTENING lines."""

    def __init__(self, data: Path, *args: str, program: str = "torusd") -> None:
        self.data = data
        self.args = args
        self.program = program
        self.proc: subprocess.Popen[str] | None = None
        self.nbd_port = 0
        self.http_port = 0
        self.err = data / f"{program}.err"

    def start(self, expect: tuple[str, ...] = ("NBD",)) -> Daemon:
        cmd = [str(BIN / self.program)]
        if self.program == "torusblk":
            cmd.append("nbdserve")
        cmd += ["--data-dir", str(self.data), *self.args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.err.open("wb"), text=True, env=env_for(self.data)
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        waiting = set(expect)
        while waiting:
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                pytest.fail(f"{self.program} exited early: {self.err.read_text()}")
            kind, _, addr = line.partition(" LISTENING ")
            if kind in waiting:
                port = int(addr.rsplit(":", 1)[1])
                if kind == "NBD":
                    self.nbd_port = port
                else:
                    self.http_port = port
                waiting.discard(kind)
            assert time.monotonic() < deadline, f"{self.program} did not report listening"
        return self

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{name}"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def volume_status(data: Path, name: str) -> str:
    for line in ctl(data, "volume", "list", "--csv").stdout.splitlines():
        fields = line.split(",")
        if fields[0] == name:
            return fields[3]
    pytest.fail(f"volume {name} not listed")


def wait_status(data: Path, name: str, status: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while volume_status(data, name) != status:
        assert time.monotonic() < deadline, f"volume {name} never became {status}"
        time.sleep(0.2)


def test_unformatted_cluster_without_debug_init_fails_with_a_clear_message(data):
    proc = subprocess.run(
        [str(BIN / "torusd"), "--data-dir", str(data), "--nbd-listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env_for(data),
    )
    assert proc.returncode == 1
    assert "not formatted" in proc.stderr and "--debug-init" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_init_formats_then_serves_volumes_with_advertised_features(data, daemons):
    d = Daemon(
        data,
        "--size",
        "64MiB",
        "--debug-init",
        "--nbd-listen",
        "127.0.0.1:0",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    )
    daemons.append(d.start(expect=("NBD", "HTTP")))
    ctl(data, "volume", "create-block", "disk", "16MiB")
    info = json.loads(run("nbdinfo", "--json", d.uri("disk")).stdout)
    (exp,) = info["exports"]
    assert exp["export-size"] == 16 * MiB and info["structured"] is True
    for key in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"):
        assert exp[key] is True, key
    assert exp["block_size_preferred"] == 512 * 1024  # the --debug-init cluster block size
    body = urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10).read().decode()
    assert "torus_volumes 1.0" in body and "torus_store_block_size_bytes 524288.0" in body


def test_run_single_node_command_line_round_trips_data_and_sigterm_releases(data, daemons, tmp_path):
    ctl(data, "init", "--block-size", "64KiB", "--if-needed")
    ctl(data, "volume", "create-block", "demo", "8MiB", "--if-missing")
    d = Daemon(data, "--size", "64MiB", "--block-store", "file", "--nbd-listen", "127.0.0.1:0")
    daemons.append(d.start())
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(3 * MiB))
    run("nbdcopy", str(src), d.uri("demo"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), d.uri("demo"))
    run("nbdcopy", d.uri("demo"), str(back))
    assert back.read_bytes()[: 3 * MiB] == src.read_bytes()
    with Holder(d.uri("demo")):
        assert volume_status(data, "demo") == "in-use"
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert volume_status(data, "demo") == "free"
    # the data dir is free again: torusctl can dump the volume straight from the file store
    ctl(data, "block", "dump", "demo", str(tmp_path / "dump.img"))
    assert (tmp_path / "dump.img").read_bytes()[: 3 * MiB] == src.read_bytes()


class Holder:
    """A libnbd client that connects, writes a little and keeps the connection open."""

    def __init__(self, uri: str) -> None:
        prog = (
            f"import nbd, time\nh = nbd.NBD()\nh.connect_uri({uri!r})\n"
            "h.pwrite(b'h' * 512, 8 * 1024 * 1024 - 512)\nprint('up', flush=True)\ntime.sleep(30)\n"
        )
        self.proc = subprocess.Popen([SYSTEM_PYTHON, "-c", prog], stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> Holder:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "up"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_flushed_data_survives_sigkill_of_torusd(data, daemons, tmp_path):
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "8MiB")
    args = ("--size", "64MiB", "--nbd-listen", "127.0.0.1:0", "--lease-ttl", "1")
    d = Daemon(data, *args)
    daemons.append(d.start())
    pfile = tmp_path / "payload.bin"
    pfile.write_bytes(os.urandom(300_000))
    prog = (
        f"import nbd, time\nh = nbd.NBD()\nh.connect_uri({d.uri('v')!r})\n"
        f"h.pwrite(open({str(pfile)!r}, 'rb').read(), 12345)\nh.flush()\nh.pwrite(b'lost' * 1000, 0)\n"
        "print('flushed', flush=True)\ntime.sleep(30)\n"
    )
    client = subprocess.Popen([SYSTEM_PYTHON, "-c", prog], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "flushed"
        d.signal(signal.SIGKILL)
        d.wait()
    finally:
        client.kill()
        client.wait(10)
    again = Daemon(data, *args)
    daemons.append(again.start())
    wait_status(data, "v", "free")  # the dead holder's 1 s lease runs out
    prog2 = (
        f"import nbd\nh = nbd.NBD()\nh.connect_uri({again.uri('v')!r})\n"
        f"assert h.pread(300000, 12345) == open({str(pfile)!r}, 'rb').read()\nprint('intact')\n"
    )
    assert run(SYSTEM_PYTHON, "-c", prog2).stdout.strip() == "intact"


def test_killed_client_releases_the_lock_within_bounded_time(data, daemons):
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "8MiB")
    d = Daemon(data, "--size", "64MiB", "--nbd-listen", "127.0.0.1:0")
    daemons.append(d.start())
    holder = Holder(d.uri("v"))
    with holder:
        assert volume_status(data, "v") == "in-use"
        os.kill(holder.proc.pid, signal.SIGKILL)
    wait_status(data, "v", "free", timeout=15)


def test_torusblk_nbdserve_serves_volumes_and_snapshots_read_only(data, daemons, tmp_path):
    ctl(data, "init", "--block-size", "64KiB")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    ctl(data, "block", "load", str(src), "v", "4MiB")
    ctl(data, "block", "snapshot", "create", "v@s")
    d = Daemon(data, "--listen", "127.0.0.1:0", "--size", "64MiB", program="torusblk")
    daemons.append(d.start())
    info = json.loads(run("nbdinfo", "--json", d.uri("v@s")).stdout)
    assert info["exports"][0]["is_read_only"] is True
    back = tmp_path / "back.img"
    run("nbdcopy", d.uri("v@s"), str(back))
    assert back.read_bytes()[:MiB] == src.read_bytes() and back.stat().st_size == 4 * MiB
    d.signal(signal.SIGINT)
    assert d.wait() == 0


# --- single-node garbage collection ------------------------------------------------------------


def used_blocks(d: Daemon) -> int:
    body = urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith("torus_store_used_blocks "):
            return int(float(line.split()[1]))
    raise AssertionError(f"no torus_store_used_blocks in /metrics:\n{body}")


def wait_used(d: Daemon, predicate, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        used = used_blocks(d)
        if predicate(used) or time.monotonic() > deadline:
            return used
        time.sleep(0.2)


def test_superseded_blocks_are_reclaimed_and_snapshots_and_current_data_survive(
    data, daemons, tmp_path: Path
):
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "vol", "4MiB")
    d = Daemon(
        data, "--size", "64MiB", "--nbd-listen", "127.0.0.1:0", "--host", "127.0.0.1", "--port", "0",
        "--gc-grace", "0", "--gc-interval", "0.3",
    )  # fmt: skip
    daemons.append(d.start(expect=("NBD", "HTTP")))
    first, latest = tmp_path / "first.img", tmp_path / "latest.img"
    first.write_bytes(os.urandom(2 * MiB))
    run("nbdcopy", str(first), d.uri("vol"))  # 32 data blocks + INode blocks
    ctl(data, "block", "snapshot", "create", "vol@keep")
    for _ in range(4):  # each copy supersedes every data block of the previous one
        latest.write_bytes(os.urandom(2 * MiB))
        run("nbdcopy", str(latest), d.uri("vol"))
    # Live: 32 blocks of the snapshot + 32 current + a few INode blocks; 3 full copies are garbage.
    used = wait_used(d, lambda n: n <= 64 + 8)
    assert used <= 64 + 8, f"GC left {used} blocks"
    assert used >= 64, f"GC deleted live blocks: only {used} remain"
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(latest), d.uri("vol"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(first), d.uri("vol@keep"))


# --- flush-heavy workloads: the write journal and space reclamation (issues 8 and 11) ---------

FLUSH_WRITER = Path(__file__).parent / "multiprocess" / "flush_writer.py"


def load_flush_writer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("flush_writer", FLUSH_WRITER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected_after(size: int, seed: int, n: int, max_len: int | None = None) -> bytearray:
    model = bytearray(size)
    gen = load_flush_writer().writes(size, seed, max_len)
    for _ in range(n):
        off, chunk = next(gen)
        model[off : off + len(chunk)] = chunk
    return model


def read_volume(uri: str, size: int, out: Path) -> bytes:
    run("nbdcopy", uri, str(out), timeout=120)
    return out.read_bytes()[:size]


def test_sigkill_during_flush_after_every_write_keeps_every_acknowledged_write(data, daemons, tmp_path):
    size = 8 * MiB
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", str(size))
    args = ("--size", "64MiB", "--nbd-listen", "127.0.0.1:0")
    d = Daemon(data, *args)
    daemons.append(d.start())
    seed = 11
    writer = subprocess.Popen(
        [SYSTEM_PYTHON, str(FLUSH_WRITER), d.uri("v"), str(size), "60", str(seed), "65536"],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked = 0
    try:
        assert writer.stdout is not None
        deadline = time.monotonic() + 30
        while acked < 300 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            assert line.startswith("ACK "), line
            acked = int(line.split()[1])
        d.signal(signal.SIGKILL)  # mid-workload: a write and its flush are in flight
        d.wait()
        for line in writer.stdout:
            if line.startswith("ACK "):
                acked = int(line.split()[1])
    finally:
        writer.kill()
        writer.wait(10)
    assert acked >= 300
    again = Daemon(data, *args)
    daemons.append(again.start())  # the restarted node takes over its own lock and replays
    got = read_volume(again.uri("v"), size, tmp_path / "after.img")
    # every acknowledged write is there; the one write in flight may or may not be (whole)
    candidates = [expected_after(size, seed, acked, 65536), expected_after(size, seed, acked + 1, 65536)]
    assert any(got == bytes(c) for c in candidates), "acknowledged writes lost or a write torn"
    assert "replayed" in again.err.read_text()


def test_flush_heavy_random_writes_never_hit_enospc_and_usage_is_reported(data, daemons, tmp_path):
    size = 32 * MiB
    ctl(data, "init", "--block-size", "512KiB")
    ctl(data, "volume", "create-block", "v", str(size))
    # the store holds the volume 3 times: live data plus checkpoint headroom (docs/durability.md)
    d = Daemon(data, "--size", "96MiB", "--nbd-listen", "127.0.0.1:0")
    daemons.append(d.start())
    seed = 5
    out = run(SYSTEM_PYTHON, str(FLUSH_WRITER), d.uri("v"), str(size), "20", str(seed), timeout=90)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("DONE ") and last.endswith("errors=0"), last
    n = int(last.split()[1])
    assert n > 200
    got = read_volume(d.uri("v"), size, tmp_path / "v.img")
    assert got == bytes(expected_after(size, seed, n))
    assert "out of space" not in d.err.read_text()
    # the clients are gone, so the volume was closed: its journal folded into blocks. The single
    # node registers its store usage every 5 s.
    deadline = time.monotonic() + 30
    while True:
        listing = ctl(data, "peer", "list").stdout
        usage = listing.strip().splitlines()[-1]
        if "single" in listing and "Usage: 0 B/" not in usage:
            break
        assert time.monotonic() < deadline, listing
        time.sleep(0.5)
    assert "/96.0 MiB" in usage, usage
    row = next(line for line in listing.splitlines() if "single" in line)
    assert row.split()[-2:] == ["-", "-"], row  # no rebalancing and no replicas to count


def single_row(data: Path) -> list[str]:
    """The ``single`` row of ``peer list --csv`` ([] before the first heartbeat)."""
    lines = ctl(data, "peer", "list", "--csv").stdout.splitlines()
    assert lines[0] == "ADDRESS,UUID,SIZE,USED,JOURNAL,MEMBER,UPDATED,REB/REP DATA,UNDER-REP", lines
    return next((f for f in (line.split(",") for line in lines[1:]) if f[5] == "single"), [])


def metric(d: Daemon, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics:\n{body}")


def test_flushed_writes_show_in_the_journal_column_before_the_checkpoint(data, daemons, tmp_path):
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "8MiB")
    d = Daemon(data, "--size", "64MiB", "--nbd-listen", "127.0.0.1:0", "--host", "127.0.0.1", "--port", "0")
    daemons.append(d.start(expect=("NBD", "HTTP")))
    prog = (
        f"import nbd, time\nh = nbd.NBD()\nh.connect_uri({d.uri('v')!r})\n"
        "h.pwrite(b'j' * 262144, 65536)\nh.flush()\nprint('flushed', flush=True)\ntime.sleep(60)\n"
    )
    client = subprocess.Popen([SYSTEM_PYTHON, "-c", prog], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "flushed"
        flushed = time.monotonic()
        # the records wait in the journal until the checkpoint 30 s after the volume opened; the
        # single node's heartbeat (every 5 s) publishes the journal's disk space well before that
        while not (row := single_row(data)) or row[4] == "0":
            assert time.monotonic() - flushed < 20, row
            time.sleep(0.5)
        assert int(row[4]) >= SEGMENT_CHUNK and int(row[4]) % SEGMENT_CHUNK == 0, row
        assert metric(d, "torus_journal_disk_bytes") >= SEGMENT_CHUNK
        table = ctl(data, "peer", "list").stdout
        assert table.splitlines()[-1].endswith("Journal: 8.0 MiB"), table
    finally:
        client.kill()
        client.wait(10)
    # the client is gone: the volume closes, its last checkpoint trims the journal to nothing
    deadline = time.monotonic() + 30
    while (row := single_row(data))[4] != "0":
        assert time.monotonic() < deadline, row
        time.sleep(0.5)
    assert metric(d, "torus_journal_disk_bytes") == 0


def test_a_data_dir_reused_after_wipe_and_init_never_replays_the_old_clusters_journal(
    data, daemons, tmp_path
):
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "4MiB")
    args = ("--size", "64MiB", "--nbd-listen", "127.0.0.1:0")
    d = Daemon(data, *args)
    daemons.append(d.start())
    prog = (
        f"import nbd\nh = nbd.NBD()\nh.connect_uri({d.uri('v')!r})\n"
        "h.pwrite(b'old cluster' * 100, 0)\nh.flush()\nprint('flushed', flush=True)\n"
        "import time\ntime.sleep(30)\n"
    )
    client = subprocess.Popen([SYSTEM_PYTHON, "-c", prog], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "flushed"
        d.signal(signal.SIGKILL)  # the record stays in the journal, never folded in
        d.wait()
    finally:
        client.kill()
        client.wait(10)
    ctl(data, "wipe", "--yes-i-am-sure")
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "4MiB")  # volume id 1 again
    again = Daemon(data, *args)
    daemons.append(again.start())
    assert read_volume(again.uri("v"), 4 * MiB, tmp_path / "v.img") == bytes(4 * MiB)


def test_a_store_too_small_for_the_data_answers_enospc_and_logs_it_once(data, daemons, tmp_path):
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "16MiB")
    d = Daemon(data, "--size", "4MiB", "--nbd-listen", "127.0.0.1:0")
    daemons.append(d.start())
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 * MiB))
    out = run("nbdcopy", "--flush", str(src), d.uri("v"), check=False, timeout=120)
    assert out.returncode != 0
    assert "No space left on device" in out.stderr or "ENOSPC" in out.stderr, out.stderr
    log = d.err.read_text()
    assert log.count("out of space, answering ENOSPC") == 1, log[-2000:]
    assert "store holds" in log and "volume 'v'" in log


def test_torusd_of_another_cluster_refuses_a_data_dir_and_names_its_cluster(data, daemons, tmp_path):
    """Cluster C's server must not open cluster A's data dir: C's GC would delete A's blocks."""
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "4MiB")
    args = ("--size", "16MiB", "--nbd-listen", "127.0.0.1:0")
    d = Daemon(data, *args)
    daemons.append(d.start())
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    run("nbdcopy", "--flush", str(src), d.uri("v"))
    d.stop()
    cluster_a = (data / "metadata" / "cluster").read_text().strip()
    assert cluster_a
    other = f"sqlite:///{tmp_path}/c.db"  # cluster C: same block size, its own metadata
    ctl(data, "--metadata", other, "init", "--block-size", "64KiB")
    proc = subprocess.run(
        [str(BIN / "torusd"), "--data-dir", str(data), "--metadata", other, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env_for(data),
    )
    assert proc.returncode == 1, proc.stderr
    assert f"belongs to cluster {cluster_a}" in proc.stderr and "Traceback" not in proc.stderr
    again = Daemon(data, *args)  # A's own server still opens it, with A's data intact
    daemons.append(again.start())
    assert read_volume(again.uri("v"), MiB, tmp_path / "v.img") == src.read_bytes()


def test_everything_torusd_writes_in_its_data_dir_is_private_to_its_user(data, daemons, tmp_path):
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "8MiB")
    d = Daemon(data, "--size", "16MiB", "--nbd-listen", "127.0.0.1:0")
    daemons.append(d.start())
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    with Holder(d.uri("v")):  # the volume open: its journal segment exists
        run("nbdcopy", "--flush", str(src), d.uri("v"))
        found = [p for p in data.rglob("*") if p.name != "torusd.err"]
        names = {p.name for p in found}
        assert {"data.blk", "index.blk", "metadata.db", "uuid", "cluster"} <= names, names
        assert any(p.suffix == ".seg" for p in found), names
        loose = {str(p.relative_to(data)): oct(p.stat().st_mode & 0o777) for p in found}
        loose = {k: v for k, v in loose.items() if v not in ("0o600", "0o700")}
        assert not loose, loose


def torusd_once(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a torusd that is expected to refuse its command line (bounded by TIMEOUT)."""
    return subprocess.run(
        [str(BIN / "torusd"), "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env_for(data),
    )


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("0", "--size must be greater than 0"),
        ("10000000TiB", "is larger than a file can be"),
        ("100TiB", "too large for the file system"),  # ext4's files end at 16 TiB
    ],
)
def test_a_store_size_that_cannot_work_is_a_clear_error_and_leaves_the_store_usable(
    data, daemons, size, message
):
    if size == "100TiB" and _fs_accepts(data, 100 << 40):
        pytest.skip("this file system stores a 100 TiB sparse file")
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "4MiB")
    proc = torusd_once(data, "--size", size, "--nbd-listen", "127.0.0.1:0")
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    d = Daemon(data, "--size", "16MiB", "--nbd-listen", "127.0.0.1:0")  # the store is not poisoned
    daemons.append(d.start())
    run("nbdinfo", d.uri("v"))


def _fs_accepts(directory: Path, size: int) -> bool:
    probe = directory / "probe"
    try:
        with probe.open("wb") as fh:
            fh.truncate(size)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "bad",
    [
        ("--size", "0"),
        ("--auto-join",),
        ("--nbd-listen", "127.0.0.1:http"),
        ("--aoe", "not-a-spec"),
        ("--tls-cert", "c.pem"),
        ("--peer-address", "127.0.0.1:0", "--rebalance-rate", "fast"),
    ],
)
def test_debug_init_formats_nothing_when_another_option_is_bad(data, bad):
    proc = torusd_once(data, "--debug-init", "--size", "16MiB", *bad)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    view = ctl(data, "init", "--view", check=False)
    assert view.returncode == 1 and "not formatted" in view.stderr, (bad, view.stdout)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs (a disk that really fills up), unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, timeout=30
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def healthz(d: Daemon) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/healthz", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_full_disk_answers_enospc_keeps_reads_working_and_fails_healthz(small_fs, daemons, tmp_path):
    """The data dir's file system (64 MiB) is smaller than the store (--size 128MiB) and the
    volume's data: the writer gets ENOSPC (not EIO), the metadata database next to the blocks
    can still write (the file store keeps its reserve free), so the volume still opens and
    reads, and /healthz reports the disk."""
    data = small_fs / "data"
    data.mkdir()
    ctl(data, "init", "--block-size", "64KiB")
    ctl(data, "volume", "create-block", "v", "96MiB")
    d = Daemon(
        data,
        *("--size", "128MiB", "--nbd-listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"),
        *("--min-free-space", "40MiB"),
    )
    daemons.append(d.start(expect=("NBD", "HTTP")))
    deadline = time.monotonic() + 10
    while (health := healthz(d))[0] != 200:  # the first statvfs is at once
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    first = tmp_path / "first.img"
    first.write_bytes(os.urandom(4 * MiB))
    run("nbdcopy", "--flush", str(first), d.uri("v"))
    src = tmp_path / "src.img"
    src.write_bytes(first.read_bytes() + os.urandom(92 * MiB))
    out = run("nbdcopy", "--flush", str(src), d.uri("v"), check=False, timeout=120)
    assert out.returncode != 0
    assert "No space left on device" in out.stderr, out.stderr
    assert "Input/output error" not in out.stderr, out.stderr
    status, body = healthz(d)
    assert status == 503 and ("free, below" in body or "ENOSPC" in body), body
    assert metric(d, "torus_data_dir_free_bytes") < 40 * MiB
    # reads go on: a new connection opens the volume (a lease write in metadata.db) and reads
    back = tmp_path / "back.img"
    run("nbdcopy", d.uri("v"), str(back), timeout=120)
    assert back.read_bytes()[: 4 * MiB] == first.read_bytes()
    log = d.err.read_text()
    assert "out of space, answering ENOSPC" in log and "database or disk is full" not in log, log[-3000:]


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.write_text("not a directory")
    proc = subprocess.run(
        [str(BIN / "torusd"), "--data-dir", str(data), "--metadata", f"sqlite:///{tmp_path}/m.db"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1 and "cannot create data directory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
