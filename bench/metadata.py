"""Metadata benchmark: event-log appends vs. the raw client's conditional write, per backend.

One command (``.venv/bin/python bench/metadata.py [--ops N] [--writers 8]``). It starts its own
etcd and redis-server on free loopback ports (``torus_core.testing.services``), uses a
temporary SQLite file, and stops everything by PID at the end. For each backend it measures,
in the same run:

* ``log``: ``backend.log.append([one 64 B event])`` per second, one writer on one stream, and
  ``--writers`` threads each on its own stream (each thread has its own connection);
* ``raw``: the client library's own compare-and-set with the same shape —
  SQLite: one ``INSERT`` per ``engine.begin()`` transaction (SQLAlchemy, WAL, synchronous=FULL,
  the backend's pragmas); etcd: a ``Txn(mod_revision(key) == rev -> put)`` (cslab-etcd3);
  Redis: the compare-and-append ``EVALSHA`` of env-notes §3.2 (redis-py).

It prints a table with ``cost = raw rate / log rate`` (how many raw conditional writes one log
append costs). The goal is ``cost <= 1.5``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

PAYLOAD = b"x" * 64

REDIS_CAS = """
local cur = redis.call('GET', KEYS[1]); if cur == false then cur = '0' end
if cur ~= ARGV[1] then return {0, cur} end
local nxt = tostring(tonumber(cur) + 1); redis.call('SET', KEYS[1], nxt)
local id = redis.call('XADD', KEYS[2], '*', 'gen', nxt, 'data', ARGV[2]); return {1, nxt, id}
"""

#: A worker factory: given a writer index, return a function doing one operation per call.
Worker = Callable[[int], Callable[[], None]]


def rate(make_op: Worker, ops: int, writers: int) -> float:
    """Operations per second of ``writers`` threads doing ``ops`` operations in total."""
    per = max(1, ops // writers)
    fns = [make_op(i) for i in range(writers)]
    for fn in fns:  # warm up connections / caches
        fn()
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers + 1)

    def run(fn: Callable[[], None]) -> None:
        barrier.wait()
        try:
            for _ in range(per):
                fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return per * writers / elapsed


def log_worker(open_backend: Callable[[], object], tag: str) -> Worker:
    """Appends of one event to the writer's own stream."""
    from torus_core.eventlog import MetadataBackend, NewEvent

    def make(i: int) -> Callable[[], None]:
        backend = open_backend()
        assert isinstance(backend, MetadataBackend)
        stream = f"bench-{tag}-{i}-{time.monotonic_ns()}"
        version = [0]

        def op() -> None:
            version[0] += 1
            backend.log.append([NewEvent(stream, version[0], "bench.event", PAYLOAD)])

        return op

    return make


def sqlite_raw(path: Path) -> Worker:
    """One-row INSERT per transaction with the sqlite backend's pragmas."""
    from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, create_engine, event

    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _rec):  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 10000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.close()

    md = MetaData()
    kv = Table(
        "kv",
        md,
        Column("id", Integer, primary_key=True),
        Column("k", String, index=True),
        Column("v", LargeBinary),
    )
    md.create_all(engine)

    def make(i: int) -> Callable[[], None]:
        def op() -> None:
            with engine.begin() as conn:
                conn.execute(kv.insert().values(k=f"w{i}", v=PAYLOAD))

        return op

    return make


def etcd_raw(endpoint: str) -> Worker:
    """cslab-etcd3: Txn(mod_revision(key) == rev -> put), rev from the previous put."""
    import etcd3

    host, port = endpoint.rsplit(":", 1)

    def make(i: int) -> Callable[[], None]:
        client = etcd3.client(host=host, port=int(port), timeout=5)
        key = f"/bench-raw/{i}-{time.monotonic_ns()}"
        rev = [0]

        def op() -> None:
            ok, resp = client.transaction(
                compare=[client.transactions.mod(key) == rev[0]],
                success=[client.transactions.put(key, PAYLOAD)],
                failure=[],
            )
            assert ok
            rev[0] = resp[0].response_put.header.revision

        return op

    return make


def redis_raw(port: int) -> Worker:
    """redis-py: the compare-and-append EVALSHA of env-notes §3.2."""
    import redis

    def make(i: int) -> Callable[[], None]:
        r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        script = r.register_script(REDIS_CAS)
        gen_key, stream_key = f"bench-raw:{i}:{time.monotonic_ns()}:gen", f"bench-raw:{i}:stream"
        gen = [0]

        def op() -> None:
            res = script(keys=[gen_key, stream_key], args=[gen[0], PAYLOAD])
            assert res[0] == 1
            gen[0] += 1

        return op

    return make


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", type=int, default=1000, help="operations per measurement (redis: x4)")
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is printed")
    ap.add_argument("--backends", default="sqlite,etcd,redis", help="comma-separated subset to run")
    args = ap.parse_args()

    from torus_etcd.backend import EtcdBackend
    from torus_redis.backend import RedisBackend
    from torus_sqlite.backend import SQLiteBackend

    from torus_core.testing.services import etcd_service, redis_service

    tmp = Path(tempfile.mkdtemp(prefix="torus-bench-meta-"))
    rows: list[tuple[str, str, float, float]] = []
    try:
        with etcd_service() as etcd, redis_service() as rds:
            cases: list[tuple[str, Worker, Worker, int]] = [
                (
                    "sqlite",
                    log_worker(lambda: SQLiteBackend.from_url(f"sqlite:///{tmp}/log.db"), "s"),
                    sqlite_raw(tmp / "raw.db"),
                    args.ops,
                ),
                (
                    "etcd",
                    log_worker(lambda: EtcdBackend.from_url(etcd.url), "e"),
                    etcd_raw(etcd.endpoint),
                    args.ops,
                ),
                (
                    "redis",
                    log_worker(lambda: RedisBackend.from_url(rds.url), "r"),
                    redis_raw(rds.port),
                    args.ops * 4,
                ),
            ]
            wanted = set(args.backends.split(","))
            for name, log_w, raw_w, ops in cases:
                if name not in wanted:
                    continue
                for writers in (1, args.writers):
                    logs, raws = [], []
                    for _ in range(args.repeat):  # interleave log and raw runs to share the noise
                        raws.append(rate(raw_w, ops, writers))
                        logs.append(rate(log_w, ops, writers))
                    rows.append((name, f"{writers}w", statistics.median(logs), statistics.median(raws)))
                    print(
                        f"  {name} {writers}w: log {[round(x) for x in logs]} raw {[round(x) for x in raws]}"
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"{'backend':8} {'writers':>7} {'log appends/s':>14} {'raw CAS/s':>10} {'cost raw/log':>13}")
    for name, w, log_rate, raw_rate in rows:
        cost = raw_rate / log_rate
        flag = "ok" if cost <= 1.5 else "OVER 1.5"
        print(f"{name:8} {w:>7} {log_rate:14.0f} {raw_rate:10.0f} {cost:13.2f}  {flag}")


if __name__ == "__main__":
    main()
