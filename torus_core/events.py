"""The typed metadata events, their topics, and their one documented encoding.

Every metadata change torus makes is one of the frozen dataclasses below. Each class has a
stable ``TOPIC`` (stored in :attr:`~torus_core.eventlog.NewEvent.topic`, never derived from
the class name) and a ``SCHEMA`` version.

Encoding (the ``state`` bytes a backend stores), UTF-8 JSON with sorted keys::

    {"schema": 1, "data": {<field>: <value>, ...}}

Field values: ``int``/``float``/``str``/``bool``/``None`` as themselves; ``bytes`` as standard
base64 strings; an :class:`~torus_core.refs.INodeRef` as ``{"volume": v, "inode": i}``; a
dataclass (``RingSpec``, ``RingMember``) as an object of its fields; tuples as arrays;
``dict`` as objects (non-string keys written as decimal strings).

Schema evolution: bump ``SCHEMA`` on the class and register an upcaster that turns the
``data`` object of version *n* into version *n + 1*
(:meth:`TopicRegistry.register_upcaster`). Decoding applies upcasters in order. An unknown
topic, a schema newer than the class, a missing upcaster or malformed data raise
:class:`~torus_core.errors.SchemaError`.

Streams (see :mod:`torus_core.metadata` for how commands use them):

=========================  =====================================================================
``cluster``                ``ClusterFormatted`` (version 1; a second format collides)
``ring``                   ``RingChanged``; the stream version *is* the ring version
``volume-ids``             ``VolumeIdAllocated``; the stream version *is* the volume id (1, 2, ...)
``volume-name:<name>``     ``VolumeNameClaimed`` / ``VolumeNameReleased`` (unique, reusable names)
``volume-<id>``            everything about one volume: created, resized, inode index allocated,
                           inode committed, snapshots, lock acquired/released, deleted
=========================  =====================================================================
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

from torus_core.errors import InvalidArgument, SchemaError
from torus_core.eventlog import NewEvent, StoredEvent
from torus_core.refs import INodeRef
from torus_core.ring.base import RingSpec

__all__ = [
    "CLUSTER_STREAM",
    "REGISTRY",
    "RING_STREAM",
    "VOLUME_IDS_STREAM",
    "ClusterFormatted",
    "DomainEvent",
    "INodeCommitted",
    "INodeIndexAllocated",
    "RecordedEvent",
    "RingChanged",
    "SnapshotDeleted",
    "SnapshotRequested",
    "SnapshotRestored",
    "SnapshotSaved",
    "TopicRegistry",
    "VolumeCreated",
    "VolumeDeleted",
    "VolumeIdAllocated",
    "VolumeLockAcquired",
    "VolumeLockReleased",
    "VolumeNameClaimed",
    "VolumeNameReleased",
    "VolumeResized",
    "from_jsonable",
    "name_stream",
    "to_jsonable",
    "volume_stream",
]

CLUSTER_STREAM = "cluster"
RING_STREAM = "ring"
VOLUME_IDS_STREAM = "volume-ids"


def volume_stream(volume_id: int) -> str:
    """Stream of one volume's events: ``volume-<id>`` (decimal id)."""
    return f"volume-{volume_id}"


def name_stream(name: str) -> str:
    """Stream guarding one volume name: ``volume-name:<name>``."""
    return f"volume-name:{name}"


# --- the generic JSON codec ---------------------------------------------------------------------

T = TypeVar("T")


def to_jsonable(value: Any) -> Any:
    """Turn an event field value (or a whole dataclass) into JSON-compatible data."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, INodeRef):  # the dataclass branch gives the same object, slower
        return {"volume": value.volume, "inode": value.inode}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    raise InvalidArgument(f"cannot encode {type(value).__name__} in an event")


def _fail(what: str, data: Any) -> SchemaError:
    return SchemaError(f"expected {what}, got {data!r:.80}")


def from_jsonable(data: Any, tp: Any) -> Any:
    """Rebuild a value of type ``tp`` from :func:`to_jsonable` output; SchemaError if malformed."""
    # Plain types first: they are most field values, and ``typing.get_origin`` is not free.
    if tp is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise _fail("an integer", data)
        return data
    if tp is str:
        if not isinstance(data, str):
            raise _fail("a string", data)
        return data
    if tp is INodeRef:  # _dataclass_from would check the same, slower (most events carry one)
        if not isinstance(data, dict) or len(data) != 2 or "volume" not in data or "inode" not in data:
            raise _fail("an INodeRef object", data)
        try:
            return INodeRef(from_jsonable(data["volume"], int), from_jsonable(data["inode"], int))
        except InvalidArgument as exc:
            raise SchemaError(str(exc)) from None
    if tp is Any:
        return data
    if tp is bool:
        if not isinstance(data, bool):
            raise _fail("a boolean", data)
        return data
    if tp is float:
        if not isinstance(data, int | float) or isinstance(data, bool):
            raise _fail("a number", data)
        return float(data)
    if tp is bytes:
        if not isinstance(data, str):
            raise _fail("base64 text", data)
        try:
            return base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise _fail("base64 text", data) from None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        last: SchemaError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_jsonable(data, arg)
            except SchemaError as exc:
                last = exc
        raise last or _fail(str(tp), data)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, list):
            raise _fail("an array", data)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(v, args[0]) for v in data)
        if len(args) != len(data):
            raise _fail(f"{len(args)} items", data)
        return tuple(from_jsonable(v, a) for v, a in zip(data, args, strict=True))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(data, list):
            raise _fail("an array", data)
        return [from_jsonable(v, arg) for v in data]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(data, dict):
            raise _fail("an object", data)
        out = {}
        for k, v in data.items():
            if key_tp is int:
                try:
                    key: Any = int(k)
                except ValueError:
                    raise _fail("a decimal key", k) from None
            else:
                key = from_jsonable(k, key_tp)
            out[key] = from_jsonable(v, val_tp)
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_from(data, tp)
    raise SchemaError(f"cannot decode type {tp!r}")


#: How to decode one dataclass: its init fields (name, type, required) and all its field names.
_Plan = tuple[tuple[tuple[str, Any, bool], ...], frozenset[str]]
_PLANS: dict[type, _Plan] = {}


def _plan(cls: type) -> _Plan:
    """The decoding plan of ``cls``, cached (``typing.get_type_hints`` is slow)."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        missing = dataclasses.MISSING
        required = {f.name: f.default is missing and f.default_factory is missing for f in fields}
        init = tuple((f.name, hints[f.name], required[f.name]) for f in fields if f.init)
        plan = _PLANS[cls] = (init, frozenset(required))
    return plan


def _dataclass_from(data: Any, cls: type[T]) -> T:
    if not isinstance(data, dict):
        raise _fail(f"a {cls.__name__} object", data)
    fields, names = _plan(cls)
    kwargs = {}
    for name, tp, required in fields:
        if name in data:
            kwargs[name] = from_jsonable(data[name], tp)
        elif required:
            raise SchemaError(f"{cls.__name__}: missing field {name!r}")
    if len(data) > len(kwargs) and not names.issuperset(data):
        raise SchemaError(f"{cls.__name__}: unknown fields {sorted(set(data) - names)}")
    try:
        return cls(**kwargs)
    except (InvalidArgument, TypeError, ValueError) as exc:
        raise SchemaError(f"{cls.__name__}: {exc}") from None


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainEvent:
    """Base of every metadata event: subclasses set ``TOPIC`` and ``SCHEMA``."""

    TOPIC: ClassVar[str] = ""
    SCHEMA: ClassVar[int] = 1


@dataclass(frozen=True)
class ClusterFormatted(DomainEvent):
    """``torusctl init``: the global metadata (stream ``cluster``, version 1)."""

    TOPIC: ClassVar[str] = "torus.cluster.formatted"
    block_size: int
    block_spec: str
    ring_type: str
    replication: int
    #: random id of this formatting (empty in clusters formatted before it existed): node-local
    #: state keyed by volume ids, such as journal files, is kept per cluster id so a data dir
    #: reused after ``torusctl wipe`` + ``init`` never mixes two clusters' volume 1
    cluster_id: str = ""


@dataclass(frozen=True)
class RingChanged(DomainEvent):
    """A new ring (stream ``ring``; the event version equals ``spec.version``)."""

    TOPIC: ClassVar[str] = "torus.ring.changed"
    spec: RingSpec


@dataclass(frozen=True)
class VolumeIdAllocated(DomainEvent):
    """A volume id handed out (stream ``volume-ids``; the event version equals the id)."""

    TOPIC: ClassVar[str] = "torus.volume.id_allocated"
    volume_id: int
    name: str


@dataclass(frozen=True)
class VolumeNameClaimed(DomainEvent):
    """A name now refers to a volume (stream ``volume-name:<name>``)."""

    TOPIC: ClassVar[str] = "torus.volume.name_claimed"
    name: str
    volume_id: int


@dataclass(frozen=True)
class VolumeNameReleased(DomainEvent):
    """A deleted volume gave up its name (stream ``volume-name:<name>``)."""

    TOPIC: ClassVar[str] = "torus.volume.name_released"
    name: str
    volume_id: int


@dataclass(frozen=True)
class VolumeCreated(DomainEvent):
    """A volume exists (stream ``volume-<id>``, version 1)."""

    TOPIC: ClassVar[str] = "torus.volume.created"
    volume_id: int
    name: str
    size: int
    type: str = "block"


@dataclass(frozen=True)
class VolumeResized(DomainEvent):
    """A volume grew."""

    TOPIC: ClassVar[str] = "torus.volume.resized"
    volume_id: int
    old_size: int
    new_size: int


@dataclass(frozen=True)
class VolumeDeleted(DomainEvent):
    """A volume is gone (its blocks become garbage)."""

    TOPIC: ClassVar[str] = "torus.volume.deleted"
    volume_id: int
    name: str


@dataclass(frozen=True)
class INodeIndexAllocated(DomainEvent):
    """A writer reserved the next INode index of a volume."""

    TOPIC: ClassVar[str] = "torus.volume.inode_index_allocated"
    volume_id: int
    index: int


@dataclass(frozen=True)
class INodeCommitted(DomainEvent):
    """The lock holder (``epoch``) made ``inode_ref`` the volume's current INode."""

    TOPIC: ClassVar[str] = "torus.volume.inode_committed"
    volume_id: int
    inode_ref: INodeRef
    epoch: int


@dataclass(frozen=True)
class SnapshotSaved(DomainEvent):
    """A named snapshot of the last committed INode (``time`` = wall-clock seconds)."""

    TOPIC: ClassVar[str] = "torus.volume.snapshot_saved"
    volume_id: int
    name: str
    inode_ref: INodeRef
    time: float


@dataclass(frozen=True)
class SnapshotRequested(DomainEvent):
    """A snapshot of a volume held open by a writer was asked for: the writer folds its journal
    in and saves it (as ``SnapshotSaved``), so the snapshot holds every acknowledged write."""

    TOPIC: ClassVar[str] = "torus.volume.snapshot_requested"
    volume_id: int
    name: str
    time: float


@dataclass(frozen=True)
class SnapshotDeleted(DomainEvent):
    """A snapshot record was removed."""

    TOPIC: ClassVar[str] = "torus.volume.snapshot_deleted"
    volume_id: int
    name: str


@dataclass(frozen=True)
class SnapshotRestored(DomainEvent):
    """The volume's current INode was set back to a snapshot's."""

    TOPIC: ClassVar[str] = "torus.volume.snapshot_restored"
    volume_id: int
    name: str
    inode_ref: INodeRef


@dataclass(frozen=True)
class VolumeLockAcquired(DomainEvent):
    """``owner`` took the single-writer lock; ``epoch`` counts acquisitions (1, 2, ...)."""

    TOPIC: ClassVar[str] = "torus.volume.lock_acquired"
    volume_id: int
    owner: str
    epoch: int
    lease_id: int


@dataclass(frozen=True)
class VolumeLockReleased(DomainEvent):
    """The holder of ``epoch`` released the lock."""

    TOPIC: ClassVar[str] = "torus.volume.lock_released"
    volume_id: int
    owner: str
    epoch: int


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class TopicRegistry:
    """Topic ↔ event class, plus upcasters; encodes and decodes ``state`` bytes."""

    def __init__(self) -> None:
        self._classes: dict[str, type[DomainEvent]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, cls: type[DomainEvent]) -> type[DomainEvent]:
        """Register an event class under its ``TOPIC`` (usable as a decorator)."""
        if not cls.TOPIC:
            raise InvalidArgument(f"{cls.__name__} has no TOPIC")
        known = self._classes.get(cls.TOPIC)
        if known is not None and known is not cls:
            raise InvalidArgument(f"topic {cls.TOPIC!r} already registered by {known.__name__}")
        self._classes[cls.TOPIC] = cls
        return cls

    def register_upcaster(self, topic: str, from_schema: int, fn: Upcaster) -> None:
        """Register ``fn`` turning ``data`` of schema ``from_schema`` into ``from_schema + 1``."""
        self._upcasters[(topic, from_schema)] = fn

    def topics(self) -> list[str]:
        """Every registered topic, sorted."""
        return sorted(self._classes)

    def event_class(self, topic: str) -> type[DomainEvent]:
        """The class of ``topic``; SchemaError if unknown."""
        try:
            return self._classes[topic]
        except KeyError:
            raise SchemaError(f"unknown event topic {topic!r}") from None

    def encode(self, event: DomainEvent) -> tuple[str, bytes]:
        """``(topic, state bytes)`` of ``event`` (its class must be registered)."""
        cls = self.event_class(type(event).TOPIC)
        if cls is not type(event):
            raise SchemaError(f"{type(event).__name__} is not the registered class of {cls.TOPIC!r}")
        doc = {"schema": cls.SCHEMA, "data": to_jsonable(event)}
        return cls.TOPIC, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def decode(self, topic: str, state: bytes) -> DomainEvent:
        """Rebuild an event from stored ``topic`` and ``state``, upcasting old schemas."""
        cls = self.event_class(topic)
        try:
            doc = json.loads(state)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SchemaError(f"{topic}: state is not JSON: {exc}") from None
        if not isinstance(doc, dict) or len(doc) != 2 or "schema" not in doc or "data" not in doc:
            raise SchemaError(f"{topic}: expected {{'schema', 'data'}}, got {doc!r:.80}")
        schema, data = doc["schema"], doc["data"]
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise SchemaError(f"{topic}: bad schema version {schema!r}")
        if schema > cls.SCHEMA:
            raise SchemaError(f"{topic}: schema {schema} is newer than this torus understands ({cls.SCHEMA})")
        while schema < cls.SCHEMA:
            up = self._upcasters.get((topic, schema))
            if up is None:
                raise SchemaError(f"{topic}: no upcaster from schema {schema}")
            data = up(data)
            schema += 1
        return _dataclass_from(data, cls)

    def new_event(self, stream_id: str, version: int, event: DomainEvent) -> NewEvent:
        """A :class:`NewEvent` carrying ``event`` at ``(stream_id, version)``."""
        topic, state = self.encode(event)
        return NewEvent(stream_id=stream_id, version=version, topic=topic, state=state)

    def recorded(self, stored: StoredEvent) -> RecordedEvent:
        """Decode a :class:`StoredEvent` into a :class:`RecordedEvent`."""
        return RecordedEvent(
            position=stored.position,
            stream_id=stored.stream_id,
            version=stored.version,
            timestamp=stored.timestamp,
            event=self.decode(stored.topic, stored.state),
        )


@dataclass(frozen=True)
class RecordedEvent:
    """A decoded event with where and when it was stored."""

    position: int
    stream_id: str
    version: int
    timestamp: float
    event: DomainEvent

    @property
    def topic(self) -> str:
        """The event's topic."""
        return type(self.event).TOPIC


#: The registry of torus's own events.
REGISTRY = TopicRegistry()
for _cls in (
    ClusterFormatted,
    RingChanged,
    VolumeIdAllocated,
    VolumeNameClaimed,
    VolumeNameReleased,
    VolumeCreated,
    VolumeResized,
    VolumeDeleted,
    INodeIndexAllocated,
    INodeCommitted,
    SnapshotSaved,
    SnapshotDeleted,
    SnapshotRestored,
    VolumeLockAcquired,
    VolumeLockReleased,
    SnapshotRequested,
):
    REGISTRY.register(_cls)
