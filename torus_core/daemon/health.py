"""Readiness of a server's disk: ``/healthz`` fails while the data directory is (nearly) full.

A full disk fails writes (NBD ``ENOSPC``), journal appends and the SQLite metadata database in
the data directory, so a load balancer or an operator must see it before clients do.
:class:`DiskSpaceCheck` is a :data:`~torus_core.http.HealthCheck`: not ready while the data
directory's file system has less than ``min_free_bytes`` available to the server, or while a
write was answered ``ENOSPC`` within the last ``recent`` seconds. The free space is measured
by a :class:`~torus_core.http.BackgroundProbe` (``statvfs`` every second), so ``/healthz``
never waits on the disk; a ``statvfs`` that hangs (a dead network file system) turns the check
unhealthy after the probe's timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from torus_core.block.nbd_export import SpaceGuard
from torus_core.errors import InvalidArgument
from torus_core.http import BackgroundProbe
from torus_core.metrics import Collector
from torus_core.units import format_size

__all__ = ["DEFAULT_MIN_FREE_BYTES", "DiskSpaceCheck", "DiskSpaceCollector"]

#: ``torusd --min-free-space`` default: room for SQLite, journal segments (8 MiB chunks) and
#: a checkpoint's blocks.
DEFAULT_MIN_FREE_BYTES = 128 << 20


class DiskSpaceCheck:
    """``(ready, reason)`` of the data directory's file system (see the module docstring).

    :param path: the data directory.
    :param min_free_bytes: below this many available bytes the server is not ready (0: never).
    :param guard: returns the :class:`SpaceGuard` that answers writes (its last ``ENOSPC``).
    :param recent: seconds an ``ENOSPC`` answer keeps the server not ready.
    :param interval: seconds between two ``statvfs`` calls.
    """

    def __init__(
        self,
        path: str,
        *,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        guard: Callable[[], SpaceGuard | None] = lambda: None,
        recent: float = 60.0,
        interval: float = 1.0,
    ) -> None:
        if not isinstance(min_free_bytes, int) or min_free_bytes < 0:
            raise InvalidArgument(f"min_free_bytes must be >= 0, got {min_free_bytes!r}")
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.guard = guard
        self.recent = recent
        #: bytes available to the server on the data directory's file system (last measure)
        self.free_bytes: int | None = None
        self.probe = BackgroundProbe(f"data directory {path}", self._measure, interval=interval, timeout=5.0)

    def _measure(self) -> None:
        st = os.statvfs(self.path)
        self.free_bytes = st.f_bavail * st.f_frsize

    def start(self) -> DiskSpaceCheck:
        """Start measuring (the first measure happens at once)."""
        self.probe.start()
        return self

    def stop(self) -> None:
        """Stop measuring."""
        self.probe.stop()

    def __call__(self) -> tuple[bool, str]:
        """``(ready, reason)``; never blocks."""
        ok, reason = self.probe.status()
        if not ok:
            return False, reason
        free = self.free_bytes
        if free is not None and free < self.min_free_bytes:
            return False, (
                f"data directory {self.path} has {format_size(free)} free, below the "
                f"{format_size(self.min_free_bytes)} minimum (--min-free-space)"
            )
        guard = self.guard()
        last = guard.last_enospc if guard is not None else None
        if last is not None:
            age = time.monotonic() - last
            if age < self.recent:
                return False, f"a write was answered ENOSPC {age:.0f} s ago (no space for its blocks)"
        return True, ""


class DiskSpaceCollector(Collector):
    """``torus_data_dir_free_bytes``: the last free-space measure of a :class:`DiskSpaceCheck`
    (absent until the first one)."""

    def __init__(self, check: DiskSpaceCheck) -> None:
        self.check = check

    def collect(self) -> Iterator[Metric]:
        """One gauge, from the check's cached measure (no I/O at scrape time)."""
        free = self.check.free_bytes
        if free is not None:
            yield GaugeMetricFamily(
                "torus_data_dir_free_bytes",
                "Bytes available to the server on its data directory's file system.",
                value=free,
            )
