"""etcd outages: SIGSTOP / SIGCONT and SIGKILL / restart of a private etcd under a live backend."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from torus_etcd.backend import EtcdBackend

from torus_core.errors import MetadataUnavailable
from torus_core.testing.eventlog import ev
from torus_core.testing.services import EtcdServer, etcd_service

pytestmark = pytest.mark.needs_etcd

TIMEOUT = 1.0
#: A failing call must return within the backend timeout plus this much slack.
SLACK = 3.0


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    with etcd_service() as srv:
        yield srv


@pytest.fixture
def backend(server: EtcdServer) -> Iterator[EtcdBackend]:
    b = EtcdBackend.from_url(f"{server.url}?timeout={TIMEOUT}")
    yield b
    b.close()


def _fails_fast(call: object) -> float:
    t0 = time.monotonic()
    with pytest.raises(MetadataUnavailable) as info:
        call()  # type: ignore[operator]
    assert info.value.backend == "etcd"
    elapsed = time.monotonic() - t0
    assert elapsed < TIMEOUT + SLACK
    return elapsed


def test_paused_server_makes_every_call_fail_fast_and_the_same_backend_recovers(
    server: EtcdServer, backend: EtcdBackend
) -> None:
    backend.log.append([ev("a", 1), ev("b", 1)])
    backend.leases.put("k", b"v")
    batch = [ev("a", 2), ev("b", 2), ev("c", 1)]
    server.pause()
    try:
        _fails_fast(lambda: backend.log.append(batch))
        _fails_fast(backend.log.head_position)
        _fails_fast(lambda: backend.log.read_all())
        _fails_fast(lambda: backend.log.wait_for_events(0, 0.5))
        _fails_fast(lambda: backend.leases.get("k"))
        _fails_fast(lambda: backend.leases.grant(5))
    finally:
        server.resume()
    # The timed-out batch may or may not have committed; retrying it is safe either way.
    positions = backend.log.append(batch)
    assert positions == [3, 4, 5]
    stored = backend.log.read_all()
    assert [(e.stream_id, e.version, e.position) for e in stored] == [
        ("a", 1, 1), ("b", 1, 2), ("a", 2, 3), ("b", 2, 4), ("c", 1, 5)
    ]  # fmt: skip
    assert backend.leases.get("k") == b"v"


def test_killed_server_fails_fast_and_after_restart_with_its_data_dir_the_backend_carries_on(
    server: EtcdServer, backend: EtcdBackend
) -> None:
    assert backend.log.append([ev("s", 1), ev("s", 2)]) == [1, 2]
    backend.log.save_snapshot("p", 2, b"state")
    server.kill()
    _fails_fast(lambda: backend.log.append([ev("s", 3)]))
    _fails_fast(backend.log.head_position)
    server.restart()
    deadline = time.monotonic() + 10
    while True:  # bounded: the channel reconnects with a <= 1 s backoff
        try:
            head = backend.log.head_position()
            break
        except MetadataUnavailable:
            assert time.monotonic() < deadline, "backend did not recover after etcd restart"
            time.sleep(0.1)
    assert head in (2, 3)  # the failed append never reached the dead server, but be exact below
    if head == 2:
        assert backend.log.append([ev("s", 3)]) == [3]
    assert [e.version for e in backend.log.read_stream("s")] == [1, 2, 3]
    assert backend.log.load_snapshot("p") == (2, b"state")


def test_second_endpoint_is_used_when_the_first_is_down(server: EtcdServer) -> None:
    from torus_core.testing.services import free_port

    dead = f"127.0.0.1:{free_port()}"
    b = EtcdBackend.from_url(f"etcd://{dead},{server.endpoint}?timeout={TIMEOUT}")
    try:
        for i in range(4):  # whichever endpoint is tried first, every call succeeds
            assert b.log.append([ev("f", i + 1)]) == [i + 1]
    finally:
        b.close()


def test_batch_beyond_etcd_txn_limit_is_invalid_and_writes_nothing(backend: EtcdBackend) -> None:
    from torus_core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="too many operations"):
        backend.log.append([ev("big", i + 1) for i in range(70)])  # 141 ops > etcd's default 128
    assert backend.log.head_position() == 0
    assert backend.log.append([ev("big", i + 1) for i in range(63)])[-1] == 63
