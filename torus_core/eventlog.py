"""The metadata backend contract: an append-only event log plus a lease store.

A metadata plugin registers one :class:`MetadataBackend` subclass. The backend stores opaque
events; the core (:mod:`torus_core.events`, :mod:`torus_core.metadata`) owns their meaning.

Rules every backend must honour (checked by :mod:`torus_core.testing.eventlog`):

* ``append`` is atomic for the whole batch, which may span streams. Each :class:`NewEvent`
  carries the stream version it will get; versions in a stream are exactly ``1, 2, 3, ...``.
  If any event's version is not the stream's current version + 1 (counting earlier events of
  the same batch), the append raises :class:`~torus_core.errors.CompareFailed` and writes
  nothing.
* Every stored event gets a global ``position``: strictly increasing, gap-free (1, 2, 3, ...),
  assigned in the same atomic write, in commit order.
* Calls that cannot reach the server within the backend's timeout raise
  :class:`~torus_core.errors.MetadataUnavailable` (retryable) and never leave a partial append.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: ``state`` is opaque bytes owned by the core's transcoder."""

    stream_id: str
    version: int
    topic: str
    state: bytes


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back, with its global position and the append's wall-clock time."""

    stream_id: str
    version: int
    topic: str
    state: bytes
    position: int
    timestamp: float = 0.0


class EventLog(ABC):
    """Append-only, optimistically concurrent event storage."""

    @abstractmethod
    def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Atomically append ``events``; return their global positions in order.

        Raises :class:`~torus_core.errors.CompareFailed` (nothing written) when an event's
        version is not its stream's next version. An empty batch returns ``[]``.
        """

    @abstractmethod
    def read_stream(self, stream_id: str, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events of one stream with version > ``after``, oldest first."""

    @abstractmethod
    def stream_version(self, stream_id: str) -> int:
        """Current version of a stream (0 if it has no events)."""

    @abstractmethod
    def read_all(self, *, after: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Events with position > ``after`` in position order."""

    @abstractmethod
    def head_position(self) -> int:
        """Position of the newest event (0 for an empty log)."""

    @abstractmethod
    def wait_for_events(self, after: int, timeout: float) -> list[StoredEvent]:
        """Block until events with position > ``after`` exist or ``timeout`` seconds pass.

        Returns the new events (possibly ``[]`` on timeout). Backends with server push use it
        (etcd watch, Redis blocking read); others may poll at a bounded interval.
        """

    @abstractmethod
    def save_snapshot(self, name: str, position: int, state: bytes) -> None:
        """Store a projection snapshot taken at ``position`` (replaces an older one)."""

    @abstractmethod
    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        """Return ``(position, state)`` of the stored snapshot, or ``None``."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease: keys attached to it vanish when it expires or is revoked."""

    id: int
    ttl: float
    granted_at: float = field(default_factory=time.time)


class LeaseStore(ABC):
    """Ephemeral TTL keys for peer liveness and volume locks (not history, not events)."""

    @abstractmethod
    def grant(self, ttl: float) -> Lease:
        """Create a lease that expires ``ttl`` seconds from now unless kept alive."""

    @abstractmethod
    def keepalive(self, lease: Lease) -> None:
        """Extend the lease by its ttl; raises :class:`~torus_core.errors.LeaseNotFound` if gone."""

    @abstractmethod
    def revoke(self, lease: Lease) -> None:
        """End the lease now and delete its keys. Revoking a missing lease is a no-op."""

    @abstractmethod
    def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        """Set ``key`` (attached to ``lease`` if given)."""

    @abstractmethod
    def put_if_absent(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        """Set ``key`` only if it does not exist (or expired); return whether it was set."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """Value of a live key, or ``None``."""

    @abstractmethod
    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """All live keys starting with ``prefix``."""

    @abstractmethod
    def delete(self, key: str, *, expected: bytes | None = None) -> bool:
        """Delete ``key`` (only if its value equals ``expected``, when given); return whether deleted."""


class MetadataBackend(ABC):
    """One metadata plugin's connection: an :class:`EventLog` and a :class:`LeaseStore`.

    Registered by name through ``torus_register_metadata_backends``; the URL schemes that select
    it are its name unless its plugin declares others (``torus_declare_backends``).
    """

    #: Registered name (``sqlite``, ``etcd``, ``redis``).
    name: ClassVar[str]

    @classmethod
    def prepare_local(cls, url: str) -> None:
        """Create what ``url`` needs on this machine before a server opens it (default: nothing).

        Called by ``torusd``/``torusblk`` (not by ``torusctl``) so a node's embedded metadata can
        live in a directory that does not exist yet, e.g. sqlite's database directory.
        """
        return None

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, options: Mapping[str, Any] | None = None) -> MetadataBackend:
        """Connect to the backend named by ``url`` (e.g. ``sqlite:///var/lib/torus/meta.db``)."""

    @property
    @abstractmethod
    def log(self) -> EventLog:
        """The event log."""

    @property
    @abstractmethod
    def leases(self) -> LeaseStore:
        """The lease store."""

    @abstractmethod
    def wipe(self) -> None:
        """Delete every event, snapshot and lease of this cluster (``torusctl wipe``)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self) -> MetadataBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
