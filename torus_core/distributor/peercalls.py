"""One way to call a peer by UUID, and what a failed call teaches about it.

Every remote operation of the distributor (a read, a replica write, a flush, an existence check,
a repair) has the same shape: find the peer's address, take its pooled channel, call, and on
:class:`~torus_core.errors.PeerUnavailable` drop the channel (the next call dials again) and
try that peer after the others for a while. :class:`PeerCalls` is that shape, once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import PeerUnavailable
from torus_core.rpc.client import PeerClient, PeerClientPool

T = TypeVar("T")


class PeerCalls:
    """Calls to peers by UUID, with a short memory of the peers that just failed.

    :param peers: the ``uuid -> address`` directory (membership feeds it).
    :param pool: pooled channels to the peers' addresses.
    :param suspect_seconds: how long a peer whose call failed is tried after the others
        (:meth:`healthy_first`; write placement uses it as a last resort meanwhile).
    """

    def __init__(self, peers: PeerDirectory, pool: PeerClientPool, suspect_seconds: float) -> None:
        self.peers = peers
        self.pool = pool
        self.suspect_seconds = suspect_seconds
        self._suspects: dict[str, float] = {}
        self._lock = threading.Lock()

    def call(self, uuid: str, fn: Callable[[PeerClient], T]) -> T:
        """``fn(client)`` on ``uuid``'s channel.

        Raises :class:`PeerUnavailable` at once for a peer without a known address (or marked
        down). A call that raises :class:`PeerUnavailable` resets the channel and makes the
        peer suspect; any other error is the peer's answer and passes through untouched.
        """
        address = self.peers.address(uuid)
        if address is None:
            raise PeerUnavailable(f"peer {uuid} has no known address or is down")
        try:
            return fn(self.pool.get(address))
        except PeerUnavailable:
            self.pool.reset(address)
            self.suspect(uuid)
            raise

    def dialable(self, uuid: str) -> bool:
        """Whether ``uuid`` has a known address (it is neither down nor a client)."""
        return self.peers.address(uuid) is not None

    def suspect(self, uuid: str) -> None:
        """Mark ``uuid`` as just failed (a timeout outside :meth:`call` counts too)."""
        with self._lock:
            self._suspects[uuid] = time.monotonic() + self.suspect_seconds

    def is_suspect(self, uuid: str) -> bool:
        """Whether ``uuid`` failed within the last ``suspect_seconds``."""
        if not self._suspects:  # the common case, on every append and read: no lock
            return False
        with self._lock:
            until = self._suspects.get(uuid)
            if until is None:
                return False
            if until <= time.monotonic():
                del self._suspects[uuid]
                return False
            return True

    def healthy_first(self, uuids: Sequence[str]) -> list[str]:
        """``uuids`` with peers marked down or suspect moved to the end (order kept otherwise)."""
        good = [u for u in uuids if not self.is_suspect(u) and not self.peers.is_down(u)]
        if len(good) == len(uuids):
            return list(uuids)
        return good + [u for u in uuids if u not in good]
