#!/usr/bin/env python3
"""Benchmark the torus NBD server against ``nbdkit file`` with the same workloads, in one run.

    .venv/bin/python bench/nbd.py [--quick] [--target volume|memory|memory-threads] [--size 1G]
                                  [--runtime S] [--repeat N]

Workloads (each against both servers): nbdcopy write of a urandom file and read to ``null:``;
fio (nbd engine) 4 KiB random read/write at iodepth 1 and 32; 1 MiB sequential write/read at
iodepth 8. Both servers run side by side; each workload runs on torus, then right away on
nbdkit (so a ratio's two figures share the box's background load), ``--repeat`` times each
(median shown). Prints a table with torus/nbdkit ratios, the load average and the torus
server's peak RSS (VmHWM).

The torus side is started by :func:`start_torus`, switched by ``--target``: ``volume`` (the
default) is a single-node ``torusd`` serving a fresh volume of a file-store cluster (512 KiB
blocks, ``crc,base``); ``memory`` serves :class:`~torus_core.nbd.memory.MemoryExport` (the
protocol layer's ceiling), ``memory-threads`` the same through the worker-thread path that
blocking exports take. After each torus workload the bench waits until a new connection is
served (the volume's close: sync + unlock) and prints how long that took; it is not part of
the workload's figure, as nbdkit's page cache is not flushed either (nbdcopy ends with a FLUSH
on both, the fio jobs send none).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torus_core.testing.procs import peak_rss_kib

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Poll until ``port`` accepts connections (bounded); fail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server we started, by its PID, and reap it (bounded)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _start_memory(size: int, workdir: Path, quick: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [PY, "-m", "torus_core.nbd.memory_server", "--port", str(port), "--size", str(size)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_listening(port, proc)
    return proc, f"nbd://127.0.0.1:{port}/"


def _start_memory_threads(size: int, workdir: Path, quick: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [PY, "-m", "torus_core.nbd.memory_server", "--port", str(port), "--size", str(size), "--blocking"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_listening(port, proc)
    return proc, f"nbd://127.0.0.1:{port}/"


def _bin(name: str) -> str:
    return str(Path(PY).parent / name)


def _start_volume(size: int, workdir: Path, quick: bool) -> tuple[subprocess.Popen[bytes], str]:
    """A single-node ``torusd`` (file store, default 512 KiB blocks, ``crc,base``) serving a
    fresh volume ``bench`` of ``size`` bytes; its URI names the export."""
    data = workdir / "torus"
    data.mkdir()
    url = f"sqlite:///{data}/metadata.db"
    subprocess.run(
        [_bin("torusctl"), "--metadata", url, "init"], check=True, timeout=120, capture_output=True
    )
    subprocess.run(
        [_bin("torusctl"), "--metadata", url, "volume", "create-block", "bench", str(size)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    # Single-node torusd has no GC: each write workload's sync leaves the blocks of the INode it
    # superseded in the store. Four write workloads each rewrite up to the whole volume.
    capacity = str(5 * size + 256 * 1024 * 1024)
    cmd = [
        _bin("torusd"), "--data-dir", str(data), "--metadata", url, "--size", capacity,
        "--block-store", "file", "--nbd-listen", "127.0.0.1:0",
    ]  # fmt: skip
    log = (workdir / "torusd.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            continue
        line = proc.stdout.readline().decode()
        if not line:
            stop(proc)
            raise RuntimeError(f"torusd exited with {proc.wait(10)}; see {workdir / 'torusd.log'}")
        if line.startswith("NBD LISTENING "):
            return proc, f"nbd://{line.split()[2]}/bench"
    stop(proc)
    raise TimeoutError("torusd did not print NBD LISTENING within 60 s")


#: How to start the torus server for each ``--target``: (export size, work dir, quick) -> (process, URI).
TARGETS: dict[str, Callable[[int, Path, bool], tuple[subprocess.Popen[bytes], str]]] = {
    "memory": _start_memory,
    "memory-threads": _start_memory_threads,
    "volume": _start_volume,
}


def start_torus(
    target: str, size: int, workdir: Path, quick: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the torus NBD server for ``target``; returns the process and its URI."""
    return TARGETS[target](size, workdir, quick)


def start_nbdkit(size: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``nbdkit file`` on a fresh sparse file of ``size`` bytes."""
    img = workdir / "nbdkit.img"
    with img.open("wb") as f:
        f.truncate(size)
    port = free_port()
    with (workdir / "nbdkit.log").open("wb") as log:  # the readiness probe makes it log a reset
        proc = subprocess.Popen(
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(img)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    wait_listening(port, proc)
    return proc, f"nbd://127.0.0.1:{port}/"


def settle_time(uri: str) -> float:
    """Seconds until a new connection to ``uri`` is served (``nbdinfo --size``).

    A torus volume is closed (dirty and staged blocks synced, then unlocked) when its last
    connection ends, and a new connection waits for that: so this waits until the server is
    idle again, and tells how long the close of the previous workload's connection took."""
    t0 = time.perf_counter()
    deadline = t0 + 300
    while True:  # a handshake that waits longer than the server's handshake timeout is dropped
        done = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=300)
        if done.returncode == 0:
            return time.perf_counter() - t0
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{uri} not served again within 300 s: {done.stderr.decode().strip()}")
        time.sleep(0.2)


@dataclass
class Workload:
    """One measurement; ``run(uri)`` returns the figure (higher is better)."""

    name: str
    unit: str
    run: Callable[[str], float]


def nbdcopy_write(src: Path, size: int) -> Callable[[str], float]:
    """MB/s of ``nbdcopy SRC URI``."""

    def run(uri: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", str(src), uri], check=True, timeout=600)
        return size / (time.perf_counter() - t0) / 1e6

    return run


def nbdcopy_read(size: int) -> Callable[[str], float]:
    """MB/s of ``nbdcopy --no-extents URI null:``."""

    def run(uri: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", "--no-extents", uri, "null:"], check=True, timeout=600)
        return size / (time.perf_counter() - t0) / 1e6

    return run


def fio(
    rw: str, bs: str, depth: int, runtime: float, size: int, metric: str, *extra: str
) -> Callable[[str], float]:
    """IOPS or MB/s of one fio job with the nbd engine (``extra``: more fio options, e.g.
    ``--fsync=1`` for an NBD FLUSH after every write)."""

    def run(uri: str) -> float:
        cmd = [
            "fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--size={size}", "--time_based", f"--runtime={runtime}",
            "--output-format=json", *extra,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
        if proc.returncode != 0:
            raise RuntimeError(
                f"fio {rw} {bs} QD{depth} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        out = proc.stdout
        job = json.loads(out[out.index("{") :])["jobs"][0]
        side = job["read"] if "read" in rw else job["write"]
        return float(side["iops"]) if metric == "iops" else side["bw_bytes"] / 1e6

    return run


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB and 2 s fio runs")
    ap.add_argument("--target", choices=sorted(TARGETS), default="volume")
    ap.add_argument("--size", default=None, help="export/copy size (default 1 GiB, 256 MiB with --quick)")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per fio run (10, 2 with --quick)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per workload and server; the median is shown")
    ap.add_argument("--only", default=None, help="run only workloads whose name contains this text")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from torus_core.units import parse_size

    size = parse_size(args.size) if args.size else (256 if args.quick else 1024) * 1024 * 1024
    runtime = args.runtime or (2.0 if args.quick else 10.0)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="torus-nbd-bench-") as tmp:
        work = Path(tmp)
        src = work / "src.img"
        with src.open("wb") as f:
            left = size
            while left:
                n = min(left, 16 * 1024 * 1024)
                f.write(os.urandom(n))
                left -= n
        workloads = [
            Workload("nbdcopy write", "MB/s", nbdcopy_write(src, size)),
            Workload("nbdcopy read", "MB/s", nbdcopy_read(size)),
            Workload("4k randread QD1", "IOPS", fio("randread", "4k", 1, runtime, size, "iops")),
            Workload("4k randread QD32", "IOPS", fio("randread", "4k", 32, runtime, size, "iops")),
            Workload("4k randwrite QD1", "IOPS", fio("randwrite", "4k", 1, runtime, size, "iops")),
            Workload("4k randwrite QD32", "IOPS", fio("randwrite", "4k", 32, runtime, size, "iops")),
            Workload("1M seq write QD8", "MB/s", fio("write", "1M", 8, runtime, size, "bw")),
            Workload(
                "4k randwrite fsync=1 QD1",
                "IOPS",
                fio("randwrite", "4k", 1, runtime, size, "iops", "--fsync=1"),
            ),
            # 32 writers (one NBD connection each), a FLUSH after every write: group commit. (fio's
            # nbd engine refuses --fdatasync and sends no FUA for --sync=1, so this is the
            # synchronous QD32 workload it can run.)
            Workload(
                "4k randwrite fsync=1 32 jobs",
                "IOPS",
                fio(
                    "randwrite",
                    "4k",
                    1,
                    runtime,
                    size,
                    "iops",
                    "--fsync=1",
                    "--numjobs=32",
                    "--group_reporting",
                ),
            ),
            Workload("1M seq read QD8", "MB/s", fio("read", "1M", 8, runtime, size, "bw")),
        ]
        if args.only:
            workloads = [w for w in workloads if args.only in w.name]
        results: dict[str, dict[str, float]] = {"torus": {}, "nbdkit": {}}
        rss = float("nan")
        # Both servers run side by side and each workload runs on one, then at once on the
        # other, so the two figures of a ratio see the same background load (the box is shared).
        procs: list[subprocess.Popen[bytes]] = []
        try:
            tproc, turi = start_torus(args.target, size, work, args.quick)
            procs.append(tproc)
            kproc, kuri = start_nbdkit(size, work)
            procs.append(kproc)
            for w in workloads:
                for side, uri in (("torus", turi), ("nbdkit", kuri)):
                    runs = []
                    settle = 0.0
                    for _ in range(args.repeat):
                        runs.append(w.run(uri))
                        if side == "torus":
                            settle = max(settle, settle_time(uri))
                    runs.sort()
                    results[side][w.name] = runs[len(runs) // 2]
                    note = f"  (then {settle:.2f} s to close: sync + unlock)" if side == "torus" else ""
                    print(f"  {side:6} {w.name:18} {results[side][w.name]:12.1f} {w.unit}{note}", flush=True)
            rss = peak_rss_kib(tproc.pid) / 1024
        finally:
            for proc in procs:
                stop(proc)
    print()
    print(f"target={args.target} size={size // (1024 * 1024)} MiB fio runtime={runtime:g}s")
    print("load average (1/5/15 min) at start: {:.2f} {:.2f} {:.2f}, at end: {:.2f} {:.2f} {:.2f}".format(
        *load0, *os.getloadavg()))  # fmt: skip
    print(f"{'workload':20} {'unit':5} {'torus':>12} {'nbdkit file':>12} {'ratio':>7}")
    for w in workloads:
        t, k = results["torus"][w.name], results["nbdkit"][w.name]
        print(f"{w.name:20} {w.unit:5} {t:12.1f} {k:12.1f} {t / k:7.2f}")
    print(f"torus server peak RSS: {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
