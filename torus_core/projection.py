"""The cluster's metadata state as a pure fold of its events, and a projector that keeps it current.

:func:`apply` is pure: it never mutates its input state and never does I/O. :class:`Projector`
reads new events from an :class:`~torus_core.eventlog.EventLog`, folds them in, and every
``snapshot_every`` events stores the state as a snapshot (a rebuildable cache: a snapshot that
cannot be decoded is ignored and the log is replayed from the start).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torus_core.errors import SchemaError, TorusError
from torus_core.eventlog import EventLog, NewEvent, StoredEvent
from torus_core.events import (
    REGISTRY,
    ClusterFormatted,
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
    from_jsonable,
    to_jsonable,
)
from torus_core.refs import INodeRef
from torus_core.ring.base import RingSpec

__all__ = [
    "SNAPSHOT_FORMAT",
    "ClusterState",
    "GlobalMetadata",
    "Projector",
    "SnapshotInfo",
    "VolumeState",
    "apply",
    "fold",
    "state_from_bytes",
    "state_to_bytes",
]

log = logging.getLogger(__name__)

#: Version of the snapshot encoding; a snapshot of another format is ignored (full replay).
SNAPSHOT_FORMAT = 4  # 2: snapshot_highwater, 3: snapshot_requests, 4: GlobalMetadata.cluster_id


@dataclass(frozen=True)
class GlobalMetadata:
    """What ``torusctl init`` fixed for the whole cluster."""

    block_size: int
    block_spec: str
    ring_type: str
    replication: int
    #: random id of the formatting ("" for clusters formatted before it existed)
    cluster_id: str = ""


@dataclass(frozen=True)
class SnapshotInfo:
    """A named snapshot: the INode that was current when it was taken, and when."""

    name: str
    inode_ref: INodeRef
    time: float


@dataclass(frozen=True)
class VolumeState:
    """One live volume as the events describe it.

    ``last_inode_index`` starts at 1 and ``current_inode`` at ``(id, 1)``: INode 1 is virtual
    (an empty volume), as in the original. ``lock_epoch`` counts lock acquisitions;
    ``lock_owner`` is the holder per the events (liveness is the lease store's business).
    """

    id: int
    name: str
    size: int
    type: str = "block"
    last_inode_index: int = 1
    current_inode: INodeRef | None = None
    snapshots: dict[str, SnapshotInfo] = field(default_factory=dict)
    lock_epoch: int = 0
    lock_owner: str = ""
    lock_lease_id: int = 0
    #: highest INode number ever saved in a snapshot of this volume (deleted snapshots too: a
    #: clone made from one may still name its blocks); blocks minted under a higher INode number
    #: are named by no snapshot or clone, only by this volume's own INodes
    snapshot_highwater: int = 0
    #: snapshot names asked of the volume's writer (``SnapshotRequested``) and not saved yet
    snapshot_requests: tuple[str, ...] = ()

    @property
    def inode(self) -> INodeRef:
        """The current INodeRef (``(id, 1)`` for a volume never written)."""
        return self.current_inode if self.current_inode is not None else INodeRef(self.id, 1)


@dataclass(frozen=True)
class ClusterState:
    """Everything the metadata commands validate against, as of log ``position``."""

    position: int = 0
    global_metadata: GlobalMetadata | None = None
    ring: RingSpec | None = None
    volumes: dict[int, VolumeState] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)
    stream_versions: dict[str, int] = field(default_factory=dict)

    def stream_version(self, stream_id: str) -> int:
        """Version of ``stream_id`` as of this state (0 if no events)."""
        return self.stream_versions.get(stream_id, 0)

    def volume_by_name(self, name: str) -> VolumeState | None:
        """The live volume called ``name``, if any."""
        vid = self.names.get(name)
        return None if vid is None else self.volumes.get(vid)


def _with_volume(state: ClusterState, vid: int, **changes: object) -> dict[int, VolumeState]:
    volumes = dict(state.volumes)
    vol = volumes.get(vid)
    if vol is not None:
        volumes[vid] = dataclasses.replace(vol, **changes)  # type: ignore[arg-type]
    return volumes


def apply(state: ClusterState, rec: RecordedEvent) -> ClusterState:
    """The state after ``rec`` (pure). Events about unknown volumes only move versions."""
    versions = dict(state.stream_versions)
    versions[rec.stream_id] = rec.version
    base = dataclasses.replace(state, position=rec.position, stream_versions=versions)
    e = rec.event
    if isinstance(e, ClusterFormatted):
        gm = GlobalMetadata(e.block_size, e.block_spec, e.ring_type, e.replication, e.cluster_id)
        return dataclasses.replace(base, global_metadata=gm)
    if isinstance(e, RingChanged):
        return dataclasses.replace(base, ring=e.spec)
    if isinstance(e, VolumeIdAllocated):
        return base
    if isinstance(e, VolumeNameClaimed):
        return dataclasses.replace(base, names={**state.names, e.name: e.volume_id})
    if isinstance(e, VolumeNameReleased):
        names = dict(state.names)
        if names.get(e.name) == e.volume_id:
            del names[e.name]
        return dataclasses.replace(base, names=names)
    if isinstance(e, VolumeCreated):
        created = VolumeState(id=e.volume_id, name=e.name, size=e.size, type=e.type)
        return dataclasses.replace(base, volumes={**state.volumes, e.volume_id: created})
    if isinstance(e, VolumeDeleted):
        volumes = dict(state.volumes)
        volumes.pop(e.volume_id, None)
        return dataclasses.replace(base, volumes=volumes)
    if isinstance(e, VolumeResized):
        return dataclasses.replace(base, volumes=_with_volume(state, e.volume_id, size=e.new_size))
    if isinstance(e, INodeIndexAllocated):
        return dataclasses.replace(base, volumes=_with_volume(state, e.volume_id, last_inode_index=e.index))
    if isinstance(e, INodeCommitted):
        return dataclasses.replace(base, volumes=_with_volume(state, e.volume_id, current_inode=e.inode_ref))
    if isinstance(e, SnapshotRequested):
        req_vol = state.volumes.get(e.volume_id)
        if req_vol is None or e.name in req_vol.snapshot_requests:
            return base
        pending = (*req_vol.snapshot_requests, e.name)
        return dataclasses.replace(base, volumes=_with_volume(state, e.volume_id, snapshot_requests=pending))
    if isinstance(e, SnapshotSaved | SnapshotDeleted | SnapshotRestored):
        snap_vol = state.volumes.get(e.volume_id)
        if snap_vol is None:
            return base
        if isinstance(e, SnapshotSaved):
            snaps = {**snap_vol.snapshots, e.name: SnapshotInfo(e.name, e.inode_ref, e.time)}
            high = max(snap_vol.snapshot_highwater, e.inode_ref.inode)
            pending = tuple(n for n in snap_vol.snapshot_requests if n != e.name)
            volumes = _with_volume(
                state, e.volume_id, snapshots=snaps, snapshot_highwater=high, snapshot_requests=pending
            )
            return dataclasses.replace(base, volumes=volumes)
        if isinstance(e, SnapshotDeleted):
            snaps = {k: v for k, v in snap_vol.snapshots.items() if k != e.name}
            return dataclasses.replace(base, volumes=_with_volume(state, e.volume_id, snapshots=snaps))
        return dataclasses.replace(base, volumes=_with_volume(state, e.volume_id, current_inode=e.inode_ref))
    if isinstance(e, VolumeLockAcquired):
        volumes = _with_volume(
            state, e.volume_id, lock_epoch=e.epoch, lock_owner=e.owner, lock_lease_id=e.lease_id
        )
        return dataclasses.replace(base, volumes=volumes)
    if isinstance(e, VolumeLockReleased):
        locked_vol = state.volumes.get(e.volume_id)
        if locked_vol is None or locked_vol.lock_epoch != e.epoch:
            return base
        return dataclasses.replace(
            base, volumes=_with_volume(state, e.volume_id, lock_owner="", lock_lease_id=0)
        )
    return base  # a registered event this version of the projection does not use


def fold(events: Iterable[RecordedEvent], state: ClusterState | None = None) -> ClusterState:
    """Apply ``events`` in order to ``state`` (the empty state by default)."""
    current = state if state is not None else ClusterState()
    for rec in events:
        current = apply(current, rec)
    return current


def state_to_bytes(state: ClusterState) -> bytes:
    """Snapshot encoding: JSON ``{"format": SNAPSHOT_FORMAT, "state": <to_jsonable(state)>}``."""
    doc = {"format": SNAPSHOT_FORMAT, "state": to_jsonable(state)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def state_from_bytes(data: bytes) -> ClusterState:
    """Decode :func:`state_to_bytes` output; SchemaError if it is not of the current format."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(f"snapshot is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT or "state" not in doc:
        raise SchemaError("snapshot has an unknown format")
    state: ClusterState = from_jsonable(doc["state"], ClusterState)
    return state


class Projector:
    """Keeps a :class:`ClusterState` current by reading the log; thread-safe.

    :param snapshot_every: save a snapshot after this many newly applied events (0: never).
    """

    SNAPSHOT_NAME = "torus.cluster-state"

    def __init__(
        self,
        log: EventLog,
        *,
        registry: TopicRegistry = REGISTRY,
        snapshot_every: int = 200,
        page_size: int = 500,
    ) -> None:
        self.log = log
        self.registry = registry
        self.snapshot_every = snapshot_every
        self.page_size = page_size
        self._state = ClusterState()
        self._since_snapshot = 0
        self._lock = threading.Lock()
        self._loaded = False

    @property
    def state(self) -> ClusterState:
        """The state as of the last catch-up (no I/O)."""
        return self._state

    def load(self) -> ClusterState:
        """Start from the stored snapshot (if usable), then catch up with the tail."""
        with self._lock:
            self._load_snapshot()
            return self._catch_up()

    def catch_up(self) -> ClusterState:
        """Apply every event appended since the last call; returns the new state."""
        with self._lock:
            if not self._loaded:
                self._load_snapshot()
            return self._catch_up()

    def _load_snapshot(self) -> None:
        self._loaded = True
        self._state = ClusterState()
        snap = self.log.load_snapshot(self.SNAPSHOT_NAME)
        if snap is None:
            return
        position, data = snap
        try:
            state = state_from_bytes(data)
        except SchemaError:
            return  # a cache: ignore and replay
        if state.position == position and position <= self.log.head_position():
            self._state = state

    def applied(self, events: Sequence[NewEvent], positions: Sequence[int]) -> bool:
        """Fold in events this process just appended at ``positions``, without reading the log.

        Only when they directly follow the current state (no one else appended in between);
        otherwise nothing changes and the next :meth:`catch_up` reads them. The stored bytes are
        decoded exactly as a reader of the log would, so the state stays a pure fold of the log.
        Returns whether they were applied.
        """
        if not events or len(events) != len(positions):
            return False
        with self._lock:
            state = self._state
            if not self._loaded or positions[0] != state.position + 1:
                return False
            if any(p != positions[0] + i for i, p in enumerate(positions)):
                return False
            now = time.time()
            try:
                for e, pos in zip(events, positions, strict=True):
                    stored = StoredEvent(e.stream_id, e.version, e.topic, bytes(e.state), pos, now)
                    state = apply(state, self.registry.recorded(stored))
            except SchemaError:
                return False  # not ours to judge here: catch_up will read (and report) it
            self._state = state
            self._since_snapshot += len(events)
            if self.snapshot_every and self._since_snapshot >= self.snapshot_every:
                try:
                    self._save_snapshot(state)
                except TorusError as exc:  # a cache: the append succeeded, so do not fail the caller
                    log.warning("could not save the projection snapshot: %s", exc)
            return True

    def _catch_up(self) -> ClusterState:
        state = self._state
        head = self.log.head_position()
        if head == state.position:
            return state  # nothing new: one cheap head read
        if head < state.position:
            state = ClusterState()  # the log was wiped: start over
        while True:
            page = self.log.read_all(after=state.position, limit=self.page_size)
            if not page:
                break
            for stored in page:
                state = apply(state, self.registry.recorded(stored))
            self._since_snapshot += len(page)
            if self.snapshot_every and self._since_snapshot >= self.snapshot_every:
                self._state = state
                self._save_snapshot(state)
        self._state = state
        return state

    def _save_snapshot(self, state: ClusterState) -> None:
        self._since_snapshot = 0
        stored = self.log.load_snapshot(self.SNAPSHOT_NAME)
        if stored is not None and stored[0] >= state.position:
            return  # someone saved a newer one
        self.log.save_snapshot(self.SNAPSHOT_NAME, state.position, state_to_bytes(state))

    def save_snapshot(self) -> None:
        """Store the current state as the snapshot now."""
        with self._lock:
            self._save_snapshot(self._state)
