"""Child process for the multi-process and SIGKILL tests (run as a script, not collected).

Usage:
    _appender.py shared URL IDX COUNT   append COUNT events to own-IDX and COUNT to "shared"
    _appender.py forever URL LIMIT      append to "kill" until LIMIT events, printing positions

Every acknowledged append is printed (and flushed) as ``stream version position`` *after*
``append`` returned, so the parent knows exactly what was acknowledged.
"""

from __future__ import annotations

import sys

from torus_sqlite.backend import SQLiteBackend

from torus_core.errors import CompareFailed
from torus_core.eventlog import NewEvent


def _ack(stream: str, version: int, position: int) -> None:
    sys.stdout.write(f"{stream} {version} {position}\n")
    sys.stdout.flush()


def shared(url: str, idx: int, count: int) -> None:
    """Race other processes on one shared stream; own stream never conflicts."""
    with SQLiteBackend.from_url(url) as backend:
        log = backend.log
        for i in range(count):
            (pos,) = log.append([NewEvent(f"own-{idx}", i + 1, "t", f"{idx}:{i}".encode())])
            _ack(f"own-{idx}", i + 1, pos)
            for _ in range(500):
                v = log.stream_version("shared") + 1
                try:
                    (pos,) = log.append([NewEvent("shared", v, "t", f"{idx}:{i}".encode())])
                except CompareFailed:
                    continue
                _ack("shared", v, pos)
                break
            else:
                raise SystemExit("shared append never succeeded")


def forever(url: str, limit: int) -> None:
    """Append two-event batches until ``limit`` events (the parent SIGKILLs us before)."""
    with SQLiteBackend.from_url(url) as backend:
        log = backend.log
        v = log.stream_version("kill")
        while v < limit:
            positions = log.append(
                [NewEvent("kill", v + 1, "t", b"a" * 100), NewEvent("kill", v + 2, "t", b"b" * 100)]
            )
            _ack("kill", v + 2, positions[-1])
            v += 2


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "shared":
        shared(url, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "forever":
        forever(url, int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
