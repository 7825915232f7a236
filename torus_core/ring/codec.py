"""Ring (de)serialisation in the original's ``models.Ring`` protobuf format, and ring factories.

``models.Ring{uint32 type = 1; uint32 version = 2; uint32 replication_factor = 3;
repeated PeerInfo peers = 4; map<string, bytes> attrs = 5}`` with
``PeerInfo{string uuid = 1; string address = 2; uint64 total_blocks = 4; ...}`` (other PeerInfo
fields are not part of a ring and are skipped on decode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torus_core.errors import InvalidArgument, UnknownBackendError
from torus_core.registry import Registry, cached_builtin_registry
from torus_core.ring import wire
from torus_core.ring.base import Ring, RingMember, RingSpec


def default_ring_registry() -> Registry:
    """A registry holding only the built-in ring types (no entry points loaded); built once and shared."""
    from torus_core.ring import builtin

    return cached_builtin_registry("ring type", "builtin-ring", builtin.torus_register_ring_types)


def _registry(registry: Registry | None) -> Registry:
    return registry if registry is not None else default_ring_registry()


def ring_class(name: str, registry: Registry | None = None) -> type[Ring]:
    """The ring class registered as ``name``; InvalidArgument listing the known types otherwise."""
    reg = _registry(registry)
    try:
        cls: type[Ring] = reg.get(name)
    except UnknownBackendError:
        raise InvalidArgument(f"unknown ring type {name!r}; known: {', '.join(reg.names())}") from None
    return cls


def ring_class_by_id(type_id: int, registry: Registry | None = None) -> type[Ring]:
    """The ring class with numeric ``type_id``; InvalidArgument if none is registered."""
    reg = _registry(registry)
    for r in reg.registrations():
        if getattr(r.impl, "type_id", None) == type_id:
            cls: type[Ring] = r.impl
            return cls
    raise InvalidArgument(f"unknown ring type id {type_id}")


def ring_from_spec(registry: Registry | None, spec: RingSpec) -> Ring:
    """Build a ring from its spec through the registry (built-ins if ``registry`` is None)."""
    if not isinstance(spec, RingSpec):
        raise InvalidArgument(f"expected a RingSpec, got {type(spec).__name__}")
    return ring_class(spec.type, registry).from_spec(spec)


def make_ring(
    type: str,
    members: Sequence[RingMember] = (),
    *,
    replication: int = 2,
    version: int = 1,
    attrs: Mapping[str, bytes] | None = None,
    registry: Registry | None = None,
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


def spec_to_bytes(spec: RingSpec, registry: Registry | None = None) -> bytes:
    """Encode a spec as ``models.Ring`` protobuf bytes."""
    type_id = ring_class(spec.type, registry).type_id
    out = [
        wire.uint_field(1, type_id),
        wire.uint_field(2, spec.version),
        wire.uint_field(3, spec.replication),
    ]
    out.extend(wire.bytes_field(4, _encode_member(m), keep_empty=True) for m in spec.members)
    for k in sorted(spec.attrs):
        out.append(wire.map_entry(5, k.encode("utf-8"), bytes(spec.attrs[k])))
    return b"".join(out)


def spec_from_bytes(data: bytes, registry: Registry | None = None) -> RingSpec:
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


def marshal_ring(ring: Ring, registry: Registry | None = None) -> bytes:
    """``models.Ring`` bytes of a ring."""
    return spec_to_bytes(ring.to_spec(), registry)


def unmarshal_ring(data: bytes, registry: Registry | None = None) -> Ring:
    """Rebuild a ring from ``models.Ring`` bytes."""
    return ring_from_spec(registry, spec_from_bytes(data, registry))
