"""Membership: keep the peer directory in step with the heartbeats, and the ring with the log.

* :class:`Membership` takes each heartbeat's ``{uuid: PeerInfo}``: live peers with an address
  go into the :class:`~torus_core.distributor.PeerDirectory` (and are marked up); ring members
  that stopped heartbeating are marked down, so the distributor skips them at once instead of
  waiting for deadlines. Peers that report a protocol version below
  :data:`~torus_core.cluster.peerinfo.MIN_PROTOCOL_VERSION` are treated as down and warned about.
  When a peer appears, disappears, moves or restarts (new boot id), ``on_change`` is called (the
  node wakes its rebalancer: handoff copies can go home, lost copies be replaced).
* :class:`RingWatcher` follows the metadata event log (``MetadataService.follow``, which uses the
  backend's push/blocking wait) in a thread and applies every ``RingChanged`` at once, so a ring
  change reaches every peer within the follow timeout (0.5 s by default). It also re-reads the
  ring every ``resync`` seconds in case an event was missed (e.g. across a metadata outage).
  Ring versions never go backwards (a stale ring is ignored, never applied).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from torus_core.cluster.peerinfo import MIN_PROTOCOL_VERSION, PeerInfo
from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import StaleRing, TorusError
from torus_core.events import RingChanged
from torus_core.metadata import MetadataService
from torus_core.registry import Registry
from torus_core.ring.base import Ring, RingSpec
from torus_core.ring.codec import ring_from_spec

log = logging.getLogger(__name__)


class Membership:
    """Applies heartbeat results to a :class:`PeerDirectory`.

    :param directory: the directory the distributor dials from.
    :param self_uuid: this process's UUID (never marked down).
    :param self_address: this process's own RPC address (kept in the directory).
    :param ring_members: returns the current ring's member UUIDs.
    :param on_change: called (from the heartbeat thread) after a heartbeat whose live peers
        differ from the previous one's in who is there, their address or their boot id; not
        called for the first heartbeat.
    """

    def __init__(
        self,
        directory: PeerDirectory,
        self_uuid: str,
        self_address: str = "",
        ring_members: Callable[[], list[str]] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.on_change = on_change
        self._signature: dict[str, tuple[str, str]] | None = None
        self.self_uuid = self_uuid
        self.self_address = self_address
        self.ring_members = ring_members or (lambda: [])
        self.live: dict[str, PeerInfo] = {}
        self.incompatible: set[str] = set()
        self._lock = threading.Lock()

    def apply(self, peers: dict[str, PeerInfo]) -> None:
        """Make the directory reflect ``peers`` (the live peers of one heartbeat)."""
        compatible: dict[str, PeerInfo] = {}
        bad: set[str] = set()
        for uuid, info in peers.items():
            if info.protocol_version < MIN_PROTOCOL_VERSION:
                bad.add(uuid)
            else:
                compatible[uuid] = info
        for uuid in bad - self.incompatible:
            log.error(
                "peer %s speaks protocol %d, older than the minimum %d; ignoring it",
                uuid,
                peers[uuid].protocol_version,
                MIN_PROTOCOL_VERSION,
            )
        addresses = {u: i.address for u, i in compatible.items() if i.address}
        if self.self_address:
            addresses[self.self_uuid] = self.self_address
        self.directory.update(addresses)
        for uuid in addresses:
            self.directory.set_down(uuid, False)
        known = set(self.directory.snapshot()) | set(self.ring_members())
        for uuid in known - set(addresses):
            if uuid != self.self_uuid:
                self.directory.set_down(uuid, True)
        with self._lock:
            self.live = compatible
            self.incompatible = bad
        signature = {u: (i.address, i.boot_id) for u, i in compatible.items() if i.address}
        changed = self._signature is not None and signature != self._signature
        self._signature = signature
        if changed and self.on_change is not None:
            self.on_change()

    def live_peers(self) -> dict[str, PeerInfo]:
        """The compatible live peers of the last heartbeat."""
        with self._lock:
            return dict(self.live)


class RingWatcher:
    """Follows the event log and calls ``on_ring(ring)`` for every newer ring.

    :param md: metadata service.
    :param on_ring: called with each newer ring (in version order); exceptions are logged.
    :param follow_timeout: how long one wait on the log may block.
    :param resync: seconds between full re-reads of the current ring.
    """

    def __init__(
        self,
        md: MetadataService,
        on_ring: Callable[[Ring], None],
        *,
        follow_timeout: float = 0.5,
        resync: float = 10.0,
    ) -> None:
        self.md = md
        self.on_ring = on_ring
        #: the process's ring-type registry (the one ``md`` was built with)
        self.ring_types: Registry = md.ring_types
        self.follow_timeout = follow_timeout
        self.resync = resync
        self.version = 0
        self.position = 0
        self.changes_seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _offer(self, spec: RingSpec) -> None:
        if spec.version <= self.version:
            return
        try:
            ring = ring_from_spec(self.ring_types, spec)
        except TorusError as exc:
            log.error("ignoring undecodable ring v%d: %s", spec.version, exc)
            return
        try:
            self.on_ring(ring)
        except StaleRing:
            pass
        except Exception:
            log.exception("applying ring v%d failed", spec.version)
            return
        self.version = spec.version
        self.changes_seen += 1

    def sync(self) -> None:
        """Read the current ring and log position now (raises metadata errors)."""
        state = self.md.state()
        if state.ring is not None:
            self._offer(state.ring)
        self.position = max(self.position, state.position)

    def _run(self) -> None:
        last_sync = time.monotonic()
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_sync > self.resync:
                    self.sync()
                    last_sync = time.monotonic()
                events = self.md.follow(self.position, self.follow_timeout)
                for rec in events:
                    if isinstance(rec.event, RingChanged):
                        self._offer(rec.event.spec)
                    self.position = max(self.position, rec.position)
                backoff = 0.1
            except TorusError as exc:
                log.warning("ring watcher: %s (retrying)", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                last_sync = 0.0  # re-read the ring once the metadata is back

    def start(self) -> RingWatcher:
        """Sync once (errors propagate), then follow in a daemon thread."""
        self.sync()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="torus-ring-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following (bounded by the follow timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
