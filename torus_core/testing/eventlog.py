"""Conformance suites for metadata backends: contract classes and Hypothesis state machines.

A metadata plugin proves it honours :mod:`torus_core.eventlog` by subclassing the contracts in
its own test module and overriding two fixtures::

    class TestSQLiteEventLog(EventLogContract):
        @pytest.fixture
        def backend(self, tmp_path):             # a fresh, empty store
            b = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/meta.db")
            yield b
            b.close()

        @pytest.fixture
        def backend_factory(self, tmp_path):     # a *second* connection to the same store
            return lambda: SQLiteBackend.from_url(f"sqlite:///{tmp_path}/meta.db")

The contract classes do not start with ``Test`` so pytest collects them only through a
subclass (the zarr / eventsourcing pattern). Every wait in here is bounded; ttls and timeouts
are small but leave slack for a loaded 2-core machine and for service-backed backends (etcd,
Redis), and Hypothesis runs with ``deadline=None``.

Backends that can only be exercised through a service should still be *fresh* per test:
:class:`EventLogMachine` does not rely on that (it namespaces its streams and measures
positions relative to the head it found), but the plain contract tests do.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from torus_core.errors import CompareFailed, InvalidArgument, LeaseNotFound
from torus_core.eventlog import EventLog, LeaseStore, MetadataBackend, NewEvent, StoredEvent

__all__ = [
    "BackendFromUrl",
    "EventLogContract",
    "EventLogMachine",
    "LeaseStoreContract",
    "LeaseStoreMachine",
    "run_eventlog_machine",
    "run_leasestore_machine",
]

#: Short lease ttl used by expiry tests (seconds).
LEASE_TTL = 1.0
#: Upper bound on how long an expiry test waits past the ttl before failing.
EXPIRY_SLACK = 6.0
#: Timeout used when a test expects ``wait_for_events`` to *return* new events.
WAIT_TIMEOUT = 10.0


def ev(stream: str, version: int, topic: str = "test.event", state: bytes = b"{}") -> NewEvent:
    """Shorthand for a :class:`NewEvent` (exported for plugin-specific tests)."""
    return NewEvent(stream_id=stream, version=version, topic=topic, state=state)


def _triples(events: list[StoredEvent]) -> list[tuple[str, int, bytes]]:
    return [(e.stream_id, e.version, e.state) for e in events]


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class _BackendFixtures:
    """Fixtures every contract needs; subclasses override ``backend`` and ``backend_factory``."""

    @pytest.fixture
    def backend(self) -> Iterator[MetadataBackend]:
        """Yield a fresh, empty :class:`MetadataBackend` (override in the plugin's test class)."""
        raise NotImplementedError("override the `backend` fixture in your contract subclass")
        yield  # pragma: no cover

    @pytest.fixture
    def backend_factory(self) -> Callable[[], MetadataBackend]:
        """Return a callable opening a new connection to the store behind ``backend`` (override)."""
        raise NotImplementedError("override the `backend_factory` fixture in your contract subclass")

    @pytest.fixture
    def second(
        self, backend: MetadataBackend, backend_factory: Callable[[], MetadataBackend]
    ) -> Iterator[MetadataBackend]:
        """A second connection to the same store, closed after the test."""
        other = backend_factory()
        try:
            yield other
        finally:
            other.close()


class BackendFromUrl:
    """The ``backend`` and ``backend_factory`` fixtures, opened with ``backend_class.from_url``.

    Mix in before a contract class (``class TestX(BackendFromUrl, EventLogContract)``), set
    ``backend_class`` and provide a ``url`` fixture naming a fresh, empty store. With
    ``wipe_after`` (the default, for stores on a server shared by the session) the backend is
    wiped before it is closed.
    """

    backend_class: ClassVar[type[MetadataBackend]]
    wipe_after: ClassVar[bool] = True

    @pytest.fixture
    def backend(self, url: str) -> Iterator[MetadataBackend]:
        """A backend on ``url``, wiped (with ``wipe_after``) and closed after the test."""
        b = self.backend_class.from_url(url)
        yield b
        if self.wipe_after:
            b.wipe()
        b.close()

    @pytest.fixture
    def backend_factory(self, url: str) -> Callable[[], MetadataBackend]:
        """A callable opening another connection to ``url``."""
        return lambda: self.backend_class.from_url(url)


class EventLogContract(_BackendFixtures):
    """Behaviour every :class:`~torus_core.eventlog.EventLog` must show."""

    # --- append and versions ------------------------------------------------------------------

    def test_empty_log_has_no_events_and_head_zero(self, backend: MetadataBackend) -> None:
        log = backend.log
        assert log.head_position() == 0
        assert log.read_all() == []
        assert log.read_stream("nothing") == []
        assert log.stream_version("nothing") == 0
        assert log.append([]) == []
        assert log.head_position() == 0

    def test_append_versions_one_to_n_and_read_back(self, backend: MetadataBackend) -> None:
        log = backend.log
        positions = []
        for v in range(1, 6):
            positions += log.append([ev("s", v, state=f"{v}".encode())])
        assert positions == [1, 2, 3, 4, 5]
        events = log.read_stream("s")
        assert [e.version for e in events] == [1, 2, 3, 4, 5]
        assert [e.state for e in events] == [b"1", b"2", b"3", b"4", b"5"]
        assert [e.position for e in events] == positions
        assert all(e.topic == "test.event" and e.stream_id == "s" for e in events)
        assert log.stream_version("s") == 5
        assert log.head_position() == 5

    def test_stored_event_keeps_topic_state_bytes_and_a_timestamp(self, backend: MetadataBackend) -> None:
        payload = bytes(range(256))
        before = time.time()
        backend.log.append([ev("bin", 1, topic="torus.x.y", state=payload)])
        (e,) = backend.log.read_all()
        assert e.topic == "torus.x.y"
        assert e.state == payload
        assert before - 5 <= e.timestamp <= time.time() + 5

    def test_stale_version_raises_compare_failed_and_writes_nothing(self, backend: MetadataBackend) -> None:
        log = backend.log
        log.append([ev("s", 1), ev("s", 2)])
        for bad in (1, 2, 4):
            with pytest.raises(CompareFailed):
                log.append([ev("s", bad, state=b"bad")])
        with pytest.raises((CompareFailed, InvalidArgument)):
            log.append([ev("s", 0, state=b"bad")])
        with pytest.raises(CompareFailed) as info:
            log.append([ev("s", 2, state=b"dup")])
        assert info.value.stream_id in (None, "s")
        assert [e.state for e in log.read_stream("s")] == [b"{}", b"{}"]
        assert log.stream_version("s") == 2
        assert log.head_position() == 2

    def test_first_event_of_a_stream_must_be_version_one(self, backend: MetadataBackend) -> None:
        with pytest.raises(CompareFailed):
            backend.log.append([ev("fresh", 2)])
        assert backend.log.read_all() == []

    def test_batch_spanning_streams_is_atomic(self, backend: MetadataBackend) -> None:
        log = backend.log
        log.append([ev("a", 1)])
        # b:1 and c:1 are fine but a:1 is stale: nothing of the batch may be written.
        with pytest.raises(CompareFailed):
            log.append([ev("b", 1), ev("c", 1), ev("a", 1)])
        assert log.read_stream("b") == [] and log.read_stream("c") == []
        assert log.head_position() == 1
        positions = log.append([ev("b", 1), ev("a", 2), ev("c", 1), ev("b", 2)])
        assert positions == [2, 3, 4, 5]
        assert [(e.stream_id, e.version) for e in log.read_all()] == [
            ("a", 1),
            ("b", 1),
            ("a", 2),
            ("c", 1),
            ("b", 2),
        ]

    def test_duplicate_inside_a_batch_is_rejected(self, backend: MetadataBackend) -> None:
        log = backend.log
        with pytest.raises(CompareFailed):
            log.append([ev("d", 1), ev("d", 1)])
        with pytest.raises(CompareFailed):
            log.append([ev("d", 1), ev("d", 3)])
        assert log.read_all() == []
        assert log.head_position() == 0

    def test_positions_are_strictly_increasing_and_gap_free(self, backend: MetadataBackend) -> None:
        log = backend.log
        for i in range(1, 8):
            log.append([ev(f"p{i % 3}", log.stream_version(f"p{i % 3}") + 1)])
            try:
                log.append([ev(f"p{i % 3}", 1)])  # often stale: failures must not burn positions
            except CompareFailed:
                pass
        positions = [e.position for e in log.read_all()]
        assert positions == list(range(1, len(positions) + 1))
        assert log.head_position() == len(positions)

    def test_read_stream_after_and_limit(self, backend: MetadataBackend) -> None:
        log = backend.log
        log.append([ev("r", v) for v in range(1, 11)])
        log.append([ev("other", 1)])
        assert [e.version for e in log.read_stream("r", after=7)] == [8, 9, 10]
        assert [e.version for e in log.read_stream("r", after=2, limit=3)] == [3, 4, 5]
        assert [e.version for e in log.read_stream("r", limit=1)] == [1]
        assert log.read_stream("r", after=10) == []
        assert [e.stream_id for e in log.read_stream("other")] == ["other"]

    def test_read_all_after_and_limit(self, backend: MetadataBackend) -> None:
        log = backend.log
        log.append([ev("x", v) for v in range(1, 6)])
        log.append([ev("y", v) for v in range(1, 6)])
        assert [e.position for e in log.read_all(after=7)] == [8, 9, 10]
        assert [e.position for e in log.read_all(after=3, limit=4)] == [4, 5, 6, 7]
        assert log.read_all(after=10) == []
        assert log.read_all(after=100) == []
        assert [e.position for e in log.read_all(limit=2)] == [1, 2]

    def test_second_connection_sees_appends_and_conflicts(
        self, backend: MetadataBackend, second: MetadataBackend
    ) -> None:
        backend.log.append([ev("shared", 1)])
        assert second.log.stream_version("shared") == 1
        with pytest.raises(CompareFailed):
            second.log.append([ev("shared", 1)])
        second.log.append([ev("shared", 2)])
        assert [e.version for e in backend.log.read_stream("shared")] == [1, 2]
        assert backend.log.head_position() == second.log.head_position() == 2

    # --- concurrency ---------------------------------------------------------------------------

    def test_concurrent_appenders_lose_and_duplicate_nothing(
        self, backend: MetadataBackend, backend_factory: Callable[[], MetadataBackend]
    ) -> None:
        """Threads race on one shared stream and their own streams; conflicts are CompareFailed."""
        n_threads, per_thread = 4, 15
        acked: list[tuple[str, int, bytes]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(idx: int) -> None:
            conn = backend_factory()
            try:
                for i in range(per_thread):
                    own = (f"own-{idx}", i + 1, f"{idx}:{i}".encode())
                    conn.log.append([ev(*own[:2], state=own[2])])
                    with lock:
                        acked.append(own)
                    for _attempt in range(200):  # bounded retry on the shared stream
                        v = conn.log.stream_version("shared") + 1
                        payload = f"{idx}:{i}".encode()
                        try:
                            conn.log.append([ev("shared", v, state=payload)])
                        except CompareFailed:
                            continue
                        with lock:
                            acked.append(("shared", v, payload))
                        break
                    else:
                        raise AssertionError("shared append never succeeded")
            except BaseException as exc:
                errors.append(exc)
            finally:
                conn.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "appender threads hung"
        assert errors == []
        stored = backend.log.read_all()
        assert sorted(_triples(stored)) == sorted(acked)
        assert len(stored) == 2 * n_threads * per_thread
        assert [e.position for e in stored] == list(range(1, len(stored) + 1))
        assert [e.version for e in backend.log.read_stream("shared")] == list(
            range(1, n_threads * per_thread + 1)
        )

    def test_batches_from_concurrent_writers_do_not_interleave(
        self, backend: MetadataBackend, backend_factory: Callable[[], MetadataBackend]
    ) -> None:
        """Positions of one batch are contiguous even when batches race."""
        batch_size, batches = 10, 6
        errors: list[BaseException] = []
        results: dict[str, list[list[int]]] = {}

        def worker(name: str) -> None:
            conn = backend_factory()
            try:
                got = []
                for b in range(batches):
                    got.append(conn.log.append([ev(name, b * batch_size + i + 1) for i in range(batch_size)]))
                results[name] = got
            except BaseException as exc:
                errors.append(exc)
            finally:
                conn.close()

        threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        for name, got in results.items():
            for positions in got:
                assert positions == list(range(positions[0], positions[0] + batch_size)), name
        stored = backend.log.read_all()
        for e in stored:  # the positions returned to each writer are the ones stored
            (batch_positions,) = [p for p in results[e.stream_id] if e.position in p]
            assert batch_positions.index(e.position) == (e.version - 1) % batch_size

    # --- waiting -------------------------------------------------------------------------------

    def test_wait_for_events_returns_existing_events_immediately(self, backend: MetadataBackend) -> None:
        backend.log.append([ev("w", 1), ev("w", 2)])
        start = time.monotonic()
        got = backend.log.wait_for_events(after=1, timeout=WAIT_TIMEOUT)
        assert [e.position for e in got] == [2]
        assert time.monotonic() - start < WAIT_TIMEOUT

    def test_wait_for_events_sees_an_append_from_another_connection(
        self, backend: MetadataBackend, second: MetadataBackend
    ) -> None:
        head = backend.log.head_position()

        def later() -> None:
            time.sleep(0.3)
            second.log.append([ev("pushed", 1, state=b"hello")])

        t = threading.Thread(target=later)
        t.start()
        try:
            start = time.monotonic()
            got = backend.log.wait_for_events(after=head, timeout=WAIT_TIMEOUT)
            elapsed = time.monotonic() - start
        finally:
            t.join(timeout=30)
        assert [(e.stream_id, e.state) for e in got] == [("pushed", b"hello")]
        assert elapsed < WAIT_TIMEOUT

    def test_wait_for_events_returns_empty_after_its_timeout(self, backend: MetadataBackend) -> None:
        backend.log.append([ev("q", 1)])
        start = time.monotonic()
        got = backend.log.wait_for_events(after=1, timeout=0.3)
        elapsed = time.monotonic() - start
        assert got == []
        assert 0.25 <= elapsed < 5.0

    # --- snapshots -----------------------------------------------------------------------------

    def test_snapshots_save_load_and_replace(self, backend: MetadataBackend, second: MetadataBackend) -> None:
        log = backend.log
        assert log.load_snapshot("proj") is None
        log.save_snapshot("proj", 3, b"state-3")
        assert log.load_snapshot("proj") == (3, b"state-3")
        log.save_snapshot("proj", 9, bytes(range(256)))
        assert log.load_snapshot("proj") == (9, bytes(range(256)))
        assert second.log.load_snapshot("proj") == (9, bytes(range(256)))
        assert log.load_snapshot("other") is None

    def test_wipe_removes_events_snapshots_and_leases(self, backend: MetadataBackend) -> None:
        backend.log.append([ev("s", 1)])
        backend.log.save_snapshot("proj", 1, b"x")
        backend.leases.put("k", b"v")
        backend.wipe()
        assert backend.log.read_all() == []
        assert backend.log.head_position() == 0
        assert backend.log.stream_version("s") == 0
        assert backend.log.load_snapshot("proj") is None
        assert backend.leases.get("k") is None
        assert backend.log.append([ev("s", 1)]) == [1]

    # --- the state machine ---------------------------------------------------------------------

    def test_eventlog_state_machine(self, backend: MetadataBackend) -> None:
        run_eventlog_machine(lambda: backend)


class LeaseStoreContract(_BackendFixtures):
    """Behaviour every :class:`~torus_core.eventlog.LeaseStore` must show."""

    def test_put_get_overwrite_and_delete(self, backend: MetadataBackend) -> None:
        ls = backend.leases
        assert ls.get("a") is None
        ls.put("a", b"1")
        assert ls.get("a") == b"1"
        ls.put("a", b"2")
        assert ls.get("a") == b"2"
        assert ls.delete("a") is True
        assert ls.get("a") is None
        assert ls.delete("a") is False

    def test_put_if_absent_sets_only_once(self, backend: MetadataBackend, second: MetadataBackend) -> None:
        assert backend.leases.put_if_absent("lock", b"me") is True
        assert second.leases.put_if_absent("lock", b"you") is False
        assert second.leases.get("lock") == b"me"

    def test_delete_with_expected_value(self, backend: MetadataBackend) -> None:
        ls = backend.leases
        ls.put("k", b"owner-a")
        assert ls.delete("k", expected=b"owner-b") is False
        assert ls.get("k") == b"owner-a"
        assert ls.delete("k", expected=b"owner-a") is True
        assert ls.get("k") is None
        assert ls.delete("k", expected=b"owner-a") is False

    def test_get_prefix_returns_only_matching_live_keys(self, backend: MetadataBackend) -> None:
        ls = backend.leases
        ls.put("peers/a", b"1")
        ls.put("peers/b", b"2")
        ls.put("peersx", b"3")
        ls.put("locks/a", b"4")
        assert ls.get_prefix("peers/") == {"peers/a": b"1", "peers/b": b"2"}
        assert ls.get_prefix("nothing/") == {}
        assert set(ls.get_prefix("")) == {"peers/a", "peers/b", "peersx", "locks/a"}

    def test_grant_keepalive_revoke(self, backend: MetadataBackend) -> None:
        ls = backend.leases
        lease = ls.grant(30)
        assert lease.ttl == pytest.approx(30)
        other = ls.grant(30)
        assert other.id != lease.id
        ls.put("held", b"x", lease)
        ls.keepalive(lease)
        assert ls.get("held") == b"x"
        ls.revoke(lease)
        assert ls.get("held") is None
        ls.revoke(lease)  # revoking twice is a no-op
        with pytest.raises(LeaseNotFound):
            ls.keepalive(lease)
        ls.keepalive(other)  # the other lease is unaffected

    def test_keys_of_an_expired_lease_disappear(
        self, backend: MetadataBackend, second: MetadataBackend
    ) -> None:
        ls = backend.leases
        lease = ls.grant(LEASE_TTL)
        forever = ls.grant(60)
        ls.put("eph/short", b"s", lease)
        ls.put("eph/long", b"l", forever)
        ls.put("eph/plain", b"p")
        assert second.leases.get("eph/short") == b"s"
        assert _wait_until(lambda: second.leases.get("eph/short") is None, LEASE_TTL + EXPIRY_SLACK)
        assert ls.get("eph/short") is None
        assert ls.get_prefix("eph/") == {"eph/long": b"l", "eph/plain": b"p"}
        with pytest.raises(LeaseNotFound):
            ls.keepalive(lease)

    def test_an_expired_key_can_be_taken_with_put_if_absent(self, backend: MetadataBackend) -> None:
        ls = backend.leases
        lease = ls.grant(LEASE_TTL)
        assert ls.put_if_absent("lock", b"first", lease) is True
        assert _wait_until(lambda: ls.get("lock") is None, LEASE_TTL + EXPIRY_SLACK)
        assert ls.put_if_absent("lock", b"second") is True
        assert ls.get("lock") == b"second"

    def test_keepalive_extends_a_lease_past_its_ttl(self, backend: MetadataBackend) -> None:
        ls = backend.leases
        lease = ls.grant(2.0)
        ls.put("alive", b"yes", lease)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # bounded: 4 s of keepalives every 0.3 s
            ls.keepalive(lease)
            assert ls.get("alive") == b"yes"
            time.sleep(0.3)

    def test_put_with_a_revoked_lease_raises_lease_not_found(self, backend: MetadataBackend) -> None:
        ls = backend.leases
        lease = ls.grant(30)
        ls.revoke(lease)
        with pytest.raises(LeaseNotFound):
            ls.put("k", b"v", lease)
        with pytest.raises(LeaseNotFound):
            ls.put_if_absent("k2", b"v", lease)
        assert ls.get("k") is None and ls.get("k2") is None

    def test_grant_rejects_a_non_positive_ttl(self, backend: MetadataBackend) -> None:
        with pytest.raises(InvalidArgument):
            backend.leases.grant(0)
        with pytest.raises(InvalidArgument):
            backend.leases.grant(-1)

    def test_leasestore_state_machine(self, backend: MetadataBackend) -> None:
        run_leasestore_machine(lambda: backend)


# --- state machines ---------------------------------------------------------------------------

_STREAM_NAMES = st.sampled_from(["a", "b", "c", "d"])
_PAYLOADS = st.binary(max_size=24)

MACHINE_SETTINGS = settings(
    deadline=None,
    stateful_step_count=15,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class EventLogMachine(RuleBasedStateMachine):
    """An event log compared against a model: ``dict`` stream → payloads and a global list.

    The machine namespaces its streams with a fresh prefix and measures positions relative to
    the head it found, so it runs against a store that earlier examples already used.
    """

    def __init__(self, backend: MetadataBackend) -> None:
        super().__init__()
        self.log: EventLog = backend.log
        self.prefix = f"m{uuid.uuid4().hex[:10]}-"
        self.base = self.log.head_position()
        self.streams: dict[str, list[bytes]] = {}
        self.all: list[tuple[str, int, bytes]] = []

    def _sid(self, name: str) -> str:
        return self.prefix + name

    def _version(self, name: str) -> int:
        return len(self.streams.get(name, []))

    def _record(self, batch: list[NewEvent], positions: list[int]) -> None:
        expected = list(range(self.base + len(self.all) + 1, self.base + len(self.all) + 1 + len(batch)))
        assert positions == expected, (positions, expected)
        for e in batch:
            name = e.stream_id[len(self.prefix) :]
            self.streams.setdefault(name, []).append(e.state)
            self.all.append((e.stream_id, e.version, e.state))

    @rule(name=_STREAM_NAMES, payload=_PAYLOADS)
    def append_next(self, name: str, payload: bytes) -> None:
        """Append the next version of one stream."""
        batch = [ev(self._sid(name), self._version(name) + 1, state=payload)]
        note(f"append {batch}")
        self._record(batch, self.log.append(batch))

    @precondition(lambda self: any(self.streams.values()))
    @rule(data=st.data())
    def append_stale(self, data: st.DataObject) -> None:
        """Appending an existing version fails with CompareFailed and changes nothing."""
        name = data.draw(st.sampled_from(sorted(n for n, v in self.streams.items() if v)))
        version = data.draw(st.integers(1, self._version(name)))
        head = self.log.head_position()
        try:
            self.log.append([ev(self._sid(name), version, state=b"stale")])
        except CompareFailed:
            pass
        else:
            raise AssertionError(f"stale append of {name} v{version} succeeded")
        assert self.log.head_position() == head

    @rule(names=st.lists(_STREAM_NAMES, min_size=1, max_size=5), payload=_PAYLOADS)
    def append_multi_stream(self, names: list[str], payload: bytes) -> None:
        """A batch spanning streams (possibly several events per stream) is appended at once."""
        counts: dict[str, int] = {}
        batch = []
        for name in names:
            counts[name] = counts.get(name, 0) + 1
            batch.append(ev(self._sid(name), self._version(name) + counts[name], state=payload))
        note(f"append batch {batch}")
        self._record(batch, self.log.append(batch))

    @rule(names=st.lists(_STREAM_NAMES, min_size=1, max_size=3), dup=_STREAM_NAMES)
    def append_with_duplicate(self, names: list[str], dup: str) -> None:
        """A batch that repeats a (stream, version) pair is rejected entirely."""
        counts: dict[str, int] = {}
        batch = []
        for name in [*names, dup]:
            counts[name] = counts.get(name, 0) + 1
            batch.append(ev(self._sid(name), self._version(name) + counts[name], state=b"x"))
        batch.append(batch[-1])  # the same (stream, version) twice
        head = self.log.head_position()
        try:
            self.log.append(batch)
        except CompareFailed:
            pass
        else:
            raise AssertionError(f"batch with a duplicate was accepted: {batch}")
        assert self.log.head_position() == head

    @rule(name=_STREAM_NAMES, after=st.integers(0, 6), limit=st.none() | st.integers(1, 4))
    def read_stream(self, name: str, after: int, limit: int | None) -> None:
        """read_stream(after, limit) matches the model."""
        got = self.log.read_stream(self._sid(name), after=after, limit=limit)
        want = list(enumerate(self.streams.get(name, []), start=1))[after:]
        if limit is not None:
            want = want[:limit]
        assert [(e.version, e.state) for e in got] == want

    @rule(after=st.integers(0, 30), limit=st.none() | st.integers(1, 5))
    def read_all_after(self, after: int, limit: int | None) -> None:
        """read_all(after, limit) matches the model's global order."""
        got = self.log.read_all(after=self.base + after, limit=limit)
        want = self.all[after:]
        if limit is not None:
            want = want[:limit]
        assert _triples(got) == want
        assert [e.position for e in got] == list(
            range(self.base + after + 1, self.base + after + 1 + len(want))
        )

    @invariant()
    def versions_are_one_to_n(self) -> None:
        """Each stream's version equals its model length."""
        for name, payloads in self.streams.items():
            assert self.log.stream_version(self._sid(name)) == len(payloads)

    @invariant()
    def head_matches_model(self) -> None:
        """The head is the number of events appended since the machine started."""
        assert self.log.head_position() == self.base + len(self.all)

    @invariant()
    def read_all_matches_model(self) -> None:
        """Every event is stored once, in order, with strictly increasing positions."""
        got = self.log.read_all(after=self.base)
        assert _triples(got) == self.all
        positions = [e.position for e in got]
        assert all(b > a for a, b in itertools.pairwise(positions))


def run_eventlog_machine(
    factory: Callable[[], MetadataBackend], *, close: bool = False, settings_: settings | None = None
) -> None:
    """Run :class:`EventLogMachine` with a backend from ``factory`` for each example.

    ``close=True`` closes each backend after its example (for factories that open new ones).
    """
    opened: list[MetadataBackend] = []

    class _Machine(EventLogMachine):
        def __init__(self) -> None:
            backend = factory()
            opened.append(backend)
            super().__init__(backend)

        def teardown(self) -> None:
            if close:
                opened.pop().close()

    run_state_machine_as_test(_Machine, settings=settings_ or MACHINE_SETTINGS)


class LeaseStoreMachine(RuleBasedStateMachine):
    """A lease store (no expiry: long ttls) compared against a ``dict`` model.

    Keys are namespaced per machine; leases are long-lived, so only grant/put/revoke/delete
    semantics are exercised (expiry is covered by the contract tests).
    """

    leases_bundle = Bundle("leases")

    def __init__(self, backend: MetadataBackend) -> None:
        super().__init__()
        self.ls: LeaseStore = backend.leases
        self.prefix = f"lm{uuid.uuid4().hex[:10]}/"
        self.model: dict[str, tuple[bytes, int | None]] = {}
        self.live: set[int] = set()
        self.granted: list[Any] = []

    def _key(self, k: str) -> str:
        return self.prefix + k

    @rule(target=leases_bundle)
    def grant(self) -> Any:
        """Grant a long lease."""
        lease = self.ls.grant(300)
        self.live.add(lease.id)
        self.granted.append(lease)
        return lease

    @rule(k=st.sampled_from("abcde"), value=_PAYLOADS, lease=st.none() | leases_bundle)
    def put(self, k: str, value: bytes, lease: Any) -> None:
        """put overwrites; with a revoked lease it raises LeaseNotFound and changes nothing."""
        if lease is not None and lease.id not in self.live:
            try:
                self.ls.put(self._key(k), value, lease)
            except LeaseNotFound:
                return
            raise AssertionError("put with a revoked lease succeeded")
        self.ls.put(self._key(k), value, lease)
        self.model[k] = (value, lease.id if lease is not None else None)

    @rule(k=st.sampled_from("abcde"), value=_PAYLOADS)
    def put_if_absent(self, k: str, value: bytes) -> None:
        """put_if_absent sets only a missing key."""
        done = self.ls.put_if_absent(self._key(k), value)
        assert done == (k not in self.model)
        if done:
            self.model[k] = (value, None)

    @rule(k=st.sampled_from("abcde"), use_expected=st.booleans(), wrong=st.booleans())
    def delete(self, k: str, use_expected: bool, wrong: bool) -> None:
        """delete (with or without an expected value) matches the model."""
        current = self.model.get(k)
        expected = None
        if use_expected:
            expected = b"\xff-wrong" if wrong or current is None else current[0]
        done = self.ls.delete(self._key(k), expected=expected)
        should = current is not None and (expected is None or expected == current[0])
        assert done == should
        if should:
            del self.model[k]

    @rule(lease=leases_bundle)
    def revoke(self, lease: Any) -> None:
        """Revoking a lease removes exactly its keys."""
        self.ls.revoke(lease)
        self.live.discard(lease.id)
        self.model = {k: v for k, v in self.model.items() if v[1] != lease.id}

    @invariant()
    def prefix_matches_model(self) -> None:
        """get_prefix and get agree with the model."""
        got = self.ls.get_prefix(self.prefix)
        assert got == {self._key(k): v for k, (v, _) in self.model.items()}

    def teardown(self) -> None:
        """Revoke every lease this example granted."""
        for lease in self.granted:
            self.ls.revoke(lease)


def run_leasestore_machine(
    factory: Callable[[], MetadataBackend], *, close: bool = False, settings_: settings | None = None
) -> None:
    """Run :class:`LeaseStoreMachine` with a backend from ``factory`` for each example."""
    opened: list[MetadataBackend] = []

    class _Machine(LeaseStoreMachine):
        def __init__(self) -> None:
            backend = factory()
            opened.append(backend)
            super().__init__(backend)

        def teardown(self) -> None:
            super().teardown()
            if close:
                opened.pop().close()

    run_state_machine_as_test(_Machine, settings=settings_ or MACHINE_SETTINGS)
