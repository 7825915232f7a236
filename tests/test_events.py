"""Events: stable topics, the JSON encoding, upcasting and schema errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torus_core.errors import SchemaError
from torus_core.events import (
    REGISTRY,
    ClusterFormatted,
    DomainEvent,
    INodeCommitted,
    RingChanged,
    SnapshotSaved,
    TopicRegistry,
    VolumeCreated,
    VolumeLockAcquired,
)
from torus_core.refs import VOLUME_MAX, INodeRef
from torus_core.ring.base import RingMember, RingSpec

EXPECTED_TOPICS = {
    "torus.cluster.formatted",
    "torus.ring.changed",
    "torus.volume.id_allocated",
    "torus.volume.name_claimed",
    "torus.volume.name_released",
    "torus.volume.created",
    "torus.volume.resized",
    "torus.volume.deleted",
    "torus.volume.inode_index_allocated",
    "torus.volume.inode_committed",
    "torus.volume.snapshot_saved",
    "torus.volume.snapshot_requested",
    "torus.volume.snapshot_deleted",
    "torus.volume.snapshot_restored",
    "torus.volume.lock_acquired",
    "torus.volume.lock_released",
}


def test_registry_holds_every_metadata_event_under_its_stable_topic() -> None:
    assert set(REGISTRY.topics()) == EXPECTED_TOPICS
    assert REGISTRY.event_class("torus.volume.created") is VolumeCreated


def test_encoding_is_the_documented_json_envelope() -> None:
    topic, state = REGISTRY.encode(SnapshotSaved(7, "snap", INodeRef(7, 3), 12.5))
    assert topic == "torus.volume.snapshot_saved"
    assert json.loads(state) == {
        "schema": 1,
        "data": {"volume_id": 7, "name": "snap", "inode_ref": {"volume": 7, "inode": 3}, "time": 12.5},
    }


def test_ring_spec_with_bytes_attrs_round_trips_as_base64() -> None:
    spec = RingSpec(
        "ketama", 4, 2, (RingMember("u1", 10, "127.0.0.1:4000"), RingMember("u2")), {"k": b"\x00\xff"}
    )
    topic, state = REGISTRY.encode(RingChanged(spec))
    assert json.loads(state)["data"]["spec"]["attrs"] == {"k": "AP8="}
    assert REGISTRY.decode(topic, state) == RingChanged(spec)


_names = st.text(min_size=1, max_size=20)
_u64 = st.integers(0, 2**64 - 1)


@given(
    st.one_of(
        st.builds(ClusterFormatted, st.integers(1, 2**40), _names, _names, st.integers(0, 9)),
        st.builds(VolumeCreated, st.integers(1, VOLUME_MAX), _names, st.integers(1, 2**60)),
        st.builds(
            INodeCommitted,
            st.integers(1, VOLUME_MAX),
            st.builds(INodeRef, st.integers(0, VOLUME_MAX), _u64),
            _u64,
        ),
        st.builds(VolumeLockAcquired, st.integers(1, 99), _names, st.integers(1, 99), st.integers(1, 2**62)),
        st.builds(
            SnapshotSaved,
            st.integers(1, 99),
            _names,
            st.builds(INodeRef, st.integers(0, VOLUME_MAX), _u64),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
    )
)
def test_every_event_round_trips_through_its_encoding(event: DomainEvent) -> None:
    topic, state = REGISTRY.encode(event)
    assert REGISTRY.decode(topic, state) == event


def test_unknown_topic_raises_schema_error() -> None:
    with pytest.raises(SchemaError):
        REGISTRY.decode("torus.nope", b'{"schema":1,"data":{}}')


@pytest.mark.parametrize(
    "state",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"schema":1}',
        b'{"schema":0,"data":{}}',
        b'{"schema":true,"data":{}}',
        b'{"schema":1,"data":{"volume_id":1,"name":"a"}}',  # size missing
        b'{"schema":1,"data":{"volume_id":"1","name":"a","size":1}}',
        b'{"schema":1,"data":{"volume_id":1,"name":"a","size":1,"extra":2}}',
        b'{"schema":1,"data":{"volume_id":true,"name":"a","size":1}}',  # a bool is not an id
        b'{"schema":1,"data":{"volume_id":1,"name":"a","size":1,"typo":"block"}}',  # default unset
        b'{"schema":1,"data":[]}',
    ],
)
def test_malformed_payloads_raise_schema_error(state: bytes) -> None:
    with pytest.raises(SchemaError):
        REGISTRY.decode("torus.volume.created", state)


def test_malformed_inode_ref_raises_schema_error() -> None:
    bad = b'{"schema":1,"data":{"volume_id":1,"inode_ref":{"volume":-5,"inode":1},"epoch":1}}'
    with pytest.raises(SchemaError):
        REGISTRY.decode("torus.volume.inode_committed", bad)


def test_schema_newer_than_the_class_raises_schema_error() -> None:
    _, state = REGISTRY.encode(VolumeCreated(1, "a", 10))
    newer = json.dumps({"schema": 2, "data": json.loads(state)["data"]}).encode()
    with pytest.raises(SchemaError):
        REGISTRY.decode("torus.volume.created", newer)


# An event whose schema moved from v1 {"size_mib": int} to v2 {"size": bytes, "unit": str}.
@dataclass(frozen=True)
class _QuotaSet(DomainEvent):
    TOPIC: ClassVar[str] = "test.quota.set"
    SCHEMA: ClassVar[int] = 3
    size: int
    unit: str


def test_upcasters_turn_an_old_payload_into_the_current_schema() -> None:
    reg = TopicRegistry()
    reg.register(_QuotaSet)
    reg.register_upcaster("test.quota.set", 1, lambda d: {"size": d["size_mib"] * 2**20})
    reg.register_upcaster("test.quota.set", 2, lambda d: {**d, "unit": "B"})
    old = b'{"schema":1,"data":{"size_mib":3}}'
    assert reg.decode("test.quota.set", old) == _QuotaSet(3 * 2**20, "B")
    middle = b'{"schema":2,"data":{"size":5}}'
    assert reg.decode("test.quota.set", middle) == _QuotaSet(5, "B")
    topic, current = reg.encode(_QuotaSet(1, "B"))
    assert json.loads(current)["schema"] == 3
    assert reg.decode(topic, current) == _QuotaSet(1, "B")


def test_a_missing_upcaster_raises_schema_error() -> None:
    reg = TopicRegistry()
    reg.register(_QuotaSet)
    reg.register_upcaster("test.quota.set", 2, lambda d: {**d, "unit": "B"})
    with pytest.raises(SchemaError):
        reg.decode("test.quota.set", b'{"schema":1,"data":{"size_mib":3}}')


def test_encoding_an_unregistered_event_raises_schema_error() -> None:
    with pytest.raises(SchemaError):
        TopicRegistry().encode(VolumeCreated(1, "a", 1))
