"""The hand-written event codec (torus_core.events) against msgspec and cattrs drop-ins.

Reproduces the figures of docs/events.md. The two libraries are not torus dependencies: a
candidate whose library is not installed is skipped (``.venv/bin/pip install msgspec cattrs``).

    .venv/bin/python bench/event_codec.py            # 11 rounds of 30,000 events (~1 min)
    .venv/bin/python bench/event_codec.py --quick    # 3 rounds of 5,000

For each candidate it prints: how many corpus events encode to the same bytes as today (and
whether both sides read each other's output), how many malformed payloads raise SchemaError,
the upcaster vectors, how many randomly mutated payloads decode differently from today, and
encode/decode microseconds per event.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import random
import statistics
import time
import timeit
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from torus_core import events as E
from torus_core.errors import InvalidArgument, SchemaError
from torus_core.events import REGISTRY, DomainEvent, from_jsonable
from torus_core.projection import ClusterState, GlobalMetadata, SnapshotInfo, VolumeState
from torus_core.refs import INodeRef
from torus_core.ring.base import RingMember, RingSpec

Upcasters = dict[int, Callable[[dict[str, Any]], dict[str, Any]]]
Encode = Callable[[DomainEvent], bytes]
Decode = Callable[[type, bytes, Upcasters], Any]


def _envelope(cls: Any, state: bytes, ups: Upcasters) -> Any:
    """The current envelope checks and upcasting, shared by the cattrs candidate."""
    try:
        doc = json.loads(state)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(str(exc)) from None
    if not isinstance(doc, dict) or set(doc) != {"schema", "data"}:
        raise SchemaError("bad envelope")
    schema, data = doc["schema"], doc["data"]
    if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= cls.SCHEMA:
        raise SchemaError("bad schema")
    for s in range(schema, cls.SCHEMA):
        data = ups[s](data)
    return data


# --- the candidates -----------------------------------------------------------------------------


def hand_written() -> tuple[Encode, Decode, Callable[[Any], Any]]:
    test_registry = E.TopicRegistry()
    test_registry.register(_QuotaSet)
    for s, fn in UPCASTERS.items():
        test_registry.register_upcaster(_QuotaSet.TOPIC, s, fn)

    def decode(cls: Any, state: bytes, ups: Upcasters) -> Any:
        return (test_registry if cls is _QuotaSet else REGISTRY).decode(cls.TOPIC, state)

    return (
        lambda ev: REGISTRY.encode(ev)[1],
        decode,
        lambda b: from_jsonable(json.loads(b), ClusterState),
    )


def msgspec_candidates() -> dict[str, tuple[Encode, Decode, Callable[[Any], Any] | None]]:
    import msgspec

    enc = msgspec.json.Encoder(order="sorted")  # "sorted" refuses the snapshot's dict[int, ...]
    untyped = msgspec.json.Decoder()

    env = msgspec.defstruct("Env", [("schema", int), ("data", msgspec.Raw)], forbid_unknown_fields=True)
    env_dec: Any = msgspec.json.Decoder(env)
    typed: dict[type, Any] = {}

    def encode(ev: DomainEvent) -> bytes:
        return enc.encode({"schema": type(ev).SCHEMA, "data": ev})

    def lenient(cls: Any, state: bytes, ups: Upcasters) -> Any:
        try:
            env = env_dec.decode(state)
            if not 1 <= env.schema <= cls.SCHEMA:
                raise SchemaError("bad schema")
            if env.schema == cls.SCHEMA:
                dec = typed.get(cls)
                if dec is None:
                    dec = typed[cls] = msgspec.json.Decoder(cls)
                return dec.decode(env.data)
            data = untyped.decode(env.data)
            for s in range(env.schema, cls.SCHEMA):
                data = ups[s](data)
            return msgspec.convert(data, cls)
        except (msgspec.ValidationError, msgspec.DecodeError, InvalidArgument) as exc:
            raise SchemaError(str(exc)) from None

    def unknown(src: Any, out: Any) -> bool:
        if isinstance(src, dict):
            return not isinstance(out, dict) or any(
                k not in out or unknown(v, out[k]) for k, v in src.items()
            )
        if isinstance(src, list):
            return any(unknown(a, b) for a, b in zip(src, out, strict=False))
        return False

    def strict(cls: Any, state: bytes, ups: Upcasters) -> Any:
        # msgspec cannot forbid unknown fields of a dataclass (only of a Struct): compare keys
        try:
            env = env_dec.decode(state)
            if not 1 <= env.schema <= cls.SCHEMA:
                raise SchemaError("bad schema")
            data = untyped.decode(env.data)
            for s in range(env.schema, cls.SCHEMA):
                data = ups[s](data)
            ev = msgspec.convert(data, cls, str_keys=True)
        except (msgspec.ValidationError, msgspec.DecodeError, InvalidArgument) as exc:
            raise SchemaError(str(exc)) from None
        if unknown(data, msgspec.to_builtins(ev, str_keys=True)):
            raise SchemaError("unknown fields")
        return ev

    def snapshot(b: bytes) -> Any:
        try:
            return msgspec.convert(msgspec.json.decode(b), ClusterState, str_keys=True)
        except (msgspec.ValidationError, InvalidArgument) as exc:
            raise SchemaError(str(exc)) from None

    return {"msgspec": (encode, lenient, snapshot), "msgspec + strict glue": (encode, strict, None)}


def cattrs_candidate() -> dict[str, tuple[Encode, Decode, Callable[[Any], Any] | None]]:
    import cattrs

    conv = cattrs.Converter(forbid_extra_keys=True)  # the JSON preconf one writes bytes as base85

    def fail(what: str, data: Any) -> SchemaError:
        return SchemaError(f"expected {what}, got {data!r:.80}")

    def strict(tp: type, ok: Callable[[Any], bool]) -> Callable[[Any, Any], Any]:
        def hook(data: Any, _: Any) -> Any:  # cattrs coerces: "1" -> 1, True -> 1
            if not ok(data):
                raise fail(tp.__name__, data)
            return tp(data)

        return hook

    def b64(data: Any, _: Any) -> bytes:
        if not isinstance(data, str):
            raise fail("base64 text", data)
        try:
            return base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise fail("base64 text", data) from None

    def array(tp: Any) -> Callable[[Any, Any], Any]:
        item = typing.get_args(tp)[0]

        def hook(data: Any, _: Any) -> Any:  # cattrs makes a tuple of any iterable: "ab" -> ("a", "b")
            if not isinstance(data, list):
                raise fail("an array", data)
            return tuple(conv.structure(v, item) for v in data)

        return hook

    def int_keyed(tp: Any) -> Callable[[Any, Any], Any]:
        val = typing.get_args(tp)[1]

        def hook(data: Any, _: Any) -> Any:  # the strict int hook refuses JSON's string keys
            if not isinstance(data, dict):
                raise fail("an object", data)
            try:
                return {int(k): conv.structure(v, val) for k, v in data.items()}
            except ValueError:
                raise fail("decimal keys", data) from None

        return hook

    conv.register_structure_hook(int, strict(int, lambda d: isinstance(d, int) and not isinstance(d, bool)))
    conv.register_structure_hook(str, strict(str, lambda d: isinstance(d, str)))
    conv.register_structure_hook(bool, strict(bool, lambda d: isinstance(d, bool)))
    conv.register_structure_hook(
        float, strict(float, lambda d: isinstance(d, int | float) and not isinstance(d, bool))
    )
    conv.register_structure_hook(bytes, b64)
    conv.register_unstructure_hook(bytes, lambda b: base64.b64encode(b).decode("ascii"))
    conv.register_structure_hook_factory(lambda tp: typing.get_origin(tp) is tuple, array)
    conv.register_structure_hook_factory(
        lambda tp: typing.get_origin(tp) is dict and typing.get_args(tp)[0] is int, int_keyed
    )
    errors = (cattrs.BaseValidationError, InvalidArgument, TypeError, ValueError, KeyError, AttributeError)

    def structure(data: Any, tp: Any) -> Any:
        try:
            return conv.structure(data, tp)
        except errors as exc:  # AttributeError: an array where an object belongs
            raise SchemaError("; ".join(cattrs.transform_error(exc))) from None

    def encode(ev: DomainEvent) -> bytes:
        doc = {"schema": type(ev).SCHEMA, "data": conv.unstructure(ev)}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def decode(cls: Any, state: bytes, ups: Upcasters) -> Any:
        return structure(_envelope(cls, state, ups), cls)

    return {"cattrs + glue": (encode, decode, lambda b: structure(json.loads(b), ClusterState))}


# --- the checks ---------------------------------------------------------------------------------

_REF = INodeRef(7, 3)
_SPEC = RingSpec(
    "ketama", 4, 2, (RingMember("u1", 10, "127.0.0.1:4000"), RingMember("ü2")), {"k": b"\x00\xff", "z": b""}
)
CORPUS: list[DomainEvent] = [
    E.ClusterFormatted(4096, "crc,base", "ketama", 2, "c1d2"),
    E.ClusterFormatted(4096, "base", "single", 1),
    E.RingChanged(_SPEC),
    E.RingChanged(RingSpec("empty", 1, 1)),
    E.VolumeIdAllocated(1, "vol"),
    E.VolumeNameClaimed('völ/ä ☃ "q"\n', 3),
    E.VolumeNameReleased("x", 3),
    E.VolumeCreated(1, "a", 10),
    E.VolumeCreated(2, "f", 2**60, "file"),
    E.VolumeResized(1, 10, 20),
    E.VolumeDeleted(1, "a"),
    E.INodeIndexAllocated(1, 5),
    E.INodeCommitted(1, INodeRef(7, 2**64 - 1), 3),
    *(E.SnapshotSaved(7, "s", _REF, t) for t in (12.5, 1786000000.123456, 1e16, 0.1, 5e-324, -0.0, 1e22)),
    E.SnapshotSaved(7, "s", _REF, 123456789012345680.0),
    E.SnapshotRequested(7, "s", 3.0),
    E.SnapshotDeleted(7, "s"),
    E.SnapshotRestored(7, "s", _REF),
    E.VolumeLockAcquired(7, "node-a", 4, 2**62),
    E.VolumeLockReleased(7, "node-a", 4),
]
MALFORMED = [
    b"not json",
    b"\xff\xfe",
    b"[]",
    b'{"schema":1}',
    b'{"schema":0,"data":{}}',
    b'{"schema":true,"data":{}}',
    b'{"schema":2,"data":{"volume_id":1,"name":"a","size":1}}',
    b'{"schema":1,"data":{"volume_id":1,"name":"a"}}',
    b'{"schema":1,"data":{"volume_id":"1","name":"a","size":1}}',
    b'{"schema":1,"data":{"volume_id":1,"name":"a","size":1,"extra":2}}',
    b'{"schema":1,"data":{"volume_id":true,"name":"a","size":1}}',
    b'{"schema":1,"data":{"volume_id":1,"name":"a","size":1,"typo":"block"}}',
    b'{"schema":1,"data":{"volume_id":1,"name":"a","size":1.0}}',
    b'{"schema":1,"data":[]}',
]
BAD_OTHER = [
    (E.INodeCommitted, b'{"schema":1,"data":{"volume_id":1,"inode_ref":{"volume":-5,"inode":1},"epoch":1}}'),
    (
        E.RingChanged,
        b'{"schema":1,"data":{"spec":{"type":"x","version":1,"replication":1,"attrs":{"k":"!!"}}}}',
    ),
]


@dataclass(frozen=True)
class _QuotaSet(DomainEvent):
    TOPIC: ClassVar[str] = "bench.quota.set"
    SCHEMA: ClassVar[int] = 3
    size: int
    unit: str


UPCASTERS: Upcasters = {1: lambda d: {"size": d["size_mib"] * 2**20}, 2: lambda d: {**d, "unit": "B"}}
STATE = ClusterState(
    position=99,
    global_metadata=GlobalMetadata(4096, "base", "ketama", 2, "cid"),
    ring=_SPEC,
    volumes={
        1: VolumeState(
            1,
            "ä",
            10,
            current_inode=INodeRef(1, 4),
            snapshots={"s": SnapshotInfo("s", INodeRef(1, 3), 1.5)},
            snapshot_requests=("r1",),
        ),
        2: VolumeState(2, "b", 20),
    },
    names={"ä": 1, "b": 2},
    stream_versions={"volume-1": 7},
)
_VALUES = [1, 0, -1, "1", True, None, 1.5, [], {}, "abc", ["a"], [1], {"x": 1}, "AP8=", "!!", 2**70]


def _mutate(data: Any, rnd: random.Random) -> Any:
    data = json.loads(json.dumps(data))
    paths: list[tuple[Any, ...]] = []

    def walk(d: Any, p: tuple[Any, ...]) -> None:
        paths.append(p)
        for k, v in d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ():
            walk(v, (*p, k))

    walk(data, ())
    path = rnd.choice(paths[1:])
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    op = rnd.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.3 and isinstance(parent[path[-1]], dict):
        parent[path[-1]]["zz"] = 1
    else:
        parent[path[-1]] = rnd.choice(_VALUES)
    return data


def _outcome(f: Callable[[], Any]) -> tuple[str, str]:
    try:
        v = f()
    except SchemaError:
        return ("SchemaError", "")
    except Exception as exc:
        return ("crash", type(exc).__name__)
    return ("ok", repr(v))


def check(name: str, encode: Encode, decode: Decode, snapshot: Callable[[Any], Any] | None) -> None:
    ref_enc, ref_dec, ref_snap = hand_written()
    same = sum(encode(ev) == ref_enc(ev) for ev in CORPUS)
    json_eq = all(json.loads(encode(ev)) == json.loads(ref_enc(ev)) for ev in CORPUS)
    reads = all(decode(type(ev), ref_enc(ev), {}) == ev == ref_dec(type(ev), encode(ev), {}) for ev in CORPUS)
    bad = [(E.VolumeCreated, s) for s in MALFORMED] + BAD_OTHER
    rejected = sum(_outcome(partial(decode, c, s, {}))[0] == "SchemaError" for c, s in bad)
    upcast = (
        decode(_QuotaSet, b'{"schema":1,"data":{"size_mib":3}}', UPCASTERS) == _QuotaSet(3 * 2**20, "B")
        and decode(_QuotaSet, b'{"schema":2,"data":{"size":5}}', UPCASTERS) == _QuotaSet(5, "B")
        and decode(_QuotaSet, b'{"schema":3,"data":{"size":1,"unit":"B"}}', UPCASTERS) == _QuotaSet(1, "B")
    )
    rnd = random.Random(7)
    differ = 0
    for _ in range(2000):
        ev = rnd.choice(CORPUS)
        b = json.dumps({"schema": 1, "data": _mutate(json.loads(ref_enc(ev))["data"], rnd)}).encode()
        differ += _outcome(partial(decode, type(ev), b, {})) != _outcome(partial(ref_dec, type(ev), b, {}))
    snap = "n/a"
    if snapshot is not None:
        sdata = E.to_jsonable(STATE)
        sdiff = 0
        for _ in range(1000):
            b = json.dumps(_mutate(sdata, rnd)).encode()
            sdiff += _outcome(partial(snapshot, b)) != _outcome(partial(ref_snap, b))
        snap = f"{sdiff}/1000"
    print(
        f"{name}: same bytes {same}/{len(CORPUS)}, JSON-equal {json_eq}, reads both ways {reads}, "
        f"malformed rejected {rejected}/{len(bad)}, upcasters {upcast}, "
        f"mutated events decoded differently {differ}/2000, mutated snapshots {snap}"
    )


def mix(n: int) -> list[DomainEvent]:
    """A volume log: 60 % INodeCommitted, 25 % INodeIndexAllocated, 12 % locks, 3 % SnapshotSaved."""
    rnd = random.Random(1)
    evs: list[DomainEvent] = []
    for i in range(n):
        r, v = rnd.random(), 1 + i % 50
        if r < 0.6:
            evs.append(E.INodeCommitted(v, INodeRef(v, 2 + i), 1 + i % 7))
        elif r < 0.85:
            evs.append(E.INodeIndexAllocated(v, 2 + i))
        elif r < 0.92:
            evs.append(E.VolumeLockAcquired(v, f"node-{i % 3}", 1 + i % 7, 7587000000 + i))
        elif r < 0.97:
            evs.append(E.VolumeLockReleased(v, f"node-{i % 3}", 1 + i % 7))
        else:
            evs.append(E.SnapshotSaved(v, f"snap-{i}", INodeRef(v, 2 + i), 1786000000.0 + i / 7))
    return evs


def timings(candidates: dict[str, tuple[Encode, Decode, Any]], n: int, rounds: int) -> None:
    """Candidates take turns, round after round (a shared machine's load then hits all of them)."""
    evs = mix(n)
    pairs = {name: [(type(ev), enc(ev)) for ev in evs] for name, (enc, _, _) in candidates.items()}
    enc_us: dict[str, list[float]] = {name: [] for name in candidates}
    dec_us: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, (encode, decode, _) in candidates.items():
            t0 = time.perf_counter()
            for ev in evs:
                encode(ev)
            t1 = time.perf_counter()
            for c, b in pairs[name]:
                decode(c, b, {})
            t2 = time.perf_counter()
            enc_us[name].append((t1 - t0) / n * 1e6)
            dec_us[name].append((t2 - t1) / n * 1e6)
    ref = dec_us["hand-written"]
    print(f"{n} events of the mix, {rounds} rounds: median (fastest) us per event")
    for name in candidates:
        ratio = [d / r for d, r in zip(dec_us[name], ref, strict=True)]
        print(
            f"    {name:22} encode {statistics.median(enc_us[name]):5.2f} ({min(enc_us[name]):5.2f})"
            f"  decode {statistics.median(dec_us[name]):5.2f} ({min(dec_us[name]):5.2f})"
            f"  decode / hand-written {statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})"
        )


def snapshot_timings(candidates: dict[str, tuple[Encode, Decode, Any]]) -> None:
    """Decode of a 1,000-volume ClusterState snapshot (3 snapshots per volume), fastest of 5."""
    big = ClusterState(
        position=10**6,
        global_metadata=STATE.global_metadata,
        ring=_SPEC,
        volumes={
            v: VolumeState(
                v,
                f"vol{v}",
                2**30,
                last_inode_index=900,
                current_inode=INodeRef(v, 900),
                snapshots={f"s{k}": SnapshotInfo(f"s{k}", INodeRef(v, 100 * k), 1.5) for k in range(3)},
            )
            for v in range(1, 1001)
        },
        names={f"vol{v}": v for v in range(1, 1001)},
        stream_versions={f"volume-{v}": 2000 for v in range(1, 1001)},
    )
    blob = json.dumps(E.to_jsonable(big), sort_keys=True, separators=(",", ":")).encode()
    print("1,000-volume snapshot decode, fastest of 5:")
    for name, (_, _, snapshot) in candidates.items():
        if snapshot is not None:
            assert snapshot(blob) == big
            best = min(timeit.repeat(partial(snapshot, blob), number=1, repeat=5))
            print(f"    {name:22} {best * 1e3:6.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 5,000 events instead of 11 of 30,000")
    quick = ap.parse_args().quick
    assert {type(ev) for ev in CORPUS} == {REGISTRY.event_class(t) for t in REGISTRY.topics()}
    candidates: dict[str, tuple[Encode, Decode, Callable[[Any], Any] | None]] = {
        "hand-written": hand_written()
    }
    for load in (msgspec_candidates, cattrs_candidate):
        try:
            candidates.update(load())
        except ImportError as exc:
            print(f"skipped: {exc}")
    for name, (encode, decode, snapshot) in candidates.items():
        check(name, encode, decode, snapshot)
    timings(candidates, 5_000 if quick else 30_000, 3 if quick else 11)
    snapshot_timings(candidates)


if __name__ == "__main__":
    main()
