"""Redis outages and data-loss detection against a private redis-server (no persistence)."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import pytest
from torus_redis.backend import RedisBackend

from torus_core.errors import DataLossDetected
from torus_core.testing.eventlog import ev
from torus_core.testing.outage import (
    assert_fails_fast,
    assert_pause_fails_fast_and_backend_recovers,
    short_timeout_backend,
)
from torus_core.testing.services import RedisServer, redis_service

pytestmark = pytest.mark.needs_redis


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_service() as srv:
        yield srv


@pytest.fixture
def backend(server: RedisServer) -> Iterator[RedisBackend]:
    with short_timeout_backend(RedisBackend, server.url) as b:
        yield b


_fails_fast = functools.partial(assert_fails_fast, backend="redis")


def test_paused_server_makes_every_call_fail_fast_and_the_same_backend_recovers(
    server: RedisServer, backend: RedisBackend
) -> None:
    # The paused server executes the buffered script after SIGCONT: the batch committed once,
    # and an identical retry recognises its own events instead of failing or duplicating.
    reads = [lambda: backend.log.wait_for_events(2, 5.0)]
    assert_pause_fails_fast_and_backend_recovers(server, backend, "redis", reads)


def test_restarted_empty_server_raises_data_loss_instead_of_starting_a_new_history(
    server: RedisServer, backend: RedisBackend
) -> None:
    assert backend.log.append([ev("s", 1), ev("s", 2)]) == [1, 2]
    server.kill()
    _fails_fast(backend.log.head_position)
    server.restart()
    with pytest.raises(DataLossDetected, match="lost its data"):
        backend.log.head_position()
    with pytest.raises(DataLossDetected):
        backend.log.append([ev("s", 1)])
    with pytest.raises(DataLossDetected):
        backend.log.read_all()
    fresh = RedisBackend.from_url(server.url)  # nothing was written by the refused calls
    try:
        assert fresh.log.head_position() == 0
        assert fresh.cluster_id is None
    finally:
        fresh.close()
    # A deliberate wipe starts a new history.
    backend.wipe()
    assert backend.log.append([ev("s", 1)]) == [1]


def test_expected_cluster_id_option_detects_an_empty_or_foreign_server(server: RedisServer) -> None:
    first = RedisBackend.from_url(server.url)
    try:
        first.log.append([ev("x", 1)])
        cluster_id = first.cluster_id
        assert cluster_id
    finally:
        first.close()
    same = RedisBackend.from_url(server.url, {"cluster_id": cluster_id})
    try:
        assert same.log.head_position() == 1
    finally:
        same.close()
    foreign = RedisBackend.from_url(f"{server.url}?cluster_id=not-this-one")
    try:
        with pytest.raises(DataLossDetected, match="expected cluster not-this-one"):
            foreign.log.read_all()
    finally:
        foreign.close()
    empty = RedisBackend.from_url(f"{server.url}?prefix=other:", {"cluster_id": cluster_id})
    try:
        with pytest.raises(DataLossDetected, match="holds no torus data"):
            empty.log.head_position()
        with pytest.raises(DataLossDetected):
            empty.log.append([ev("x", 1)])
    finally:
        empty.close()
    # The refused append wrote nothing under the other prefix.
    check = RedisBackend.from_url(f"{server.url}?prefix=other:")
    try:
        assert check.log.head_position() == 0
    finally:
        check.close()


def test_lease_keys_expire_with_the_lease_on_the_server(backend: RedisBackend) -> None:
    lease = backend.leases.grant(0.5)
    backend.leases.put("node/1", b"alive", lease)
    backend.leases.put("plain", b"stays")
    deadline = time.monotonic() + 5
    while backend.leases.get("node/1") is not None:
        assert time.monotonic() < deadline, "leased key outlived its lease"
        time.sleep(0.05)
    assert backend.leases.get("plain") == b"stays"
