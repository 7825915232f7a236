"""Keeping a metadata lease alive from a daemon thread.

A :class:`LeaseKeeper` calls ``leases.keepalive(lease)`` every ``ttl / 3`` seconds (bounded: at
least 50 ms, at most 10 s). When the backend answers :class:`~torus_core.errors.LeaseNotFound`
the lease is gone for good: the keeper marks itself :attr:`lost`, calls ``on_lost`` once and
stops. Transient failures (:class:`~torus_core.errors.MetadataUnavailable` and other torus
errors) are retried at the next tick; if the lease expires meanwhile the next keepalive reports
it lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from torus_core.errors import LeaseNotFound, TorusError
from torus_core.eventlog import Lease, LeaseStore

log = logging.getLogger(__name__)

_MIN_INTERVAL = 0.05
_MAX_INTERVAL = 10.0


def keepalive_interval(ttl: float) -> float:
    """Seconds between keepalives for a lease of ``ttl`` seconds: ttl/3, clamped to [0.05, 10]."""
    return max(_MIN_INTERVAL, min(_MAX_INTERVAL, ttl / 3.0))


class LeaseKeeper:
    """Refreshes one lease until :meth:`stop` or until the lease is reported gone."""

    def __init__(
        self,
        leases: LeaseStore,
        lease: Lease,
        *,
        on_lost: Callable[[], None] | None = None,
        name: str = "lease-keeper",
    ) -> None:
        self.leases = leases
        self.lease = lease
        self.interval = keepalive_interval(lease.ttl)
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def lost(self) -> bool:
        """True once the backend reported the lease gone."""
        return self._lost.is_set()

    def start(self) -> LeaseKeeper:
        """Start the keepalive thread."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.leases.keepalive(self.lease)
            except LeaseNotFound:
                self.mark_lost()
                return
            except TorusError as exc:
                log.warning("keepalive of lease %s failed (will retry): %s", self.lease.id, exc)
            except Exception:  # a backend bug must not kill the keeper silently
                log.exception("keepalive of lease %s failed unexpectedly", self.lease.id)

    def mark_lost(self) -> None:
        """Record that the lease is gone (also used when a commit finds the lock lost)."""
        if self._lost.is_set():
            return
        self._lost.set()
        log.error("lease %s was lost", self.lease.id)
        if self._on_lost is not None:
            try:
                self._on_lost()
            except Exception:
                log.exception("on_lost callback failed")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop refreshing and join the thread (bounded). Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
