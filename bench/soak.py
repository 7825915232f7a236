"""Soak: writes through NBD for minutes (flushed 4 KiB, or mixed with rare flushes, then a dead peer).

    .venv/bin/python bench/soak.py [--minutes 5] [--only single|cluster] [--writers N]
    .venv/bin/python bench/soak.py --workload mixed --minutes 10 --dead-minutes 10

``--workload mixed`` (issue 16): each writer alternates runs of sequential 1 MiB writes (4..64
MiB long, from a random start, wrapping around its region) with bursts of random 4..256 KiB
writes, and FLUSHes only every ``--flush-every-mib`` MiB written (default 0: only once, at the
end). ``--dead-minutes M`` (cluster only) goes on for M more minutes after SIGKILLing peer 3 (one
that does not serve the volume). The table then also gives the peak store use of each phase
against the live data, and the workload must still see zero ENOSPC with the data verified at
the end.

Issue 11's soak. Two configurations, each on fresh data dirs in a temporary directory:

* ``single``: the README's single node exactly -- ``torusctl init`` (512 KiB blocks, ``crc,base``),
  ``volume create-block demo 1GiB``, ``torusd --data-dir D --size 4GiB --block-store file
  --nbd-listen 127.0.0.1:0`` with SQLite metadata in ``D`` (``scripts/run-single-node.sh``);
* ``cluster``: a fresh etcd on a free loopback port, ``torusctl init`` (R=2), three ``torusd``
  peers ``--size 4GiB --peer-address 127.0.0.1:<free> --auto-join --nbd-listen 127.0.0.1:0`` and a
  1 GiB volume written through peer 1's NBD export.

Every ``torusd`` also gets ``--metrics 127.0.0.1:0``. ``--writers N`` libnbd writers (this file run
with ``--writer`` under ``/usr/bin/python3``, which has the ``nbd`` module) each write the
deterministic stream of ``tests/multiprocess/flush_writer.py``'s ``writes(region, seed)`` into their
own disjoint 1/N of the volume, one write and one FLUSH at a time, and print ``ACK k`` after each
flush. Every second the soak scrapes ``torus_store_used_bytes`` from every ``/metrics``, each
torusd's RSS and the bytes its journal files take on disk. At the end the whole volume is read
back with ``nbdcopy`` (for the cluster also through peer 2's export) and compared with the
content reproduced from the seeds and ACK counts (a writer's one write in flight at its end may be
there or not, whole). ENOSPC: a writer's ``ERR`` line plus the servers' "out of space" log lines.
The longest wait for an ACK is reported; when none comes for 5 s, every torusd's stacks are dumped
with ``py-spy dump --nonblocking`` into the (then kept) temporary directory.
Exit status 1 on any ENOSPC, a verification failure or a writer error.

All processes are started and stopped by PID (SIGTERM, bounded wait, SIGKILL); every wait is
bounded; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLUSH_WRITER = ROOT / "tests" / "multiprocess" / "flush_writer.py"
SYSTEM_PYTHON = "/usr/bin/python3"
MiB = 1 << 20
#: Seconds without an ACK after which the torusd processes' stacks are dumped (py-spy).
STALL = 5.0
VOLUME_SIZE = 1 << 30
STORE_SIZE = "4GiB"
#: Seconds a torusd gets to exit after SIGTERM (it folds the journal in and closes its volumes).
STOP_TIMEOUT = 60.0


def load_flush_writer() -> Any:
    """``tests/multiprocess/flush_writer.py`` as a module (its ``writes`` generator)."""
    spec = importlib.util.spec_from_file_location("flush_writer", FLUSH_WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the writer (runs under /usr/bin/python3 with libnbd) ------------------------------------------


#: Bytes of the pattern pool the mixed stream slices its data from (cheap to reproduce).
POOL = 4 * MiB


def mixed_writes(region: int, seed: int) -> Any:
    """``(offset, data)`` of the mixed stream: sequential 1 MiB runs and random-write bursts
    (see the module docstring); reproducible from ``seed``. ``region`` must be >= 64 MiB."""
    import random

    rng = random.Random(seed)
    pool = rng.randbytes(POOL + MiB)
    while True:
        if rng.random() < 0.5:
            pos = rng.randrange(0, region // MiB) * MiB
            for _ in range(rng.randrange(4, 65)):
                start = rng.randrange(0, POOL)
                yield pos, pool[start : start + MiB]
                pos = (pos + MiB) % (region // MiB * MiB)
        else:
            for _ in range(rng.randrange(16, 257)):
                length = rng.choice((4096, 16384, 65536, 262144))
                offset = rng.randrange(0, region - length + 1, 4096)
                start = rng.randrange(0, POOL)
                yield offset, pool[start : start + length]


def stream(workload: str, region: int, seed: int) -> Any:
    """The write stream of ``workload`` (``flush``: flush_writer's; ``mixed``: :func:`mixed_writes`)."""
    return mixed_writes(region, seed) if workload == "mixed" else load_flush_writer().writes(region, seed)


def writer_main(argv: list[str]) -> int:
    """``--writer URI BASE REGION SECONDS SEED [WORKLOAD FLUSH_EVERY_BYTES]``: the workload's
    stream shifted to ``BASE``; ``ACK k`` after each FLUSH (every write for ``flush``, every
    FLUSH_EVERY_BYTES written and at the end for ``mixed``; 0: only at the end)."""
    here = str(Path(__file__).resolve().parent)  # bench/nbd.py would shadow libnbd's nbd module
    sys.path[:] = [p for p in sys.path if p not in ("", here) and Path(p).resolve() != Path(here)]
    import nbd  # type: ignore[import-not-found]

    uri, base, region, seconds, seed = argv[0], int(argv[1]), int(argv[2]), float(argv[3]), int(argv[4])
    workload = argv[5] if len(argv) > 5 else "flush"
    flush_every = int(argv[6]) if len(argv) > 6 else 0
    h = nbd.NBD()
    h.connect_uri(uri)
    deadline = time.monotonic() + seconds
    k = 0
    since_flush = 0
    try:
        for offset, data in stream(workload, region, seed):
            if time.monotonic() >= deadline:
                break
            h.pwrite(data, base + offset)
            k += 1
            since_flush += len(data)
            if workload == "flush" or (flush_every and since_flush >= flush_every):
                h.flush()
                since_flush = 0
                print(f"ACK {k}", flush=True)
            elif k % 64 == 0:
                print(f"WROTE {k}", flush=True)  # progress, not durability
        if workload != "flush":
            h.flush()
            print(f"ACK {k}", flush=True)
    except Exception as exc:  # report any client error and stop
        print(f"ERR {k} {exc}", flush=True)
        return 1
    with contextlib.suppress(Exception):
        h.shutdown()
    print(f"DONE {k} errors=0", flush=True)
    return 0


# --- processes -------------------------------------------------------------------------------------


def stop_pid(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM ``proc`` by its PID, wait at most ``timeout`` s, then SIGKILL; always reap."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class Torusd:
    """One ``torusd`` with its listening addresses (read from its stdout) and samples."""

    name: str
    data_dir: Path
    args: list[str]
    proc: subprocess.Popen[str] | None = None
    nbd: str = ""
    http: str = ""
    lines: list[str] = field(default_factory=list)
    peak_used: int = 0
    last_used: int = 0
    peak_journal: int = 0
    last_journal: int = 0
    peak_rss_kib: int = 0

    @property
    def log(self) -> Path:
        return self.data_dir / "torusd.log"

    def start(self, want_peer: bool) -> Torusd:
        """Start and wait (bounded) for its NBD, HTTP (and PEER) LISTENING lines."""
        from torus_core.testing.procs import child_env

        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torus_core.cli.torusd", "--data-dir", str(self.data_dir), *self.args]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                cmd, env=child_env(), stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
            )
        ready = threading.Event()
        proc = self.proc

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                self.lines.append(line)
                if line.startswith("NBD LISTENING "):
                    self.nbd = line.split()[2]
                elif line.startswith("HTTP LISTENING "):
                    self.http = line.split()[2]
                if (
                    self.nbd
                    and self.http
                    and (not want_peer or any("PEER LISTENING" in x for x in self.lines))
                ):
                    ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        if not ready.wait(60) or not (self.nbd and self.http):
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")
        return self

    def uri(self, volume: str) -> str:
        return f"nbd://{self.nbd}/{volume}"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc, STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL by PID (a peer that dies) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.last_used = self.last_journal = 0  # its store is gone from the cluster's sum

    def sample(self) -> None:
        """Scrape store usage, RSS and the journal's size on disk."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            m = re.search(r"^torus_store_used_bytes (\S+)$", text, re.M)
            if m:
                self.last_used = int(float(m.group(1)))
                self.peak_used = max(self.peak_used, self.last_used)
        except OSError:
            pass
        self.last_journal = disk_bytes(self.data_dir / "journal")
        self.peak_journal = max(self.peak_journal, self.last_journal)
        from torus_core.testing.procs import proc_status_kib

        self.peak_rss_kib = max(self.peak_rss_kib, proc_status_kib(self.proc.pid, "VmHWM"))

    def log_count(self, pattern: str) -> int:
        try:
            return sum(1 for line in self.log.read_text().splitlines() if pattern in line)
        except OSError:
            return 0


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk by the files under ``path``."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def ctl(metadata: str, *args: str, timeout: float = 120.0) -> str:
    from torus_core.testing.procs import torusctl

    return torusctl(metadata, *args, timeout=timeout)


def wait_exported(uri: str, timeout: float) -> bool:
    """Until ``nbdinfo`` can open ``uri`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            if subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=20).returncode == 0:
                return True
        time.sleep(0.5)
    return False


# --- the soak --------------------------------------------------------------------------------------


@dataclass
class Writer:
    index: int
    base: int
    region: int
    seed: int
    proc: subprocess.Popen[str] | None = None
    acked: int = 0
    err: str = ""
    done: bool = False
    last_ack: float = 0.0
    max_gap: float = 0.0  # longest time between two ACKs (or the start and the first)
    max_gap_at: float = 0.0  # seconds into the run when it ended
    stalls: int = 0  # gaps over 1 s


@dataclass
class Result:
    config: str
    minutes: float
    writers: int
    acked: int = 0
    rate: float = 0.0
    max_gap: float = 0.0
    max_gap_at: float = 0.0
    stalls: int = 0
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    stall_dumps: list[str] = field(default_factory=list)
    enospc: int = 0
    writer_errors: list[str] = field(default_factory=list)
    peak_used: dict[str, int] = field(default_factory=dict)
    peak_used_sum: int = 0
    end_used: dict[str, int] = field(default_factory=dict)
    after_used: dict[str, int] = field(default_factory=dict)
    peak_journal: dict[str, int] = field(default_factory=dict)
    live: int = 0
    verified: dict[str, bool] = field(default_factory=dict)
    peak_rss: dict[str, float] = field(default_factory=dict)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # start, max, end (1-min)
    log_errors: dict[str, int] = field(default_factory=dict)
    workload: str = "flush"
    #: peak summed store use before and after the peer was killed (``--dead-minutes``)
    peak_phase: list[int] = field(default_factory=list)
    dead_minutes: float = 0.0
    written: int = 0  # bytes the writers wrote (acknowledged by a FLUSH)

    @property
    def ok(self) -> bool:
        return (
            self.enospc == 0
            and not self.writer_errors
            and bool(self.verified)
            and all(self.verified.values())
        )


@dataclass
class Workload:
    """What the writers do: ``kind`` (``flush`` or ``mixed``), how often a mixed writer
    flushes (bytes; 0 = only at the end), and which daemon dies after how many seconds."""

    kind: str = "flush"
    flush_every: int = 0
    kill: Torusd | None = None
    kill_after: float = 0.0


def run_writers(
    uri: str,
    daemons: list[Torusd],
    n: int,
    seconds: float,
    res: Result,
    seed0: int,
    dump_dir: Path | None,
    work: Workload | None = None,
) -> list[Writer]:
    """Run ``n`` writers for ``seconds``, sampling every daemon each second; fills ``res``."""
    work = work or Workload()
    region = VOLUME_SIZE // n // 4096 * 4096
    phase_peak = [0, 0]
    killed = False
    writers = [Writer(i, i * region, region, seed0 + i) for i in range(n)]
    samples_used: list[int] = []
    timeline: list[tuple[float, int, int]] = []  # (s since start, ACKs so far, store used summed)
    t0 = time.monotonic()
    last_report, last_acked = t0, 0
    loadmax = max(os.getloadavg()[0], res.load[0])
    stalled = False
    try:
        for w in writers:
            w.last_ack = time.monotonic()
            w.proc = subprocess.Popen(
                [
                    SYSTEM_PYTHON,
                    __file__,
                    "--writer",
                    uri,
                    str(w.base),
                    str(w.region),
                    str(seconds),
                    str(w.seed),
                    work.kind,
                    str(work.flush_every),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )

            def reader(w: Writer = w) -> None:
                assert w.proc is not None and w.proc.stdout is not None
                for line in w.proc.stdout:
                    parts = line.split(maxsplit=2)
                    if parts and parts[0] in ("ACK", "WROTE"):
                        if parts[0] == "ACK":
                            w.acked = int(parts[1])
                        now = time.monotonic()
                        gap = now - w.last_ack
                        if gap > 1.0:
                            w.stalls += 1
                        if gap > w.max_gap:
                            w.max_gap, w.max_gap_at = gap, now - t0
                        w.last_ack = now
                    elif parts and parts[0] == "ERR":
                        w.err = line.strip()
                    elif parts and parts[0] == "DONE":
                        w.done = True

            threading.Thread(target=reader, daemon=True).start()
        deadline = t0 + seconds + 120
        while time.monotonic() < deadline:
            time.sleep(1.0)
            for d in daemons:
                d.sample()
            samples_used.append(sum(d.last_used for d in daemons))
            phase_peak[killed] = max(phase_peak[killed], samples_used[-1])
            if work.kill is not None and not killed and time.monotonic() - t0 >= work.kill_after:
                print(f"  t={time.monotonic() - t0:4.0f}s SIGKILL {work.kill.name}", flush=True)
                work.kill.kill()
                killed = True
            timeline.append((time.monotonic() - t0, sum(w.acked for w in writers), samples_used[-1]))
            loadmax = max(loadmax, os.getloadavg()[0])
            now = time.monotonic()
            if now - last_report >= 10:
                acked = sum(w.acked for w in writers)
                rate = (acked - last_acked) / (now - last_report)
                last_report, last_acked = now, acked
                print(
                    f"  t={now - t0:4.0f}s acked={acked:6d} ({rate:4.0f}/s last 10 s) used="
                    + "+".join(f"{d.last_used / MiB:.0f}" for d in daemons)
                    + " MiB journal="
                    + "+".join(f"{d.last_journal / MiB:.0f}" for d in daemons)
                    + f" MiB load={os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            if all(w.proc is not None and w.proc.poll() is not None for w in writers):
                break
            waiting = now - min(w.last_ack for w in writers if w.proc is not None and w.proc.poll() is None)
            if dump_dir is not None and waiting > STALL and not stalled and len(res.stall_dumps) < 3:
                stalled = True  # one dump per stall
                res.stall_dumps.extend(stall_dump(daemons, dump_dir, now - t0))
            elif waiting <= STALL:
                stalled = False
        elapsed = time.monotonic() - t0
    finally:
        for w in writers:
            if w.proc is not None:
                stop_pid(w.proc, 10)
    time.sleep(0.2)  # the readers drain the last lines
    for w in writers:
        assert w.proc is not None
        if w.err:
            res.writer_errors.append(f"writer {w.index}: {w.err}")
        elif not w.done:
            stderr = w.proc.stderr.read() if w.proc.stderr else ""
            res.writer_errors.append(f"writer {w.index}: no DONE (rc={w.proc.returncode}) {stderr[-300:]}")
    res.acked = sum(w.acked for w in writers)
    worst = max(writers, key=lambda w: w.max_gap)
    res.max_gap, res.max_gap_at = worst.max_gap, worst.max_gap_at
    res.stalls = sum(w.stalls for w in writers)
    res.timeline = timeline
    res.rate = res.acked / elapsed if elapsed > 0 else 0.0
    res.load = (res.load[0], loadmax, 0.0)
    for d in daemons:
        res.peak_used[d.name] = d.peak_used
        res.end_used[d.name] = d.last_used
    res.peak_used_sum = max(samples_used, default=0)
    res.peak_phase = phase_peak if work.kill is not None else [phase_peak[0]]
    return writers


def stall_dump(daemons: list[Torusd], dump_dir: Path, at: float) -> list[str]:
    """``py-spy dump --nonblocking`` of every torusd into ``dump_dir``; the files written."""
    py_spy = Path(sys.executable).with_name("py-spy")
    out: list[str] = []
    for d in daemons:
        if d.proc is None or d.proc.poll() is not None:
            continue
        path = dump_dir / f"stall-t{at:.0f}-{d.name}.txt"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(
                [str(py_spy), "dump", "--nonblocking", "--pid", str(d.proc.pid)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            path.write_text(proc.stdout + proc.stderr)
            out.append(str(path))
    print(f"  no ACK for {STALL:g} s at t={at:.0f}s: py-spy dumps {', '.join(out)}", flush=True)
    return out


def verify(path: Path, writers: list[Writer], workload: str = "flush") -> tuple[bool, int, list[str]]:
    """Compare the read-back image with the writers' reproduced content.

    Returns (verified, live bytes, notes); a writer's next write after its last ACK may be present
    (whole) or absent."""
    notes: list[str] = []
    live = 0
    ok = True
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if len(mm) < VOLUME_SIZE:
            return False, 0, [f"read back {len(mm)} bytes, expected {VOLUME_SIZE}"]
        covered_end = 0
        for w in writers:
            model = bytearray(w.region)
            covered = bytearray(w.region // 512)
            gen = stream(workload, w.region, w.seed)
            for _ in range(w.acked):
                off, chunk = next(gen)
                model[off : off + len(chunk)] = chunk
                covered[off // 512 : (off + len(chunk)) // 512] = b"\x01" * (len(chunk) // 512)
            live += covered.count(1) * 512
            got = mm[w.base : w.base + w.region]
            if got == model:
                notes.append(f"writer {w.index}: {w.acked} writes match")
            else:
                off, chunk = next(gen)
                model[off : off + len(chunk)] = chunk
                if got == model:
                    notes.append(f"writer {w.index}: {w.acked} writes + the one in flight match")
                else:
                    ok = False
                    diff = [i for i in range(0, w.region, 4096) if got[i : i + 4096] != model[i : i + 4096]]
                    notes.append(
                        f"writer {w.index}: MISMATCH in {len(diff)} 4 KiB pages, first at volume offsets "
                        + ", ".join(str(w.base + i) for i in diff[:8])
                    )
            covered_end = max(covered_end, w.base + w.region)
        rest = mm[covered_end:VOLUME_SIZE]
        if rest.count(0) != len(rest):
            ok = False
            notes.append(f"bytes after the writers' regions ({covered_end}..) are not zero")
    return ok, live, notes


def readback(uri: str, out: Path, writers: list[Writer], label: str, res: Result) -> None:
    """``nbdcopy URI FILE`` and verify; records ``res.verified[label]``."""
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.run(["nbdcopy", uri, str(out)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"  nbdcopy from {label} failed: {proc.stderr.strip()[-500:]}")
        res.verified[label] = False
        return
    ok, live, notes = verify(out, writers, res.workload)
    res.verified[label], res.live = ok, live
    print(f"  read back through {label} in {time.monotonic() - t0:.1f}s: {'OK' if ok else 'FAILED'}")
    for note in notes:
        print(f"    {note}")
    out.unlink(missing_ok=True)


def settle(daemons: list[Torusd], res: Result, seconds: float) -> None:
    """Sample for ``seconds`` more (checkpoint and GC after the clients left); usage after."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        for d in daemons:
            d.sample()
        res.peak_used_sum = max(res.peak_used_sum, sum(d.last_used for d in daemons))
    for d in daemons:
        res.after_used[d.name] = d.last_used


def finish(daemons: list[Torusd], res: Result) -> None:
    for d in daemons:
        d.sample()
        res.peak_rss[d.name] = d.peak_rss_kib / 1024
        res.peak_journal[d.name] = d.peak_journal
        res.peak_used[d.name] = d.peak_used
    res.load = (res.load[0], max(res.load[1], os.getloadavg()[0]), os.getloadavg()[0])


def report_logs(daemons: list[Torusd], res: Result) -> None:
    """Count "out of space" and ERROR/Traceback lines in the daemons' logs (after they stopped)."""
    for d in daemons:
        oos = d.log_count("out of space")
        res.enospc += oos
        errors = d.log_count(" ERROR ") + d.log_count("Traceback")
        res.log_errors[d.name] = errors
        if oos or errors:
            print(f"  {d.name}: {oos} 'out of space', {errors} ERROR/Traceback lines in {d.log}; last lines:")
            lines = [x for x in d.log.read_text().splitlines() if "ERROR" in x or "out of space" in x]
            for line in lines[:5] + (["    ..."] if len(lines) > 10 else []) + lines[-5:]:
                print(f"    {line[:300]}")


def soak_single(tmp: Path, minutes: float, n: int, dumps: bool, work: Workload) -> Result:
    res = Result("single", minutes, n, load=(os.getloadavg()[0], 0.0, 0.0), workload=work.kind)
    data = tmp / "single"
    data.mkdir()
    md = f"sqlite:///{data}/metadata.db"
    ctl(md, "--data-dir", str(data), "init", "--if-needed")
    ctl(md, "--data-dir", str(data), "volume", "create-block", "demo", "1GiB", "--if-missing")
    d = Torusd(
        "single",
        data,
        [
            "--metadata", md, "--size", STORE_SIZE, "--block-store", "file",
            "--nbd-listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        ],
    )  # fmt: skip
    daemons = [d]
    writers: list[Writer] = []
    try:
        d.start(want_peer=False)
        uri = d.uri("demo")
        if not wait_exported(uri, 60):
            raise RuntimeError(f"{uri} is not exported:\n{d.log_tail()}")
        print(f"single: torusd pid {d.proc.pid if d.proc else '?'} nbd {uri} metrics http://{d.http}/metrics")
        writers = run_writers(
            uri, daemons, n, minutes * 60, res, seed0=1000, dump_dir=tmp if dumps else None, work=work
        )
        readback(uri, tmp / "single.img", writers, "single", res)
        settle(daemons, res, 15)
        finish(daemons, res)
    finally:
        for x in daemons:
            x.stop()
    report_logs(daemons, res)
    return res


def soak_cluster(
    tmp: Path, minutes: float, n: int, dumps: bool, work: Workload, dead_minutes: float
) -> Result:
    from torus_core.testing.services import etcd_service, free_port

    res = Result("cluster", minutes, n, load=(os.getloadavg()[0], 0.0, 0.0), workload=work.kind)
    res.dead_minutes = dead_minutes
    daemons: list[Torusd] = []
    with etcd_service() as etcd:
        url = etcd.url
        print(f"cluster: etcd at {url}")
        ctl(url, "init")
        try:
            for i in range(3):
                d = Torusd(
                    f"peer{i + 1}",
                    tmp / f"peer{i + 1}",
                    [
                        "--metadata", url, "--size", STORE_SIZE, "--block-store", "file",
                        "--peer-address", f"127.0.0.1:{free_port()}", "--auto-join",
                        "--nbd-listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                    ],
                )  # fmt: skip
                daemons.append(d)
                d.start(want_peer=True)
            ctl(url, "volume", "create-block", "vol", "1GiB")
            uri = daemons[0].uri("vol")
            if not wait_exported(uri, 60):
                raise RuntimeError(f"{uri} is not exported:\n{daemons[0].log_tail()}")
            print("  " + ctl(url, "peer", "list").strip().replace("\n", "\n  "))
            if dead_minutes > 0:
                work = Workload(work.kind, work.flush_every, kill=daemons[2], kill_after=minutes * 60)
            writers = run_writers(
                uri,
                daemons,
                n,
                (minutes + dead_minutes) * 60,
                res,
                seed0=2000,
                dump_dir=tmp if dumps else None,
                work=work,
            )
            readback(uri, tmp / "p1.img", writers, "peer1", res)
            # peer 1 gives the volume up once its clients left (lock released on close)
            uri2 = daemons[1].uri("vol")
            if wait_exported(uri2, 90):
                readback(uri2, tmp / "p2.img", writers, "peer2", res)
            else:
                print(f"  {uri2} did not open within 90 s")
                res.verified["peer2"] = False
            settle(daemons, res, 15)
            try:
                print("  " + ctl(url, "peer", "list").strip().replace("\n", "\n  "))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"  torusctl peer list failed: {str(exc)[-300:]}")
            finish(daemons, res)
        finally:
            for d in daemons:
                d.stop()
    report_logs(daemons, res)
    return res


def mib(n: int) -> str:
    return f"{n / MiB:.0f}"


def print_table(results: list[Result]) -> None:
    rows: list[tuple[str, list[str]]] = [
        ("workload", [r.workload for r in results]),
        ("minutes (+ with a dead peer)", [f"{r.minutes:g} + {r.dead_minutes:g}" for r in results]),
        ("writers (QD1 each)", [str(r.writers) for r in results]),
        ("writes acknowledged", [str(r.acked) for r in results]),
        ("flushed writes/s", [f"{r.rate:.0f}" for r in results]),
        ("longest wait for an ACK (s)", [f"{r.max_gap:.1f} at t={r.max_gap_at:.0f}s" for r in results]),
        ("ACK gaps > 1 s", [str(r.stalls) for r in results]),
        ("ENOSPC", [str(r.enospc) for r in results]),
        ("writer errors", [str(len(r.writer_errors)) for r in results]),
        ("peak store used MiB", ["+".join(mib(v) for v in r.peak_used.values()) for r in results]),
        ("peak store used MiB, sum", [mib(r.peak_used_sum) for r in results]),
        ("peak sum per phase MiB", ["/".join(mib(v) for v in r.peak_phase) for r in results]),
        ("store used at end of writes", ["+".join(mib(v) for v in r.end_used.values()) for r in results]),
        ("store used after readback+15s", ["+".join(mib(v) for v in r.after_used.values()) for r in results]),
        ("peak journal on disk MiB", ["+".join(mib(v) for v in r.peak_journal.values()) for r in results]),
        ("live data MiB", [mib(r.live) for r in results]),
        (
            "data verified",
            [
                ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r.verified.items()) or "NO"
                for r in results
            ],
        ),
        ("peak RSS MiB", ["+".join(f"{v:.0f}" for v in r.peak_rss.values()) for r in results]),
        ("ERROR lines in logs", ["+".join(str(v) for v in r.log_errors.values()) for r in results]),
        ("load avg start/max/end", [f"{r.load[0]:.1f}/{r.load[1]:.1f}/{r.load[2]:.1f}" for r in results]),
    ]
    width = max(30, *(len(x) + 2 for _, vals in rows for x in vals))
    print()
    print(f"{'':<32}" + "".join(f"{r.config:>{width}}" for r in results))
    for name, vals in rows:
        print(f"{name:<32}" + "".join(f"{v:>{width}}" for v in vals))
    for r in results:
        for e in r.writer_errors:
            print(f"{r.config}: {e}")
        for path in r.stall_dumps:
            print(f"{r.config}: stall dump {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="write duration per configuration")
    ap.add_argument("--only", choices=("single", "cluster"), default=None, help="one configuration")
    ap.add_argument("--writers", type=int, default=1, help="writers, each on its own 1/N of the volume")
    ap.add_argument(
        "--workload",
        choices=("flush", "mixed"),
        default="flush",
        help="flush: 4 KiB writes each FLUSHed; mixed: sequential + random writes, rare FLUSHes",
    )
    ap.add_argument(
        "--flush-every-mib",
        type=float,
        default=0.0,
        help="mixed: FLUSH every this many MiB written (0: only at the end)",
    )
    ap.add_argument(
        "--dead-minutes",
        type=float,
        default=0.0,
        help="cluster: go on this many minutes after SIGKILLing peer 3",
    )
    ap.add_argument(
        "--no-stall-dumps", action="store_true", help=f"no py-spy dumps when no ACK comes for {STALL:g} s"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the data dirs and logs (kept anyway on failure)"
    )
    args = ap.parse_args(argv)
    if args.writers < 1:
        ap.error("--writers must be >= 1")
    if args.workload == "mixed" and VOLUME_SIZE // args.writers < 64 * MiB:
        ap.error("--workload mixed needs at least 64 MiB of volume per writer")
    if args.minutes <= 0 or args.dead_minutes < 0 or args.flush_every_mib < 0:
        ap.error("--minutes must be > 0, --dead-minutes and --flush-every-mib >= 0")
    work = Workload(args.workload, int(args.flush_every_mib * MiB))
    for path in [*sorted(ROOT.glob("plugins/torus_*")), ROOT]:  # this tree's code, as bench/cluster.py
        sys.path.insert(0, str(path))
    configs = [args.only] if args.only else ["single", "cluster"]
    print(
        f"soak: {args.minutes:g} (+{args.dead_minutes:g} with a dead peer) min per config, "
        f"{args.writers} writer(s), workload {args.workload}, "
        f"1 GiB volume, {STORE_SIZE} stores; {os.cpu_count()} cores, load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        flush=True,
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %cI"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
        if head:
            print(f"tree: {head}, {sum(1 for x in dirty if x.strip())} modified tracked file(s)")
    tmp = Path(tempfile.mkdtemp(prefix="torus-soak-"))
    results: list[Result] = []
    try:
        for config in configs:
            dumps = not args.no_stall_dumps
            if config == "single":
                results.append(soak_single(tmp, args.minutes, args.writers, dumps, work))
            else:
                results.append(soak_cluster(tmp, args.minutes, args.writers, dumps, work, args.dead_minutes))
        ok = len(results) == len(configs) and all(r.ok for r in results)
    finally:
        dumped = any(r.stall_dumps for r in results)
        if (
            results
            and all(r.ok for r in results)
            and len(results) == len(configs)
            and not args.keep
            and not dumped
        ):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} (data dirs and torusd.log files) for inspection")
    print_table(results)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        sys.exit(writer_main(sys.argv[2:]))
    sys.exit(main())
