#!/usr/bin/env python3
"""Benchmark the torus AoE target against vblade through the test initiator, in one run.

    .venv/bin/python bench/aoe.py [--size 64] [--mtu 1500 --mtu 9000] [--repeat 3]

Needs root (raw sockets, veth). For each MTU: one veth pair; on its target end ``vblade 1 1``
serves a sparse file and ``torusblk aoe bench IFACE 1 2`` a volume of a single-node
file-store cluster (64 KiB blocks, ``crc,base``), one at a time (a second AoE socket on the
interface would take CPU from the one measured). The initiator (``torus_core.testing.aoe``,
pipelined up to the target's buffer count, at most 16 requests in flight) writes SIZE MiB of
urandom data, FLUSHes, and reads it back, on torus then right away on vblade (each started
for its run and stopped after it), ``--repeat``
times (median shown). The read-back is compared. Prints MB/s (10^6 bytes/s) and torus/vblade
ratios. Both processes are stopped by PID; the veth pair is deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torus_core.testing.aoe import Initiator, veth_pair

BIN = Path(sys.executable).parent
MiB = 1 << 20


def start(cmd: list[str], env: dict[str, str] | None, err: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err.open("wb"), env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"{cmd[0]} did not start: {err.read_text()}")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_one(ini: Initiator, data: bytes) -> tuple[float, float, float]:
    t0 = time.monotonic()
    ini.write(0, data)
    t1 = time.monotonic()
    ini.flush()
    t2 = time.monotonic()
    back = ini.read(0, len(data))
    t3 = time.monotonic()
    assert back == data, "read-back differs"
    return len(data) / (t1 - t0) / 1e6, (t2 - t1), len(data) / (t3 - t2) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="MiB written and read per run")
    ap.add_argument("--mtu", type=int, action="append", help="veth MTU (repeatable; default 1500 and 9000)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    mtus = args.mtu or [1500, 9000]
    size = args.size * MiB
    tmp = Path(tempfile.mkdtemp(prefix="aoe-bench-"))
    data = os.urandom(size)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORUS_")}
    env["TORUS_METADATA"] = f"sqlite:///{tmp}/data/metadata.db"
    (tmp / "data").mkdir()
    ctl = [str(BIN / "torusctl"), "--data-dir", str(tmp / "data")]
    subprocess.run([*ctl, "init", "--block-size", "64KiB"], check=True, env=env, capture_output=True)
    subprocess.run([*ctl, "volume", "create-block", "bench", f"{args.size}MiB"], check=True, env=env)
    img = tmp / "vblade.img"
    with img.open("wb") as f:
        f.truncate(size)
    rows = []
    try:
        for mtu in mtus:
            res: dict[str, list[tuple[float, float, float]]] = {"torus": [], "vblade": []}
            retrans = {"torus": 0, "vblade": 0}
            sectors = 0
            with veth_pair(mtu) as (t_if, i_if):
                tcmd = [str(BIN / "torusblk"), "aoe", "--data-dir", str(tmp / "data")]
                tcmd += ["--size", f"{8 * args.size * args.repeat}MiB", "bench", t_if, "1", "2"]
                for _ in range(args.repeat):
                    for name, cmd, minor, penv in (
                        ("torus", tcmd, 2, env),
                        ("vblade", ["vblade", "1", "1", t_if, str(img)], 1, None),
                    ):
                        with Initiator(i_if, 1, minor, timeout=2) as ini:
                            proc = start(cmd, penv, tmp / f"{name}.err")
                            try:
                                ini.discover()
                                res[name].append(run_one(ini, data))
                                retrans[name] += ini.retransmits
                                sectors = ini.max_sectors
                            finally:
                                stop(proc)
            med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in res.items()}
            rows.append((mtu, sectors, med, retrans))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"AoE {args.size} MiB write / FLUSH / read, median of {args.repeat}; load avg {load:.1f}")
    print(
        f"{'MTU':>5} {'sect':>4}  {'torus W':>8} {'vblade W':>8} {'ratio':>5}  "
        f"{'torus R':>8} {'vblade R':>8} "
        f"{'ratio':>5}  {'torus flush s':>13}"
    )
    for mtu, sectors, med, retrans in rows:
        t, v = med["torus"], med["vblade"]
        print(
            f"{mtu:>5} {sectors:>4}  {t[0]:>8.1f} {v[0]:>8.1f} {t[0] / v[0]:>5.2f}  "
            f"{t[2]:>8.1f} {v[2]:>8.1f} "
            f"{t[2] / v[2]:>5.2f}  {t[1]:>13.2f}  "
            f"retransmits torus {retrans['torus']} vblade {retrans['vblade']}"
        )


if __name__ == "__main__":
    main()
