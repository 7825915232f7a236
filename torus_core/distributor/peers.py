"""The peer directory: which address each peer UUID answers on.

The membership/heartbeat code feeds it (:meth:`PeerDirectory.update` / :meth:`replace`); the
distributor reads it on every remote call. Peers may be marked down (timed out) so calls skip
them at once instead of waiting for a deadline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

#: Called with the old address of a peer whose address changed or that was removed.
AddressDropped = Callable[[str], None]


class PeerDirectory:
    """Thread-safe ``uuid -> address`` map with a per-peer "down" flag.

    Peers with an empty address (clients) are kept but are not dialable.
    """

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._addresses: dict[str, str] = {}
        self._down: set[str] = set()
        self._listeners: list[AddressDropped] = []
        if mapping:
            self.update(mapping)

    def on_address_dropped(self, callback: AddressDropped) -> None:
        """Register ``callback(old_address)`` for addresses that changed or were removed."""
        with self._lock:
            self._listeners.append(callback)

    def _notify(self, dropped: Iterable[str]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for addr in dropped:
            if addr:
                for cb in listeners:
                    cb(addr)

    def update(self, mapping: Mapping[str, str]) -> None:
        """Add or change the addresses in ``mapping``; other peers are kept."""
        dropped: list[str] = []
        with self._lock:
            for uuid, addr in mapping.items():
                old = self._addresses.get(uuid)
                if old is not None and old != addr:
                    dropped.append(old)
                self._addresses[uuid] = addr
        self._notify(dropped)

    def replace(self, mapping: Mapping[str, str]) -> None:
        """Make ``mapping`` the complete directory (peers not in it are removed)."""
        dropped: list[str] = []
        with self._lock:
            for uuid, old in self._addresses.items():
                if mapping.get(uuid) != old:
                    dropped.append(old)
            self._addresses = dict(mapping)
            self._down &= set(self._addresses)
        self._notify(dropped)

    def remove(self, uuids: Iterable[str]) -> None:
        """Forget ``uuids``."""
        dropped: list[str] = []
        with self._lock:
            for uuid in uuids:
                old = self._addresses.pop(uuid, None)
                self._down.discard(uuid)
                if old is not None:
                    dropped.append(old)
        self._notify(dropped)

    def set_down(self, uuid: str, down: bool = True) -> None:
        """Mark a peer as timed out (skipped without dialling) or back up."""
        with self._lock:
            if down:
                self._down.add(uuid)
            else:
                self._down.discard(uuid)

    def is_down(self, uuid: str) -> bool:
        """Whether ``uuid`` is marked down."""
        with self._lock:
            return uuid in self._down

    def address(self, uuid: str) -> str | None:
        """The dialable address of ``uuid``: None if unknown, addressless or marked down."""
        with self._lock:
            if uuid in self._down:
                return None
            return self._addresses.get(uuid) or None

    def snapshot(self) -> dict[str, str]:
        """A copy of the ``uuid -> address`` map."""
        with self._lock:
            return dict(self._addresses)

    def __contains__(self, uuid: object) -> bool:
        with self._lock:
            return uuid in self._addresses

    def __len__(self) -> int:
        with self._lock:
            return len(self._addresses)
