"""``MetadataService``: the only metadata API the rest of torus uses.

Commands read the projected :class:`~torus_core.projection.ClusterState`, validate, and
append events with the stream versions they read, so the event log's optimistic concurrency
decides every race: a loser gets :class:`~torus_core.errors.CompareFailed` from the log, re-reads
and either retries (bounded, where retrying is safe) or reports what it now sees
(``AlreadyExists``, ``Locked``, ...). See :mod:`torus_core.events` for the streams.

Volume ids are the versions of the ``volume-ids`` stream: 1, 2, 3, ... (the Go original started
at 2; nothing depends on that). They are never reused, even after a delete; names are.

Locks: the lock key ``volume-lock/<id>`` lives in the lease store, attached to the holder's
lease (liveness), and each acquisition also appends ``VolumeLockAcquired`` with a new epoch to
the volume's stream (history and fencing). :meth:`MetadataService.commit_inode` appends with
the stream version the holder last saw; if another acquisition happened since, the holder gets
:class:`~torus_core.errors.Locked` and its commit is not written.

The flush hot path (a write session's ``allocate_inode_index`` + ``commit_inode``) costs one
append and no projection catch-up:

* the commit appends ``INodeCommitted`` and, in the same atomic batch, ``INodeIndexAllocated``
  for the holder's *next* session; the next allocation hands that index out after one stream
  version read proves nothing was appended to the volume since (otherwise it allocates anew).
  The reserved index is allocated in the projection, so the GC's "index >= highest allocated is
  in flight" rule keeps the blocks of the session using it, exactly as before;
* each lock's ``seen_version`` advances past this service's own non-fencing appends to its
  stream (allocations, snapshot saves, resizes), so the commit does not fail and re-read;
* the projector applies this service's own appends locally (same decoding as a reader of the
  log), so ``state()`` is one head read when nobody else wrote.

Fencing is unchanged: before each fenced append the lock key is read from the lease store (a
holder whose lease expired or was revoked fails its next commit even if nobody took over), and
the append's expected version makes the log refuse a holder after any acquisition, release,
delete or restore.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torus_core.errors import (
    Again,
    AlreadyExists,
    CompareFailed,
    InvalidArgument,
    Locked,
    MetadataError,
    NoGlobalMetadata,
    NonSequentialRing,
    NotExist,
)
from torus_core.eventlog import Lease, LeaseStore, MetadataBackend, NewEvent
from torus_core.events import (
    CLUSTER_STREAM,
    REGISTRY,
    RING_STREAM,
    VOLUME_IDS_STREAM,
    ClusterFormatted,
    DomainEvent,
    INodeCommitted,
    INodeIndexAllocated,
    RecordedEvent,
    RingChanged,
    SnapshotDeleted,
    SnapshotRequested,
    SnapshotRestored,
    SnapshotSaved,
    TopicRegistry,
    VolumeCreated,
    VolumeDeleted,
    VolumeIdAllocated,
    VolumeLockAcquired,
    VolumeLockReleased,
    VolumeNameClaimed,
    VolumeNameReleased,
    VolumeResized,
    name_stream,
    volume_stream,
)
from torus_core.metrics import METADATA_APPEND_SECONDS
from torus_core.projection import ClusterState, GlobalMetadata, Projector, SnapshotInfo, VolumeState
from torus_core.refs import VOLUME_MAX, INodeRef
from torus_core.registry import Registry
from torus_core.ring.base import RingSpec

__all__ = [
    "GlobalMetadata",
    "LockHolder",
    "LockStatus",
    "MetadataService",
    "SnapshotInfo",
    "VolumeInfo",
    "VolumeLock",
    "format_owner",
    "parse_owner",
]

log = logging.getLogger(__name__)

#: Attempts for commands that re-read and retry after losing a race.
MAX_ATTEMPTS = 32
#: Backoff between attempts: a uniform random sleep in [0, min(RETRY_CAP, RETRY_BASE * 2**n)]
#: ("full jitter"), so writers that collided do not collide again in lock step.
RETRY_BASE = 0.001
RETRY_CAP = 0.05

_T = TypeVar("_T")
#: What a command's decide step returns: the events to append (none: nothing to write) and the
#: command's result once they are appended.
Decision = tuple[Sequence[NewEvent], _T]
#: Lease-store key prefixes.
LOCK_PREFIX = "volume-lock/"
PEER_PREFIX = "peers/"
#: Lease-store key (no lease: permanent) of the cluster key peers prove membership with.
CLUSTER_KEY = "cluster/peer-key"
#: Bytes of a cluster key made by :meth:`MetadataService.cluster_key`.
CLUSTER_KEY_BYTES = 32
_MAX_NAME = 255
#: Events after which an earlier lock holder may no longer write (the slow path reports Locked).
_FENCING_TOPICS = frozenset(
    cls.TOPIC for cls in (VolumeLockAcquired, VolumeLockReleased, VolumeDeleted, SnapshotRestored)
)


@dataclass(frozen=True)
class VolumeInfo:
    """A volume as callers see it."""

    id: int
    name: str
    size: int
    type: str = "block"


@dataclass
class VolumeLock:
    """A held single-writer lock. ``seen_version`` is updated by each successful commit."""

    volume_id: int
    name: str
    owner: str
    epoch: int
    lease: Lease
    token: str
    seen_version: int

    @property
    def key(self) -> str:
        """Lease-store key of the lock."""
        return f"{LOCK_PREFIX}{self.volume_id}"

    @functools.cached_property
    def value(self) -> bytes:
        """Lease-store value identifying this holder (computed once: every commit compares it)."""
        return _lock_value(self.owner, self.token, self.lease.ttl)


@dataclass(frozen=True)
class LockStatus:
    """Whether a volume is locked (a live lock key exists) and by whom."""

    locked: bool
    owner: str | None
    epoch: int


def _lock_value(owner: str, token: str, ttl: float | None = None) -> bytes:
    data: dict[str, Any] = {"owner": owner, "token": token}
    if ttl is not None:
        data["ttl"] = ttl
    return json.dumps(data, sort_keys=True).encode()


def format_owner(peer: str, boot: str) -> str:
    """A lock-owner string naming a holder identity: ``peer=<id> boot=<id> host=<host> pid=<pid>``.

    ``peer`` is the holder's data-dir identity (a storage peer's UUID), ``boot`` the incarnation
    of the process holding it. :meth:`MetadataService.take_over_volume` parses both back.
    """
    for what, value in (("peer", peer), ("boot", boot)):
        if not isinstance(value, str) or not value or any(c.isspace() or c == "=" for c in value):
            raise InvalidArgument(f"{what} id must be a non-empty string without spaces or '='")
    return f"peer={peer} boot={boot} host={socket.gethostname()} pid={os.getpid()}"


def parse_owner(owner: str) -> dict[str, str]:
    """The ``key=value`` fields of an owner string made by :func:`format_owner` (else ``{}``)."""
    fields: dict[str, str] = {}
    for part in owner.split():
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            return {}
        fields[key] = value
    return fields


@dataclass(frozen=True)
class LockHolder:
    """A volume lock's holder as read from its lock key (see :meth:`MetadataService.lock_holder`).

    ``expires_by`` is the wall-clock time the holder's lease runs out unless it is renewed
    (``now + ttl``: an upper bound, since the holder renews every ttl/3); ``None`` when the key
    does not record its TTL (locks taken by older code).
    """

    owner: str
    peer: str | None
    boot: str | None
    ttl: float | None
    expires_by: float | None
    raw: bytes

    def describe(self, volume: str) -> str:
        """``volume 'v' is locked by peer P (owner ...) until <time> unless the holder renews it``."""
        who = f"peer {self.peer} (owner {self.owner!r})" if self.peer else f"{self.owner!r}"
        text = f"volume {volume!r} is locked by {who}"
        if self.expires_by is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.expires_by))
            text += f" until {when} (lease {self.ttl:g} s) unless the holder renews it"
        return text


def _parse_holder(raw: bytes, now: float) -> LockHolder:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return LockHolder("another client", None, None, None, None, raw)
    found = data.get("owner")
    owner = found if isinstance(found, str) and found else "another client"
    ttl = data.get("ttl")
    ttl = float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0 else None
    fields = parse_owner(owner)
    return LockHolder(
        owner, fields.get("peer"), fields.get("boot"), ttl, None if ttl is None else now + ttl, raw
    )


def _check_name(what: str, name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise InvalidArgument(f"{what} must be a non-empty string of at most {_MAX_NAME} characters")
    if any(ord(c) < 32 or c in "/@" for c in name) or name != name.strip():
        raise InvalidArgument(f"{what} {name!r} contains '/', '@', control characters or edge spaces")
    return name


#: Largest volume size: NBD carries sizes in 64 bits, and its clients (libnbd, qemu, Linux) hold
#: them as signed 64-bit integers, so anything larger could be created but never served.
MAX_VOLUME_SIZE = 2**63 - 1


def _check_positive(what: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgument(f"{what} must be a positive integer, got {value!r}")
    return value


def _check_volume_size(value: Any) -> int:
    _check_positive("volume size", value)
    if value > MAX_VOLUME_SIZE:
        raise InvalidArgument(f"volume size {value} is larger than the maximum {MAX_VOLUME_SIZE} (2^63 - 1)")
    return int(value)


def _info(vol: VolumeState) -> VolumeInfo:
    return VolumeInfo(vol.id, vol.name, vol.size, vol.type)


class MetadataService:
    """Cluster metadata over a :class:`~torus_core.eventlog.MetadataBackend`.

    :param backend: the backend (closed only by :meth:`close`).
    :param ring_types: the process's ring registry, used to validate ring specs and by everything
        built on this service (cluster nodes, ring watchers). Processes pass the plugin manager's
        (built at the composition root); tests and plugin-free tools pass
        :func:`~torus_core.ring.builtin.builtin_ring_types`.
    :param snapshot_every: projection snapshot interval in events.
    """

    def __init__(
        self,
        backend: MetadataBackend,
        *,
        ring_types: Registry,
        registry: TopicRegistry = REGISTRY,
        snapshot_every: int = 200,
    ) -> None:
        self.backend = backend
        self.ring_types: Registry = ring_types
        self.registry = registry
        self.projector = Projector(backend.log, registry=registry, snapshot_every=snapshot_every)
        backend_name = getattr(backend, "name", type(backend).__name__)
        self._append_seconds = METADATA_APPEND_SECONDS.labels(backend_name)  # bound once
        #: Guards the two maps below and every ``VolumeLock.seen_version`` update.
        self._mutex = threading.Lock()
        #: Volume stream -> the lock this service issued on it and still holds (see _note_appended).
        self._held: dict[str, VolumeLock] = {}
        #: Volume id -> (INode index reserved by our last commit, stream version after it).
        self._reserved: dict[int, tuple[int, int]] = {}

    # --- plumbing ------------------------------------------------------------------------------

    def state(self) -> ClusterState:
        """The current projected state (catches up with the log first)."""
        return self.projector.catch_up()

    def _event(self, stream: str, version: int, event: DomainEvent) -> NewEvent:
        return self.registry.new_event(stream, version, event)

    def _run(self, what: str, decide: Callable[[ClusterState], Decision[_T]]) -> _T:
        """Decide, append, retry: the one optimistic-concurrency loop of every command.

        ``decide`` reads the projected state, validates (raising ``AlreadyExists``,
        ``NotExist``, ...) and returns the events to append with the stream versions it read,
        plus the command's result. A lost race (``CompareFailed``) re-reads and decides again
        after a jittered backoff, up to :data:`MAX_ATTEMPTS`; then :class:`Again` says
        ``could not <what>: too much contention``. An empty event list returns at once.
        """
        for attempt in range(MAX_ATTEMPTS):
            events, result = decide(self.state())
            if not events:
                return result
            try:
                self._append(*events)
            except CompareFailed:
                _backoff(attempt)
                continue
            return result
        raise Again(f"could not {what}: too much contention")

    def head_position(self) -> int:
        """The metadata log's head position (one cheap read; also a liveness probe)."""
        return self.backend.log.head_position()

    def cluster_key(self) -> bytes:
        """The cluster's random peer key (``torusctl init`` creates it; a cluster formatted
        before peers authenticated gets one on first use). Stored in the lease store without a
        lease, never in the event log, so ``torusctl events`` does not show it: whoever holds
        the metadata credential is a member of the cluster (docs/cluster.md)."""
        leases = self.backend.leases
        raw = leases.get(CLUSTER_KEY)
        if raw is None:
            leases.put_if_absent(CLUSTER_KEY, secrets.token_hex(CLUSTER_KEY_BYTES).encode())
            raw = leases.get(CLUSTER_KEY)
        try:
            key = bytes.fromhex(raw.decode("ascii")) if raw is not None else b""
        except (UnicodeDecodeError, ValueError):
            key = b""
        if len(key) < 16:
            raise MetadataError(f"the metadata backend holds no usable cluster key under {CLUSTER_KEY!r}")
        return key

    @property
    def leases(self) -> LeaseStore:
        """The backend's lease store (peer registrations, volume lock keys, volume leases).

        The one public way to the backend's ephemeral state: code outside this module uses this
        (or the service's own methods), never ``md.backend``.
        """
        return self.backend.leases

    def close(self) -> None:
        """Close the backend (its connections and lease keep-alives); the service is unusable after."""
        self.backend.close()

    def _append(self, *events: NewEvent) -> list[int]:
        batch = list(events)
        with self._append_seconds.time():
            positions = self.backend.log.append(batch)
        self.projector.applied(batch, positions)
        self._note_appended(batch)
        return positions

    def _note_appended(self, batch: list[NewEvent]) -> None:
        """Advance held locks past our own non-fencing appends to their volume streams.

        A lock's ``seen_version`` says "every event of the stream up to here is known not to
        fence me". An event this service itself appended at exactly ``seen_version + 1`` that is
        not a fencing event (an INode index allocation, a snapshot save, a resize) keeps that true,
        so the next fenced commit appends at the right version instead of failing once and
        re-reading the stream.
        """
        if not self._held:
            return
        with self._mutex:
            for e in batch:
                lock = self._held.get(e.stream_id)
                if lock is not None and e.topic not in _FENCING_TOPICS and lock.seen_version == e.version - 1:
                    lock.seen_version = e.version

    def _set_seen(self, lock: VolumeLock, version: int) -> None:
        with self._mutex:
            if version > lock.seen_version:
                lock.seen_version = version

    def _volume(self, state: ClusterState, name: str) -> VolumeState:
        vol = state.volume_by_name(name)
        if vol is None:
            raise NotExist(f"volume {name!r} does not exist")
        return vol

    def _volume_id(self, state: ClusterState, volume_id: int) -> VolumeState:
        vol = state.volumes.get(volume_id)
        if vol is None:
            raise NotExist(f"volume id {volume_id!r} does not exist")
        return vol

    def _validate_ring(self, spec: RingSpec) -> None:
        from torus_core.ring.codec import ring_from_spec

        ring_from_spec(self.ring_types, spec)

    # --- cluster -------------------------------------------------------------------------------

    def format(
        self, block_size: int, block_spec: str = "crc,base", ring: RingSpec | None = None
    ) -> GlobalMetadata:
        """Format the cluster (``torusctl init``): global metadata plus ring version 1.

        ``ring`` defaults to an empty ring; it must have version 1. Raises AlreadyExists if the
        cluster is already formatted.
        """
        _check_positive("block size", block_size)
        if not isinstance(block_spec, str) or not block_spec.strip():
            raise InvalidArgument("block spec must be a non-empty string such as 'crc,base'")
        spec = ring if ring is not None else RingSpec(type="empty", version=1, replication=0)
        if not isinstance(spec, RingSpec) or spec.version != 1:
            raise InvalidArgument("the initial ring must be a RingSpec with version 1")
        self._validate_ring(spec)
        formatted = ClusterFormatted(block_size, block_spec, spec.type, spec.replication, uuid.uuid4().hex)
        try:
            self._append(
                self._event(CLUSTER_STREAM, 1, formatted),
                self._event(RING_STREAM, 1, RingChanged(spec)),
            )
        except CompareFailed:
            raise AlreadyExists("the cluster is already formatted") from None
        self.cluster_key()
        return GlobalMetadata(block_size, block_spec, spec.type, spec.replication)

    def global_metadata(self) -> GlobalMetadata:
        """Block size, default block spec and initial ring type; NoGlobalMetadata if unformatted."""
        gm = self.state().global_metadata
        if gm is None:
            raise NoGlobalMetadata("the cluster is not formatted (run `torusctl init`)")
        return gm

    def get_ring(self) -> RingSpec:
        """The current ring spec; NoGlobalMetadata if unformatted."""
        ring = self.state().ring
        if ring is None:
            raise NoGlobalMetadata("the cluster is not formatted (run `torusctl init`)")
        return ring

    def set_ring(self, spec: RingSpec) -> None:
        """Replace the ring: ``spec.version`` must be current + 1 (else NonSequentialRing).

        Losing a race with another ring change raises :class:`~torus_core.errors.Again`.
        """
        current = self.get_ring()
        if not isinstance(spec, RingSpec):
            raise InvalidArgument(f"expected a RingSpec, got {type(spec).__name__}")
        if spec.version != current.version + 1:
            raise NonSequentialRing(f"new ring version {spec.version} is not {current.version} + 1")
        self._validate_ring(spec)
        try:
            self._append(self._event(RING_STREAM, spec.version, RingChanged(spec)))
        except CompareFailed:
            raise Again(f"another ring version {spec.version} was written concurrently") from None

    # --- volumes -------------------------------------------------------------------------------

    def create_volume(self, name: str, size: int) -> VolumeInfo:
        """Create a block volume (thin: metadata only). AlreadyExists if the name is taken."""
        _check_name("volume name", name)
        _check_volume_size(size)

        def decide(state: ClusterState) -> Decision[VolumeInfo]:
            if name in state.names:
                raise AlreadyExists(f"volume {name!r} already exists")
            vid = state.stream_version(VOLUME_IDS_STREAM) + 1
            if vid > VOLUME_MAX:
                raise InvalidArgument("volume ids are exhausted")
            events = [
                self._event(VOLUME_IDS_STREAM, vid, VolumeIdAllocated(vid, name)),
                self._event(
                    name_stream(name),
                    state.stream_version(name_stream(name)) + 1,
                    VolumeNameClaimed(name, vid),
                ),
                self._event(volume_stream(vid), 1, VolumeCreated(vid, name, size, "block")),
            ]
            return events, VolumeInfo(vid, name, size, "block")

        return self._run(f"create volume {name!r}", decide)

    def get_volume(self, name: str) -> VolumeInfo:
        """The volume called ``name``; NotExist if none."""
        return _info(self._volume(self.state(), name))

    def get_volume_by_id(self, volume_id: int) -> VolumeInfo:
        """The volume with id ``volume_id``; NotExist if none."""
        return _info(self._volume_id(self.state(), volume_id))

    def list_volumes(self) -> list[VolumeInfo]:
        """Every live volume, by name."""
        state = self.state()
        return sorted((_info(v) for v in state.volumes.values()), key=lambda v: v.name)

    def resize_volume(self, name: str, new_size: int) -> VolumeInfo:
        """Grow a volume to ``new_size`` bytes; shrinking raises InvalidArgument."""
        _check_volume_size(new_size)

        def decide(state: ClusterState) -> Decision[VolumeInfo]:
            vol = self._volume(state, name)
            if new_size < vol.size:
                raise InvalidArgument(
                    f"volume {name!r} is {vol.size} bytes; shrinking to {new_size} is not supported"
                )
            if new_size == vol.size:
                return [], _info(vol)
            stream = volume_stream(vol.id)
            event = self._event(
                stream, state.stream_version(stream) + 1, VolumeResized(vol.id, vol.size, new_size)
            )
            return [event], VolumeInfo(vol.id, vol.name, new_size, vol.type)

        return self._run(f"resize volume {name!r}", decide)

    def delete_volume(self, name: str) -> None:
        """Delete a volume and free its name; Locked while someone holds its lock."""

        def decide(state: ClusterState) -> Decision[None]:
            vol = self._volume(state, name)
            if self.backend.leases.get(f"{LOCK_PREFIX}{vol.id}") is not None:
                raise Locked(f"volume {name!r} is locked (in use)")
            vs, ns = volume_stream(vol.id), name_stream(name)
            return [
                self._event(vs, state.stream_version(vs) + 1, VolumeDeleted(vol.id, name)),
                self._event(ns, state.stream_version(ns) + 1, VolumeNameReleased(name, vol.id)),
            ], None

        self._run(f"delete volume {name!r}", decide)

    def allocate_inode_index(self, volume_id: int) -> int:
        """Reserve and return the volume's next INode index (2, 3, ...; 1 is the virtual INode).

        Fast path: the index our last :meth:`commit_inode` of this volume reserved in the same
        append, handed out once and only while nothing was appended to the volume's stream since
        (one version read), so it is still the highest allocated index, as the GC expects of an
        index in use. Otherwise an ``INodeIndexAllocated`` event is appended.
        """
        with self._mutex:
            reserved = self._reserved.pop(volume_id, None)
        if reserved is not None:
            index, version = reserved
            if self.backend.log.stream_version(volume_stream(volume_id)) == version:
                return index

        def decide(state: ClusterState) -> Decision[int]:
            vol = self._volume_id(state, volume_id)
            stream = volume_stream(vol.id)
            index = vol.last_inode_index + 1
            return [
                self._event(stream, state.stream_version(stream) + 1, INodeIndexAllocated(vol.id, index))
            ], index

        return self._run(f"allocate an INode index for volume {volume_id}", decide)

    def current_inode(self, volume_id: int) -> INodeRef:
        """The volume's current INodeRef (``(id, 1)`` until the first commit)."""
        return self._volume_id(self.state(), volume_id).inode

    # --- locks ---------------------------------------------------------------------------------

    def lock_volume(self, name: str, owner: str, lease: Lease) -> VolumeLock:
        """Take the single-writer lock of ``name`` for ``owner``, bound to ``lease``.

        Raises Locked if a live lease holds it (a lock whose lease expired is taken over; the
        message names the holder and when its lease runs out unless renewed), LeaseNotFound if
        ``lease`` is gone, NotExist if the volume does not exist.
        """
        return self._lock(name, owner, lease, take_over=False)

    def take_over_volume(
        self, name: str, owner: str, lease: Lease, *, reclaim_own: bool = False
    ) -> VolumeLock:
        """Like :meth:`lock_volume`, but first break a lock left by a dead earlier incarnation.

        ``owner`` must be a :func:`format_owner` string. A live lock whose owner names the
        **same peer** identity with a **different boot** id is deleted (compare-and-delete on its
        exact value) and the lock is taken at once instead of waiting for the dead holder's
        lease to expire. The caller vouches that it exclusively owns that peer identity for as
        long as it lives (``torusd`` holds an exclusive ``flock`` on its data directory), so an
        earlier incarnation holding the lock has provably exited. Fencing is unchanged: the new
        acquisition appends ``VolumeLockAcquired`` with the next epoch, so a commit by the old
        holder could not succeed anyway. Any other holder: Locked, as for :meth:`lock_volume`.

        With ``reclaim_own`` the caller also vouches that **this** incarnation (same peer, same
        boot) holds no open volume for ``name``: a lock with its own owner is then a leftover
        whose release failed (e.g. during a metadata outage, after which a restarted etcd keeps
        the old lease alive for a TTL) and is broken the same way.
        """
        return self._lock(name, owner, lease, take_over=True, reclaim_own=reclaim_own)

    def lock_holder(self, name: str) -> LockHolder | None:
        """Who holds ``name``'s lock now (``None`` if unlocked); NotExist if no such volume."""
        vol = self._volume(self.state(), name)
        raw = self.backend.leases.get(f"{LOCK_PREFIX}{vol.id}")
        return None if raw is None else _parse_holder(raw, time.time())

    def _lock(
        self, name: str, owner: str, lease: Lease, *, take_over: bool, reclaim_own: bool = False
    ) -> VolumeLock:
        if not isinstance(lease, Lease):
            raise InvalidArgument("locking a volume needs a granted Lease")
        if not isinstance(owner, str) or not owner:
            raise InvalidArgument("lock owner must be a non-empty string")
        me = parse_owner(owner) if take_over else {}
        if take_over and not (me.get("peer") and me.get("boot")):
            raise InvalidArgument(f"taking over needs an owner made by format_owner, got {owner!r}")
        vol = self._volume(self.state(), name)
        token = uuid.uuid4().hex
        value = _lock_value(owner, token, lease.ttl)
        key = f"{LOCK_PREFIX}{vol.id}"
        for _ in range(3):
            if self.backend.leases.put_if_absent(key, value, lease):
                break
            raw = self.backend.leases.get(key)
            if raw is None:
                continue  # expired or released meanwhile: try again
            holder = _parse_holder(raw, time.time())
            earlier = holder.boot not in (None, me.get("boot"))
            own = reclaim_own and holder.boot is not None and holder.boot == me.get("boot")
            if not (take_over and holder.peer == me["peer"] and (earlier or own)):
                raise Locked(holder.describe(name))
            if self.backend.leases.delete(key, expected=raw):
                log.warning(
                    "volume %r: broke the lock of %r, %s",
                    name,
                    holder.owner,
                    "an earlier incarnation of this peer (it has exited: this process owns the "
                    "peer's data directory)"
                    if earlier
                    else "left by this process (its release failed; no open volume uses it)",
                )
        else:
            now_held = self.lock_holder(name)
            raise Locked(now_held.describe(name) if now_held else f"volume {name!r} is locked (contended)")
        stream = volume_stream(vol.id)

        def decide(state: ClusterState) -> Decision[tuple[int, int]]:
            current = state.volumes.get(vol.id)
            if current is None:
                raise NotExist(f"volume {name!r} was deleted")
            version = state.stream_version(stream) + 1
            epoch = current.lock_epoch + 1
            event = self._event(stream, version, VolumeLockAcquired(vol.id, owner, epoch, lease.id))
            return [event], (version, epoch)

        try:
            version, epoch = self._run(f"lock volume {name!r}", decide)
            lock = VolumeLock(vol.id, name, owner, epoch, lease, token, version)
            with self._mutex:
                self._held[stream] = lock
            return lock
        except BaseException:
            self.backend.leases.delete(key, expected=value)
            raise

    def _holder(self, key: str) -> str | None:
        raw = self.backend.leases.get(key)
        if raw is None:
            return None
        try:
            owner = json.loads(raw).get("owner")
        except (ValueError, AttributeError):
            return None
        return owner if isinstance(owner, str) else None

    def _fenced_append(self, lock: VolumeLock, event: DomainEvent, *, reserve_next: bool = False) -> None:
        """Append ``event`` to the locked volume's stream unless the lock moved on (Locked).

        Fencing: the lock key must still hold our value (a holder whose lease expired, or whose
        key was taken over, fails here), and the append expects the stream version the holder
        last saw, so an acquisition, release, delete or restore written since makes the log
        refuse it; the slow path then reads the new events and reports ``Locked`` (or retries
        past harmless ones). With ``reserve_next`` the same atomic append also allocates the
        volume's next INode index for the holder's next write session (see
        :meth:`allocate_inode_index`).

        This is not :meth:`_run`: it decides from the lock's ``seen_version`` rather than the
        projection, and a lost race is resolved by reading the newer events (no backoff needed:
        either they fence us, or we append after them at once).
        """
        stream = volume_stream(lock.volume_id)
        for _ in range(MAX_ATTEMPTS):
            if self.backend.leases.get(lock.key) != lock.value:
                raise Locked(f"lock on volume {lock.name!r} (epoch {lock.epoch}) was lost")
            base = lock.seen_version
            batch = [self._event(stream, base + 1, event)]
            reserved = self._next_index(lock.volume_id, stream, base) if reserve_next else None
            if reserved is not None:
                batch.append(self._event(stream, base + 2, INodeIndexAllocated(lock.volume_id, reserved)))
            try:
                self._append(*batch)
            except CompareFailed:
                newer = self.backend.log.read_stream(stream, after=base)
                for stored in newer:
                    if stored.topic in _FENCING_TOPICS:
                        e = self.registry.decode(stored.topic, stored.state)
                        raise Locked(
                            f"lock on volume {lock.name!r} (epoch {lock.epoch}) was lost: {type(e).__name__}"
                        ) from None
                if newer:
                    self._set_seen(lock, newer[-1].version)
                continue
            self._set_seen(lock, base + len(batch))
            if reserved is not None:
                with self._mutex:
                    self._reserved[lock.volume_id] = (reserved, base + len(batch))
            return
        raise Again(f"could not write to volume {lock.name!r}: too much contention")

    def _next_index(self, volume_id: int, stream: str, version: int) -> int | None:
        """The volume's next INode index as of stream ``version``, or None if the projection disagrees."""
        state = self.projector.state  # usually current: our own appends are applied locally
        if state.stream_version(stream) != version:
            state = self.state()
            if state.stream_version(stream) != version:
                return None  # the stream moved on: the append will fail and take the slow path
        vol = state.volumes.get(volume_id)
        return None if vol is None else vol.last_inode_index + 1

    def commit_inode(self, lock: VolumeLock, inode_ref: INodeRef) -> None:
        """Make ``inode_ref`` the volume's current INode; Locked if ``lock`` is no longer held.

        The same atomic append reserves the next INode index for this holder, so a write session
        after a flush costs no extra metadata write.
        """
        if not isinstance(inode_ref, INodeRef) or inode_ref.volume != lock.volume_id:
            raise InvalidArgument(f"{inode_ref!r} is not an INodeRef of volume {lock.volume_id}")
        self._fenced_append(lock, INodeCommitted(lock.volume_id, inode_ref, lock.epoch), reserve_next=True)

    def unlock(self, lock: VolumeLock) -> None:
        """Release ``lock``; Locked if it was already lost."""
        stream = volume_stream(lock.volume_id)
        try:
            self._fenced_append(lock, VolumeLockReleased(lock.volume_id, lock.owner, lock.epoch))
        finally:
            with self._mutex:
                if self._held.get(stream) is lock:
                    del self._held[stream]
                self._reserved.pop(lock.volume_id, None)
        self.backend.leases.delete(lock.key, expected=lock.value)

    def lock_status(self, name: str) -> LockStatus:
        """Whether ``name`` is locked now (a live lock key) and by whom; ``epoch`` is the last one."""
        vol = self._volume(self.state(), name)
        owner = self._holder(f"{LOCK_PREFIX}{vol.id}")
        return LockStatus(owner is not None, owner, vol.lock_epoch)

    # --- snapshots -----------------------------------------------------------------------------

    def save_snapshot(self, volume: str, name: str) -> SnapshotInfo:
        """Record the volume's last committed INode as snapshot ``name`` (works while locked)."""
        _check_name("snapshot name", name)

        def decide(state: ClusterState) -> Decision[SnapshotInfo]:
            vol = self._volume(state, volume)
            if name in vol.snapshots:
                raise AlreadyExists(f"snapshot {volume}@{name} already exists")
            info = SnapshotInfo(name, vol.inode, time.time())
            stream = volume_stream(vol.id)
            saved = SnapshotSaved(vol.id, name, info.inode_ref, info.time)
            return [self._event(stream, state.stream_version(stream) + 1, saved)], info

        return self._run(f"save snapshot {volume}@{name}", decide)

    def request_snapshot(self, volume: str, name: str) -> None:
        """Ask the volume's writer to fold in what it has acknowledged and save snapshot
        ``name`` (see :func:`torus_core.block.snapshots.create_snapshot`)."""
        _check_name("snapshot name", name)

        def decide(state: ClusterState) -> Decision[None]:
            vol = self._volume(state, volume)
            if name in vol.snapshots:
                raise AlreadyExists(f"snapshot {volume}@{name} already exists")
            if name in vol.snapshot_requests:
                return [], None
            stream = volume_stream(vol.id)
            requested = SnapshotRequested(vol.id, name, time.time())
            return [self._event(stream, state.stream_version(stream) + 1, requested)], None

        self._run(f"request snapshot {volume}@{name}", decide)

    def snapshot_requests(self, volume_id: int) -> tuple[str, ...]:
        """Snapshot names asked of volume ``volume_id``'s writer and not saved yet."""
        return self._volume_id(self.state(), volume_id).snapshot_requests

    def list_snapshots(self, volume: str) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first."""
        vol = self._volume(self.state(), volume)
        return sorted(vol.snapshots.values(), key=lambda s: (s.time, s.name))

    def get_snapshot(self, volume: str, name: str) -> SnapshotInfo:
        """One snapshot; NotExist if missing."""
        vol = self._volume(self.state(), volume)
        try:
            return vol.snapshots[name]
        except KeyError:
            raise NotExist(f"snapshot {volume}@{name} does not exist") from None

    def snapshot_highwater(self, volume_id: int) -> int:
        """The highest INode number ever saved in a snapshot of volume ``volume_id`` (0: none).

        Blocks of the volume minted under a higher INode number are named only by the volume's
        own INodes (no snapshot, and so no clone, holds them). NotExist if the volume is gone.
        """
        return self._volume_id(self.state(), volume_id).snapshot_highwater

    def delete_snapshot(self, volume: str, name: str) -> None:
        """Remove a snapshot record; NotExist if missing."""

        def decide(state: ClusterState) -> Decision[None]:
            vol = self._volume(state, volume)
            if name not in vol.snapshots:
                raise NotExist(f"snapshot {volume}@{name} does not exist")
            stream = volume_stream(vol.id)
            return [
                self._event(stream, state.stream_version(stream) + 1, SnapshotDeleted(vol.id, name))
            ], None

        self._run(f"delete snapshot {volume}@{name}", decide)

    def restore_snapshot(self, volume: str, name: str) -> INodeRef:
        """Point the volume back at a snapshot's INode; Locked while the volume is locked."""

        def decide(state: ClusterState) -> Decision[INodeRef]:
            vol = self._volume(state, volume)
            if self.backend.leases.get(f"{LOCK_PREFIX}{vol.id}") is not None:
                raise Locked(f"volume {volume!r} is locked (in use); unmount it first")
            snap = vol.snapshots.get(name)
            if snap is None:
                raise NotExist(f"snapshot {volume}@{name} does not exist")
            stream = volume_stream(vol.id)
            restored = SnapshotRestored(vol.id, name, snap.inode_ref)
            return [self._event(stream, state.stream_version(stream) + 1, restored)], snap.inode_ref

        return self._run(f"restore snapshot {volume}@{name}", decide)

    # --- peers (lease store, not events) ------------------------------------------------------

    def register_peer(self, info: Mapping[str, Any] | Any, lease: Lease) -> None:
        """Publish a peer's info (a mapping or dataclass with a ``uuid``) under its lease."""
        data = dict(info) if isinstance(info, Mapping) else dataclasses.asdict(info)
        peer_id = data.get("uuid")
        if not isinstance(peer_id, str) or not peer_id:
            raise InvalidArgument("peer info needs a non-empty 'uuid'")
        try:
            raw = json.dumps(data, sort_keys=True, default=_json_default).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"peer info is not serialisable: {exc}") from None
        self.backend.leases.put(f"{PEER_PREFIX}{peer_id}", raw, lease)

    def unregister_peer(self, peer_id: str) -> bool:
        """Remove a peer's info now; returns whether it was present."""
        return self.backend.leases.delete(f"{PEER_PREFIX}{peer_id}")

    def list_peers(self) -> list[dict[str, Any]]:
        """Info of every live peer, sorted by uuid (bytes values come back as base64 text)."""
        out = []
        for _key, raw in sorted(self.backend.leases.get_prefix(PEER_PREFIX).items()):
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue  # not ours: ignore
        return out

    # --- event access (torusctl events) -------------------------------------------------------

    def events(
        self, after: int = 0, stream: str | None = None, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Decoded events with position > ``after`` (or, for ``stream``, version > ``after``)."""
        if stream is None:
            stored = self.backend.log.read_all(after=after, limit=limit)
        else:
            stored = self.backend.log.read_stream(stream, after=after, limit=limit)
        return [self.registry.recorded(s) for s in stored]

    def follow(self, after: int, timeout: float) -> list[RecordedEvent]:
        """Wait up to ``timeout`` seconds for events after position ``after``; [] on timeout."""
        return [self.registry.recorded(s) for s in self.backend.log.wait_for_events(after, timeout)]


def _backoff(attempt: int) -> None:
    """Sleep a jittered, exponentially growing time before retry ``attempt + 1``."""
    time.sleep(random.uniform(0.0, min(RETRY_CAP, RETRY_BASE * (1 << min(attempt, 16)))))


def _json_default(value: Any) -> Any:
    import base64

    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
