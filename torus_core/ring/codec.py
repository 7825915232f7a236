"""Ring (de)serialisation in the original's ``models.Ring`` protobuf format, and ring factories.

``models.Ring{uint32 type = 1; uint32 version = 2; uint32 replication_factor = 3;
repeated PeerInfo peers = 4; map<string, bytes> attrs = 5}`` with
``PeerInfo{string uuid = 1; string address = 2; uint64 total_blocks = 4; ...}`` (other PeerInfo
fields are not part of a ring and are skipped on decode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torus_core import protowire as wire
from torus_core.errors import InvalidArgument, UnknownBackendError
from torus_core.registry import Registry
from torus_core.ring.base import Ring, RingMember, RingSpec


def ring_class(name: str, registry: Registry) -> type[Ring]:
    """The ring class registered as ``name``; InvalidArgument listing the known types otherwise
    (PluginError if a plugin registered something that is not a :class:`Ring` under it)."""
    try:
        return registry.subclass(name, Ring)
    except UnknownBackendError:
        raise InvalidArgument(f"unknown ring type {name!r}; known: {', '.join(registry.names())}") from None


def ring_class_by_id(type_id: int, registry: Registry) -> type[Ring]:
    """The ring class with numeric ``type_id``; InvalidArgument if none is registered."""
    for _name, cls in registry.subclasses(Ring):
        if cls.type_id == type_id:
            return cls
    raise InvalidArgument(f"unknown ring type id {type_id}; known: {', '.join(registry.names())}")


def ring_from_spec(registry: Registry, spec: RingSpec) -> Ring:
    """Build a ring from its spec through ``registry`` (which also resolves nested rings)."""
    if not isinstance(spec, RingSpec):
        raise InvalidArgument(f"expected a RingSpec, got {type(spec).__name__}")
    return ring_class(spec.type, registry).from_spec(spec, registry)


def make_ring(
    type: str,
    members: Sequence[RingMember] = (),
    *,
    replication: int = 2,
    version: int = 1,
    attrs: Mapping[str, bytes] | None = None,
    registry: Registry,
) -> Ring:
    """Build a ring by type name, e.g. ``make_ring("ketama", members, replication=2)``."""
    spec = RingSpec(type, version, replication, tuple(members), dict(attrs or {}))
    return ring_from_spec(registry, spec)


def _encode_member(m: RingMember) -> bytes:
    return wire.string_field(1, m.uuid) + wire.string_field(2, m.address) + wire.uint_field(4, m.total_blocks)


def _decode_member(data: bytes) -> RingMember:
    uuid, address, total = "", "", 0
    for field, _wt, value in wire.iter_fields(data):
        if field == 1:
            uuid = wire.expect_bytes(value, "PeerInfo.uuid").decode("utf-8", "strict")
        elif field == 2:
            address = wire.expect_bytes(value, "PeerInfo.address").decode("utf-8", "strict")
        elif field == 4:
            total = wire.expect_int(value, "PeerInfo.total_blocks")
    return RingMember(uuid=uuid, total_blocks=total, address=address)


def spec_to_bytes(spec: RingSpec, registry: Registry) -> bytes:
    """Encode a spec as ``models.Ring`` protobuf bytes."""
    return _encode(spec, ring_class(spec.type, registry).type_id)


def _encode(spec: RingSpec, type_id: int) -> bytes:
    out = [
        wire.uint_field(1, type_id),
        wire.uint_field(2, spec.version),
        wire.uint_field(3, spec.replication),
    ]
    out.extend(wire.bytes_field(4, _encode_member(m), keep_empty=True) for m in spec.members)
    for k in sorted(spec.attrs):
        out.append(wire.map_entry(5, k.encode("utf-8"), bytes(spec.attrs[k])))
    return b"".join(out)


def spec_from_bytes(data: bytes, registry: Registry) -> RingSpec:
    """Decode ``models.Ring`` protobuf bytes into a spec; InvalidArgument if malformed."""
    type_id = version = rep = 0
    members: list[RingMember] = []
    attrs: dict[str, bytes] = {}
    try:
        for field, _wt, value in wire.iter_fields(data):
            if field == 1:
                type_id = wire.expect_int(value, "Ring.type")
            elif field == 2:
                version = wire.expect_int(value, "Ring.version")
            elif field == 3:
                rep = wire.expect_int(value, "Ring.replication_factor")
            elif field == 4:
                members.append(_decode_member(wire.expect_bytes(value, "Ring.peers")))
            elif field == 5:
                k, v = wire.decode_map_entry(wire.expect_bytes(value, "Ring.attrs"))
                attrs[k.decode("utf-8", "strict")] = v
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"ring contains invalid UTF-8: {exc}") from None
    cls = ring_class_by_id(type_id, registry)
    return RingSpec(cls.name, version, rep, tuple(members), attrs)


def marshal_ring(ring: Ring) -> bytes:
    """``models.Ring`` bytes of a ring (its class carries the type id)."""
    return _encode(ring.to_spec(), type(ring).type_id)


def unmarshal_ring(data: bytes, registry: Registry) -> Ring:
    """Rebuild a ring from ``models.Ring`` bytes; ``registry`` resolves its type id."""
    return ring_from_spec(registry, spec_from_bytes(data, registry))
