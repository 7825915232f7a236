#!/usr/bin/env python3
"""Benchmark a torus cluster on loopback against single-node torus and ``nbdkit file``, in one run.

    .venv/bin/python bench/cluster.py [--quick] [--size 128MiB] [--runtime 5] [--block-size 512KiB]
                                      [--only "single,3p R2"] [--baseline DIR] [--profile DIR]

Configurations (each on a fresh etcd): ``nbdkit file`` (reference), single-node torus (one
``torusd`` peer, R=1), then three ``torusd`` peers with R = 1, 2, 3. Workloads through the first
peer's NBD export: nbdcopy sequential write and read, fio (nbd engine) 4 KiB random write/read at
iodepth 32, flushed 4 KiB random writes (``--fsync=1``, QD1 and 8 writers) and 1 MiB sequential
writes at QD8. Printed as figures plus ratios to single-node torus and to nbdkit. The disk
itself is measured too, on the filesystem of the temp dir: fio psync 1 MiB sequential write
(``--end_fsync=1``) and the two-loop fsync floor (``--ioengine=psync --rw=randwrite --bs=4k
--fsync=1 --numjobs=2``, per-job IOPS); the issue's goals are then printed as ratios to these
references (and to the single node and nbdkit of the same run). Then, for R=2: a peer is
SIGKILLed and removed with ``peer remove --force``; the time until every surviving peer
reports a complete rebalance pass with nothing under-replicated gives the re-replication rate
(MB/s of the dead peer's data).
Peak RSS (VmHWM) is reported per peer: the serving peer (its NBD export is used) and the others.
``--profile DIR`` runs ``py-spy record`` (raw, 100 Hz) on every torusd during the 4 KiB
randread and 1 MiB write workloads and leaves the flame data in DIR. The Ceph RBD figures
are a constant reference column (from the task brief), not measured here.

``--baseline DIR`` (a checkout of another commit, e.g. ``git worktree add /tmp/base v1``) also
measures every torus configuration with that tree's ``torusd``/``torusctl``, right before this
tree's, and prints this tree's figures as a ratio to it: a change's before/after in one run.
``--repeat N`` alternates the two trees N times and prints the medians (a shared machine drifts).

All processes are started and stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this tree's code (and its plugins), whatever the environment's editable installs point at;
# the torusd children get the same paths (torus_core.testing.procs.child_env)
for _path in [*sorted(ROOT.glob("plugins/torus_*")), ROOT]:
    sys.path.insert(0, str(_path))

from torus_core.cluster.peerinfo import parse_peers  # noqa: E402
from torus_core.metadata import MetadataService  # noqa: E402
from torus_core.plugins import make_plugin_manager  # noqa: E402
from torus_core.testing.procs import (  # noqa: E402
    TorusdProcess,
    children_run_tree,
    peak_rss_kib,
    torusctl,
    wait_for,
)
from torus_core.testing.services import etcd_service, free_port  # noqa: E402
from torus_core.units import parse_size  # noqa: E402

CEPH = {
    "seq write MB/s": "453 MiB/s",
    "seq read MB/s": "1.1 GiB/s",
    "4k randwrite QD32 IOPS": "2.1k",
    "4k randread QD32 IOPS": "14.1k",
    "4k randwrite fsync QD1 IOPS": "~800 (QD1)",
    "4k randwrite fsync 8 writers IOPS": "2.1k",
    "1M seq write QD8 MB/s": "475 MB/s",
}
#: Workloads py-spy records with ``--profile``.
PROFILED = ("4k randread QD32 IOPS", "1M seq write QD8 MB/s")
FAST = ("--heartbeat-interval", "0.5", "--rebalance-interval", "0.2", "--rebalance-settle", "1")

Run = Callable[[str], float]


def nbdcopy_write(src: Path, size: int) -> Run:
    """MB/s of ``nbdcopy --flush SRC URI``."""

    def run(uri: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", "--flush", str(src), uri], check=True, timeout=900)
        return size / (time.perf_counter() - t0) / 1e6

    return run


def nbdcopy_read(size: int) -> Run:
    """MB/s of ``nbdcopy --no-extents URI null:``."""

    def run(uri: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", "--no-extents", uri, "null:"], check=True, timeout=900)
        return size / (time.perf_counter() - t0) / 1e6

    return run


def fio(
    rw: str,
    depth: int,
    runtime: float,
    size: int,
    fsync: bool = False,
    *,
    bs: str = "4k",
    jobs: int = 1,
    metric: str = "iops",
) -> Run:
    """IOPS (or MB/s with ``metric="bw"``) of a fio job with the nbd engine; ``jobs`` > 1 runs
    that many writers, one NBD connection each, reported together."""

    def run(uri: str) -> float:
        cmd = [
            "fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", f"--size={size}", "--time_based", f"--runtime={runtime}",
            "--output-format=json",
        ]  # fmt: skip
        if fsync:
            cmd.append("--fsync=1")
        if jobs > 1:
            cmd += [f"--numjobs={jobs}", "--group_reporting"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 300)
        out = proc.stdout
        if proc.returncode != 0 or "{" not in out:
            print(f"  fio {rw} QD{depth} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
            return float("nan")
        job = json.loads(out[out.index("{") :])["jobs"][0]
        side = job["read"] if "read" in rw else job["write"]
        return float(side["iops"]) if metric == "iops" else side["bw_bytes"] / 1e6

    return run


def workloads(src: Path, size: int, runtime: float) -> list[tuple[str, Run]]:
    """The measured workloads, in order (writes first so reads hit real data)."""
    return [
        ("seq write MB/s", nbdcopy_write(src, size)),
        ("seq read MB/s", nbdcopy_read(size)),
        ("4k randwrite QD32 IOPS", fio("randwrite", 32, runtime, size)),
        ("4k randread QD32 IOPS", fio("randread", 32, runtime, size)),
        ("4k randwrite fsync QD1 IOPS", fio("randwrite", 1, runtime, size, fsync=True)),
        # fio's nbd engine sends no FUA for --sync=1 and refuses --fdatasync: 8 writers (one
        # connection each) with a FLUSH after every write are the concurrent synchronous load
        ("4k randwrite fsync 8 writers IOPS", fio("randwrite", 1, runtime, size, fsync=True, jobs=8)),
        ("1M seq write QD8 MB/s", fio("write", 8, runtime, size, bs="1M", metric="bw")),
    ]


def measure_disk(size: int, runtime: float, tmp: Path) -> dict[str, float]:
    """The disk's own references on the temp dir's filesystem: fio psync 1 MiB sequential write
    (``--end_fsync=1``, MB/s) and the per-job IOPS of two concurrent 4 KiB fsync loops."""
    out: dict[str, float] = {}
    jobs = {
        "disk seq write MB/s": ["--rw=write", "--bs=1M", f"--size={size}", "--end_fsync=1"],
        "disk fsync floor IOPS/job": [
            "--rw=randwrite", "--bs=4k", "--size=64M", "--fsync=1", "--numjobs=2",
            "--time_based", f"--runtime={runtime}",
        ],
    }  # fmt: skip
    for name, args in jobs.items():
        where = tmp / "disk-ref"
        where.mkdir(exist_ok=True)
        cmd = ["fio", "--name=d", "--ioengine=psync", f"--directory={where}", "--output-format=json", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 600)
        text = proc.stdout
        if proc.returncode != 0 or "{" not in text:
            print(f"  fio disk reference failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
            out[name] = float("nan")
        else:
            runs = json.loads(text[text.index("{") :])["jobs"]
            if name.endswith("MB/s"):
                out[name] = runs[0]["write"]["bw_bytes"] / 1e6
            else:
                out[name] = statistics.mean(float(j["write"]["iops"]) for j in runs)
        shutil.rmtree(where, ignore_errors=True)
    return out


class Profiler:
    """``py-spy record`` on some PIDs while one workload runs (``--profile``)."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    @contextlib.contextmanager
    def record(self, tag: str, pids: dict[str, int], seconds: float) -> Iterator[None]:
        """Record each of ``pids`` (label -> pid) for ``seconds`` into ``out/tag-label.txt``."""
        if self.out is None or not Path(self.exe).exists():
            yield
            return
        self.out.mkdir(parents=True, exist_ok=True)
        procs = [
            subprocess.Popen(
                [
                    self.exe, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "100",
                    "-f", "raw", "-o", str(self.out / f"{tag}-{label}.txt"), "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for label, pid in pids.items()
        ]  # fmt: skip
        try:
            yield
        finally:
            for proc in procs:
                try:
                    proc.wait(seconds + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def measure_nbdkit(work: list[tuple[str, Run]], size: int, tmp: Path) -> dict[str, float]:
    """Figures of ``nbdkit file`` on a sparse file."""
    img = tmp / "nbdkit.img"
    with img.open("wb") as f:
        f.truncate(size)
    port = free_port()
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(img)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        uri = f"nbd://127.0.0.1:{port}/"
        ok = wait_for(
            lambda: (
                subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=10).returncode == 0
            ),
            20.0,
        )
        if not ok:
            raise RuntimeError("nbdkit did not start")
        return {name: run(uri) for name, run in work}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def measure_torus(
    work: list[tuple[str, Run]], size: int, tmp: Path, peers: int, replication: int, block_size: str,
    recovery: bool = False, profiler: Profiler | None = None, tag: str = "", runtime: float = 5.0,
) -> tuple[dict[str, float], list[float], float | None]:  # fmt: skip
    """Figures of a torus cluster, each peer's peak RSS (MiB; the serving peer first) and
    (optionally) recovery MB/s."""
    root = tmp / f"torus-{peers}-r{replication}"
    with etcd_service() as etcd:
        url = etcd.url
        torusctl(url, "init", "--block-size", block_size, "--replication", str(replication))
        procs: list[TorusdProcess] = []
        regs = make_plugin_manager().collect_registries()
        backend = regs.metadata.get("etcd").from_url(url)
        md = MetadataService(backend, ring_types=regs.ring_types)
        try:
            # copy-on-write: every rewrite of a block takes a new one until GC frees the old, so
            # small random writes on big blocks need room (the file store is sparse)
            store_size = str(max(32 * size * replication // peers, 1 << 30))
            for i in range(peers):
                p = TorusdProcess(url, root / f"p{i}", size=store_size, extra=(*FAST, "--gc-grace", "2"))
                procs.append(p.start())
            torusctl(url, "volume", "create-block", "bench", str(size))
            uri = f"{procs[0].nbd_uri}/bench"

            def exported() -> bool:
                probe = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=10)
                return probe.returncode == 0

            if not wait_for(exported, 20.0, 0.2):  # the peer's metadata view may lag a moment
                raise RuntimeError(f"{uri} is not exported")
            figures: dict[str, float] = {}
            hwm: list[int] = []
            closes: list[float] = []
            for name, run in work:
                pids = {f"p{i}": p.pid for i, p in enumerate(procs) if p.pid}
                slug = name.split(" ")[1] if name.startswith("4k") else name.split(" ")[0] + "-write"
                ctx = (
                    profiler.record(f"{tag}-{slug}", pids, runtime)
                    if profiler is not None and name in PROFILED
                    else contextlib.nullcontext()
                )
                with ctx:
                    figures[name] = run(uri)
                hwm.append(peak_rss_kib(procs[0].pid) // 1024 if procs[0].pid else 0)
                # the volume's close (sync of what the workload left dirty or staged) runs after
                # the client disconnects; the next workload starts once it is done, so it is not
                # measured inside the next one (a 4k randwrite's close rewrites every block)
                t0 = time.monotonic()
                wait_for(lambda: not md.lock_status("bench").locked, 300.0, 0.1)
                closes.append(time.monotonic() - t0)
            print("  serving peer VmHWM (MiB) after each workload: " + ", ".join(map(str, hwm)))
            print("  volume close after each workload (s): " + ", ".join(f"{c:.1f}" for c in closes))
            rss = [peak_rss_kib(p.pid) / 1024 if p.pid else float("nan") for p in procs]
            rate = None
            if recovery:
                try:
                    rate = _recovery(md, url, procs, parse_size(block_size))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # keep the figures
                    print(f"  re-replication not measured: {exc}")
            return figures, rss, rate
        finally:
            for p in procs:
                p.stop()
            backend.close()
            shutil.rmtree(root, ignore_errors=True)


def _recovery(md: MetadataService, url: str, procs: list[TorusdProcess], block_size: int) -> float:
    """SIGKILL the last peer, force-remove it, and time re-replication; MB/s of its data."""
    victim = procs[-1]
    infos = parse_peers(md.list_peers())
    lost_bytes = infos[victim.uuid].used_blocks * block_size
    victim.kill()
    wait_for(lambda: "DOWN" in torusctl(url, "peer", "list"), 20.0)
    t0 = time.time()
    torusctl(url, "peer", "remove", "--force", victim.uuid)
    version = md.get_ring().version

    def done() -> bool:
        now = parse_peers(md.list_peers())
        for p in procs[:-1]:
            r = now[p.uuid].rebalance
            if r.ring_version != version or r.last_finish <= t0 or r.under_replicated or r.unconfirmed:
                return False
        return True

    if not wait_for(done, 600.0, 0.1):
        raise RuntimeError("re-replication did not finish within 600 s")
    elapsed = time.time() - t0
    print(f"  re-replication: {lost_bytes / 2**20:.1f} MiB of the dead peer's data in {elapsed:.1f} s")
    return lost_bytes / elapsed / 1e6


def _round_line(figures: dict[str, float]) -> str:
    """One round's figures on one line (units dropped)."""
    return ", ".join(f"{name.rsplit(' ', 1)[0]} {value:.0f}" for name, value in figures.items())


def _print_goals(
    columns: dict[str, dict[str, float]], disk: dict[str, float], rss: dict[str, list[float]]
) -> None:
    """The issue's goals, each as ``figure / goal`` against references measured in this run
    (>= 1.00 meets it; for RSS, ``goal / figure``)."""
    cluster = "3p R2" if "3p R2" in columns else next((k for k in columns if k.startswith("3p")), None)
    single, kit = columns["single"], columns["nbdkit"]
    rows: list[tuple[str, float, str, float]] = []  # (what, figure, goal text, goal value)
    if cluster is not None:
        c = columns[cluster]
        rows += [
            (f"{cluster} 4k randread QD32", c["4k randread QD32 IOPS"], "0.5x single",
             0.5 * single["4k randread QD32 IOPS"]),
            (f"{cluster} 4k randread QD32", c["4k randread QD32 IOPS"], "Ceph 14.1k", 14_100.0),
            (f"{cluster} 1M seq write QD8 MB/s", c["1M seq write QD8 MB/s"], "Ceph 475 MB/s", 475.0),
            (f"{cluster} 1M seq write QD8 MB/s", c["1M seq write QD8 MB/s"], "0.3x disk seq write",
             0.3 * disk["disk seq write MB/s"]),
            (f"{cluster} flushed 4k QD1", c["4k randwrite fsync QD1 IOPS"], "0.6x two-loop fsync floor",
             0.6 * disk["disk fsync floor IOPS/job"]),
            (f"{cluster} 8 flushed writers", c["4k randwrite fsync 8 writers IOPS"], "4,200 (2x Ceph)",
             4_200.0),
        ]  # fmt: skip
    rows.append(
        ("single 1M seq write QD8 MB/s", single["1M seq write QD8 MB/s"], "0.5x nbdkit file",
         0.5 * kit["1M seq write QD8 MB/s"])
    )  # fmt: skip
    print()
    print(f"{'goal (this run)':<34}{'figure':>10}  {'reference':<27}{'goal':>10}{'fig/goal':>10}")
    for what, fig, ref, goal in rows:
        ratio = fig / goal if goal else float("nan")
        mark = "met" if ratio >= 1 else f"missed by {100 * (1 - ratio):.0f}%"
        print(f"{what:<34}{fig:>10.0f}  {ref:<27}{goal:>10.0f}{ratio:>10.2f}  {mark}")
    if cluster is not None and cluster in rss:
        serving, *others = rss[cluster]
        checks = [("serving peer", serving, 200.0)]
        checks += [(f"peer {i + 2}", v, 150.0) for i, v in enumerate(others)]
        for what, mib, limit in checks:
            ratio = limit / mib if mib else float("nan")
            mark = "met" if ratio >= 1 else f"missed by {100 * (mib / limit - 1):.0f}%"
            label, ref = f"{cluster} RSS {what} MiB", f"<= {limit:.0f} MiB"
            print(f"{label:<34}{mib:>10.0f}  {ref:<27}{limit:>10.0f}{ratio:>10.2f}  {mark}")


def main(argv: list[str] | None = None) -> int:
    """Run every configuration and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB volume, 2 s fio runs")
    ap.add_argument("--size", default=None, help="volume size (default 128MiB, 64MiB with --quick)")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per fio run (5, 2 with --quick)")
    ap.add_argument("--block-size", default="512KiB", help="torus block size (default: torusctl init's)")
    ap.add_argument(
        "--only",
        default="single,3p R1,3p R2,3p R3",
        help="comma-separated torus configurations to measure (nbdkit is always measured)",
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another torus checkout: measure each configuration with it too (before/after)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy record every torusd during the randread and 1M write workloads into DIR",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="with --baseline: rounds of (baseline, this tree) per configuration; medians are printed",
    )
    args = ap.parse_args(argv)
    only = {c.strip() for c in args.only.split(",")}
    if "single" not in only:
        only.add("single")  # the ratios need it
    size = parse_size(args.size or ("64MiB" if args.quick else "128MiB"))
    runtime = args.runtime or (2.0 if args.quick else 5.0)
    tmp = Path(tempfile.mkdtemp(prefix="torus-bench-cluster-"))
    try:
        src = tmp / "src.bin"
        with src.open("wb") as f:
            f.write(os.urandom(size))
        work = workloads(src, size, runtime)
        print(
            f"volume {size >> 20} MiB, block size {args.block_size}, fio runtime {runtime:g}s; 2 cores shared"
        )
        columns: dict[str, dict[str, float]] = {}
        rss: dict[str, list[float]] = {}
        profiler = Profiler(args.profile) if args.profile is not None else None
        print("measuring the disk itself (fio psync on the temp dir's filesystem) ...")
        disk = measure_disk(size, runtime, tmp)
        print("   " + ", ".join(f"{k} {v:.0f}" for k, v in disk.items()))
        print("measuring nbdkit file ...")
        columns["nbdkit"] = measure_nbdkit(work, size, tmp)
        configs = (("single", 1, 1), ("3p R1", 3, 1), ("3p R2", 3, 2), ("3p R3", 3, 3))
        rounds = args.repeat if args.baseline is not None else 1
        # (column key, tree the children run: None is this one), baseline first in every round
        trees: list[tuple[str, Path | None]] = [("", None)]
        if args.baseline is not None:
            trees.insert(0, (" base", args.baseline.resolve()))
        recoveries: dict[str, float] = {}
        for label, peers, rep in [c for c in configs if c[0] in only]:
            runs: dict[str, list[dict[str, float]]] = {label + suffix: [] for suffix, _ in trees}
            for n in range(rounds):  # alternate the trees: drift on a shared machine hits both
                for suffix, tree in trees:
                    key = label + suffix
                    where = f" with the baseline {tree}" if tree is not None else ""
                    print(f"measuring torus {label}{where} ({n + 1}/{rounds}) ...")
                    with children_run_tree(tree) if tree is not None else contextlib.nullcontext():
                        figures, peak, rate = measure_torus(
                            work, size, tmp, peers, rep, args.block_size, recovery=rep == 2 and peers == 3,
                            profiler=profiler, tag=key.replace(" ", "-"), runtime=runtime,
                        )  # fmt: skip
                    runs[key].append(figures)
                    print("   ", _round_line(figures))
                    rss[key] = [max(a, b) for a, b in zip(peak, rss.get(key, peak), strict=True)]
                    if rate is not None:
                        recoveries[key] = rate
            for key, measured in runs.items():
                columns[key] = {name: statistics.median(m[name] for m in measured) for name, _ in work}
        labels = [lab for lab in columns if not lab.endswith(" base")]
        based = [lab for lab in labels if lab + " base" in columns]
        print()
        head = f"{'workload':<34}" + "".join(f"{lab:>10}" for lab in labels)
        head += "".join(f"{lab + '/1n':>11}" for lab in labels[2:]) + "".join(
            f"{lab + '/kit':>11}" for lab in labels[1:]
        )
        print(head + f"{'Ceph RBD':>12}")
        for name, _ in work:
            row = f"{name:<34}" + "".join(f"{columns[lab][name]:>10.1f}" for lab in labels)
            single = columns["single"][name] or float("nan")
            kit = columns["nbdkit"][name] or float("nan")
            row += "".join(f"{columns[lab][name] / single:>11.2f}" for lab in labels[2:])
            row += "".join(f"{columns[lab][name] / kit:>11.2f}" for lab in labels[1:])
            print(row + f"{CEPH[name]:>12}")
        if based:
            print()
            print(
                f"{'before/after':<34}"
                + "".join(f"{lab + ' base':>14}{lab:>10}{'ratio':>8}" for lab in based)
            )
            for name, _ in work:
                row = f"{name:<34}"
                for lab in based:
                    before, after = columns[lab + " base"][name], columns[lab][name]
                    row += f"{before:>14.1f}{after:>10.1f}{after / (before or float('nan')):>8.2f}"
                print(row)
        print()
        print("peak RSS (MiB; serving peer + the others): " + ", ".join(
            f"{k} {' + '.join(f'{v:.0f}' for v in peaks)}" for k, peaks in rss.items()
        ))  # fmt: skip
        _print_goals(columns, disk, rss)
        if "3p R2" in recoveries:
            rate = recoveries["3p R2"]
            print(f"re-replication after a peer removal (R=2): {rate:.1f} MB/s   (Ceph RBD: 10-20 MiB/s)")
        if "3p R2 base" in recoveries:
            print(f"re-replication with the baseline: {recoveries['3p R2 base']:.1f} MB/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
