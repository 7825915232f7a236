"""The heartbeat: publish this peer's :class:`PeerInfo` under a lease and read everyone else's.

Every ``interval`` seconds a :class:`Heartbeat` refreshes its info (``info_fn()``), keeps its
lease alive (a lease that expired — e.g. after a long pause or a metadata outage — is replaced
by a fresh one and the info re-registered; the original gave up here, #252), then lists the live
peers and hands them to ``on_peers``. Metadata errors are logged and retried at the next beat;
the thread never dies of them. The lease TTL defaults to three intervals.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from torus_core.cluster.peerinfo import PeerInfo, parse_peers
from torus_core.errors import InvalidArgument, LeaseNotFound, TorusError
from torus_core.eventlog import Lease
from torus_core.metadata import MetadataService
from torus_core.metrics import HEARTBEAT_FAILURES, PEER_LEASE_LOSSES, PEER_LEASE_RENEWALS

log = logging.getLogger(__name__)

PeersCallback = Callable[[dict[str, PeerInfo]], None]


class Heartbeat:
    """Registers ``info_fn()`` every ``interval`` seconds and reports the live peers.

    :param md: metadata service.
    :param info_fn: returns this peer's current info (called each beat).
    :param on_peers: called with ``{uuid: PeerInfo}`` of every live peer after each beat.
    :param interval: seconds between beats.
    :param ttl: lease TTL (default ``3 * interval``); must exceed ``interval``.
    """

    def __init__(
        self,
        md: MetadataService,
        info_fn: Callable[[], PeerInfo],
        on_peers: PeersCallback | None = None,
        *,
        interval: float = 2.0,
        ttl: float | None = None,
    ) -> None:
        if not isinstance(interval, int | float) or not 0 < interval <= 60:
            raise InvalidArgument(f"heartbeat interval must be in (0, 60] seconds, got {interval!r}")
        ttl = 3 * interval if ttl is None else ttl
        if not isinstance(ttl, int | float) or ttl <= interval:
            raise InvalidArgument(f"lease TTL {ttl!r} must exceed the heartbeat interval {interval}")
        self.md = md
        self.info_fn = info_fn
        self.on_peers = on_peers
        self.interval = float(interval)
        self.ttl = float(ttl)
        self.lease: Lease | None = None
        self.beats = 0
        self.failures = 0
        self.leases_granted = 0
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure_lease(self) -> tuple[Lease, bool]:
        """The current lease (kept alive) or a new one; the flag says whether it is new."""
        if self.lease is not None:
            try:
                self.md.leases.keepalive(self.lease)
                PEER_LEASE_RENEWALS.inc()
                return self.lease, False
            except LeaseNotFound:
                PEER_LEASE_LOSSES.inc()
                log.warning("heartbeat lease %s expired; granting a new one", self.lease.id)
        self.lease = self.md.leases.grant(self.ttl)
        self.leases_granted += 1
        return self.lease, True

    def beat(self) -> dict[str, PeerInfo]:
        """One heartbeat now: renew, register, list peers, notify. Raises metadata errors."""
        with self._lock:
            composed = time.time()  # before info_fn: its figures are no older than last_seen
            info = self.info_fn()
            info.last_seen = composed
            lease, _new = self._ensure_lease()
            try:
                self.md.register_peer(info.to_dict(), lease)
            except LeaseNotFound:
                # the lease vanished between keepalive and put: start over once with a new one
                self.lease = None
                lease, _new = self._ensure_lease()
                self.md.register_peer(info.to_dict(), lease)
            peers = parse_peers(self.md.list_peers())
            self.beats += 1
        if self.on_peers is not None:
            self.on_peers(peers)
        return peers

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                self.last_error = None
            except TorusError as exc:
                self.failures += 1
                HEARTBEAT_FAILURES.inc()
                self.last_error = exc
                log.warning("heartbeat failed (will retry): %s", exc)
            except Exception as exc:  # a callback bug must not stop the heartbeat
                self.failures += 1
                HEARTBEAT_FAILURES.inc()
                self.last_error = exc
                log.exception("heartbeat callback failed")
            self._stop.wait(self.interval)

    def start(self) -> Heartbeat:
        """Start beating in a daemon thread (the first beat happens at once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="torus-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self, *, unregister: bool = True, timeout: float = 5.0) -> None:
        """Stop the thread; with ``unregister`` revoke the lease (the peer info vanishes now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if unregister and self.lease is not None:
            with contextlib.suppress(TorusError):
                self.md.leases.revoke(self.lease)
            self.lease = None
