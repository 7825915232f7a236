"""Keeping a metadata lease alive from a daemon thread.

A :class:`LeaseKeeper` calls ``leases.keepalive(lease)`` every ``ttl / 3`` seconds (bounded: at
least 50 ms, at most 10 s). When the backend answers :class:`~torus_core.errors.LeaseNotFound`
the lease is gone for good: the keeper marks itself :attr:`lost`, calls ``on_lost`` once and
stops.

Transient failures (:class:`~torus_core.errors.MetadataUnavailable`, a timed-out call, any
other error of the backend) are retried quickly (every ``min(ttl/12, 0.25 s)``) rather than at
the next regular tick, so a metadata outage that ends before the lease runs out does not lose
the lock: an outage of up to ``2/3`` of the TTL is always survived (it may start just before a
renewal was due), one of almost the whole TTL if it starts right after a renewal. The keeper
also knows when the lease may have expired on the server: the server-side expiry is at the
earliest ``ttl`` seconds after the *start* of the last keepalive that succeeded. Once that time
passes without a successful renewal a watchdog thread declares the lease lost, even while a
keepalive call is still hanging, instead of waiting for the backend to come back and say so:
by then another holder may legitimately own the lock, so this one must stop writing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from torus_core.errors import LeaseNotFound, TorusError
from torus_core.eventlog import Lease, LeaseStore
from torus_core.metrics import VOLUME_LEASE_LOSSES, VOLUME_LEASE_RENEWAL_FAILURES, VOLUME_LEASE_RENEWALS

log = logging.getLogger(__name__)

_MIN_INTERVAL = 0.05
_MAX_INTERVAL = 10.0
_MAX_RETRY = 0.25


def keepalive_interval(ttl: float) -> float:
    """Seconds between keepalives for a lease of ``ttl`` seconds: ttl/3, clamped to [0.05, 10]."""
    return max(_MIN_INTERVAL, min(_MAX_INTERVAL, ttl / 3.0))


def retry_interval(ttl: float) -> float:
    """Seconds between retries after a failed keepalive: ttl/12, clamped to [0.05, 0.25]."""
    return max(_MIN_INTERVAL, min(_MAX_RETRY, ttl / 12.0))


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
        self.retry = retry_interval(lease.ttl)
        #: keepalives that succeeded / failed (transient errors) since start
        self.renewals = 0
        self.failures = 0
        # Earliest monotonic time the lease may have expired on the server (granted_at is
        # wall-clock; the difference converts it).
        age = max(0.0, time.time() - lease.granted_at)
        self._expires = time.monotonic() - age + lease.ttl
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)

    @property
    def lost(self) -> bool:
        """True once the backend reported the lease gone."""
        return self._lost.is_set()

    def start(self) -> LeaseKeeper:
        """Start the keepalive thread and its deadline watchdog."""
        self._thread.start()
        self._watchdog.start()
        return self

    @property
    def expires_in(self) -> float:
        """Seconds until the lease may expire on the server unless renewed (negative: overdue)."""
        return self._expires - time.monotonic()

    def _run(self) -> None:
        delay = self.interval
        failing_since: float | None = None
        while not self._stop.wait(delay):
            started = time.monotonic()
            try:
                self.leases.keepalive(self.lease)
            except LeaseNotFound:
                self.mark_lost()
                return
            except Exception as exc:  # transient (or a backend bug): retry until the lease runs out
                self.failures += 1
                VOLUME_LEASE_RENEWAL_FAILURES.inc()
                now = time.monotonic()
                if now >= self._expires:
                    self._expired(now - (failing_since if failing_since is not None else started), exc)
                    return
                if failing_since is None:
                    failing_since = started
                    if isinstance(exc, TorusError):
                        log.warning(
                            "keepalive of lease %s failed, retrying every %.2f s for up to %.1f s: %s",
                            self.lease.id,
                            self.retry,
                            self._expires - now,
                            exc,
                        )
                    else:
                        log.exception("keepalive of lease %s failed unexpectedly (retrying)", self.lease.id)
                delay = min(self.retry, max(0.0, self._expires - now))
                continue
            self._expires = started + self.lease.ttl
            self.renewals += 1
            VOLUME_LEASE_RENEWALS.inc()
            if failing_since is not None:
                log.warning(
                    "keepalive of lease %s succeeded again after %.1f s of failures",
                    self.lease.id,
                    time.monotonic() - failing_since,
                )
                failing_since = None
            delay = max(0.0, min(self.interval, self._expires - time.monotonic() - self.interval))

    def _watch(self) -> None:
        """Declare the lease lost at its earliest server-side expiry, even if a keepalive hangs."""
        while not self._stop.wait(max(0.0, self._expires - time.monotonic())):
            if self._lost.is_set():
                return
            overdue = time.monotonic() - self._expires
            if overdue >= 0:
                self._expired(self.lease.ttl + overdue, None)
                return

    def _expired(self, unrenewed_for: float, exc: BaseException | None) -> None:
        if self._lost.is_set() or self._stop.is_set():
            return
        log.error(
            "lease %s (ttl %g s) not renewed for %.1f s: it may have expired, giving it up%s",
            self.lease.id,
            self.lease.ttl,
            unrenewed_for,
            f" (last error: {exc})" if exc is not None else "",
        )
        self.mark_lost()

    def mark_lost(self) -> None:
        """Record that the lease is gone (also used when a commit finds the lock lost)."""
        if self._lost.is_set():
            return
        self._lost.set()
        VOLUME_LEASE_LOSSES.inc()
        log.error("lease %s was lost", self.lease.id)
        if self._on_lost is not None:
            try:
                self._on_lost()
            except Exception:
                log.exception("on_lost callback failed")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop refreshing and join the threads (bounded). Idempotent."""
        self._stop.set()
        for thread in (self._thread, self._watchdog):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)
