"""Metadata part of a flushed write on SQLite: ``allocate_inode_index`` + ``commit_inode`` per flush.

One command (``.venv/bin/python bench/metadata_flush.py [--flushes N] [--repeat R]``). A block
volume's ``sync()`` after a write costs, on the metadata side, one INode index allocation (each
sync starts a new write session) and one fenced commit. This measures exactly that pair on a
locked volume of a temporary SQLite metadata file (WAL, ``synchronous=FULL``), and, in the same
run and directory, the reference: one durable conditional write with the ``sqlite3`` module
(``BEGIN IMMEDIATE``; ``SELECT max(version)``; ``INSERT``; ``COMMIT``, same pragmas) — the least
any durable metadata commit can cost.

It prints, per run, wall milliseconds per flush and CPU milliseconds per flush (``process_time``:
the Python + SQLite work, without waiting for the disk), for both, and ``cost = flush wall /
reference wall`` (how many minimal durable writes the metadata of one flush costs; 1.0 is the
floor). Medians over ``--repeat`` alternating pairs; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path


def _flushes(tmp: Path, n: int) -> tuple[float, float]:
    """(wall s, cpu s) per allocate+commit pair, after a warm-up."""
    from torus_sqlite.backend import SQLiteBackend

    from torus_core.metadata import MetadataService
    from torus_core.refs import INodeRef
    from torus_core.ring.builtin import builtin_ring_types

    db = tmp / f"m-{time.monotonic_ns()}.db"
    with SQLiteBackend.from_url(f"sqlite:///{db}") as backend:
        md = MetadataService(backend, ring_types=builtin_ring_types())
        md.format(512 * 1024, "crc,base")
        vol = md.create_volume("v", 1 << 30)
        lease = backend.leases.grant(60.0)
        lock = md.lock_volume("v", "bench", lease)
        for _ in range(20):
            md.commit_inode(lock, INodeRef(vol.id, md.allocate_inode_index(vol.id)))
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            md.commit_inode(lock, INodeRef(vol.id, md.allocate_inode_index(vol.id)))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        md.unlock(lock)
        backend.leases.revoke(lease)
    return wall / n, cpu / n


def _reference(tmp: Path, n: int) -> tuple[float, float]:
    """(wall s, cpu s) per minimal durable conditional insert with the sqlite3 module."""
    db = tmp / f"r-{time.monotonic_ns()}.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(
            "CREATE TABLE ev (position INTEGER PRIMARY KEY, stream TEXT, version INTEGER, data BLOB,"
            " UNIQUE (stream, version))"
        )
        payload = b"x" * 120

        def one(i: int) -> None:
            conn.execute("BEGIN IMMEDIATE")
            sql = "SELECT coalesce(max(version), 0) FROM ev WHERE stream = ?"
            (v,) = conn.execute(sql, ("s",)).fetchone()
            conn.execute("INSERT INTO ev (stream, version, data) VALUES (?, ?, ?)", ("s", v + 1, payload))
            conn.execute("COMMIT")

        for i in range(20):
            one(i)
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            one(i)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        conn.close()
    return wall / n, cpu / n


def main() -> None:
    """Run the pairs and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flushes", type=int, default=300, help="allocate+commit pairs per run")
    ap.add_argument("--repeat", type=int, default=5, help="flush/reference run pairs (medians printed)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    flush: list[tuple[float, float]] = []
    ref: list[tuple[float, float]] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="torus-bench-mdflush-") as d:
        tmp = Path(d)
        for i in range(args.repeat):
            if i % 2:
                r = _reference(tmp, args.flushes)
                f = _flushes(tmp, args.flushes)
            else:
                f = _flushes(tmp, args.flushes)
                r = _reference(tmp, args.flushes)
            flush.append(f)
            ref.append(r)
            ratios.append(f[0] / r[0])
    fw, fc = statistics.median(x[0] for x in flush), statistics.median(x[1] for x in flush)
    rw, rc = statistics.median(x[0] for x in ref), statistics.median(x[1] for x in ref)
    print(f"{'what':<34}{'wall ms':>10}{'cpu ms':>10}{'per s':>10}")
    print(f"{'flush metadata (alloc + commit)':<34}{fw * 1e3:>10.3f}{fc * 1e3:>10.3f}{1 / fw:>10.0f}")
    print(f"{'reference (1 durable sqlite3 tx)':<34}{rw * 1e3:>10.3f}{rc * 1e3:>10.3f}{1 / rw:>10.0f}")
    print(f"cost = flush wall / reference wall: {statistics.median(ratios):.2f} (floor 1.0)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
