"""etcd outages: SIGSTOP / SIGCONT and SIGKILL / restart of a private etcd under a live backend."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import pytest
from torus_etcd.backend import EtcdBackend

from torus_core.errors import MetadataUnavailable
from torus_core.testing.eventlog import ev
from torus_core.testing.outage import (
    OUTAGE_TIMEOUT,
    assert_fails_fast,
    assert_pause_fails_fast_and_backend_recovers,
    short_timeout_backend,
)
from torus_core.testing.services import EtcdServer, etcd_service

pytestmark = pytest.mark.needs_etcd


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    with etcd_service() as srv:
        yield srv


@pytest.fixture
def backend(server: EtcdServer) -> Iterator[EtcdBackend]:
    with short_timeout_backend(EtcdBackend, server.url) as b:
        yield b


_fails_fast = functools.partial(assert_fails_fast, backend="etcd")


def test_paused_server_makes_every_call_fail_fast_and_the_same_backend_recovers(
    server: EtcdServer, backend: EtcdBackend
) -> None:
    # The timed-out batch may or may not have committed; retrying it is safe either way.
    reads = [lambda: backend.log.read_all(), lambda: backend.log.wait_for_events(0, 0.5)]
    assert_pause_fails_fast_and_backend_recovers(server, backend, "etcd", reads)


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
    b = EtcdBackend.from_url(f"etcd://{dead},{server.endpoint}?timeout={OUTAGE_TIMEOUT}")
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


def test_a_call_that_finds_etcd_not_yet_reachable_retries_within_its_budget(server: EtcdServer) -> None:
    """A connection that fails (refused here; "timed out before receiving SETTINGS frame" on a busy
    machine) is retried while the call's budget lasts, instead of failing the first time."""
    import socket
    import threading

    from torus_core.testing.services import free_port

    port = free_port()
    target = server.endpoint.rsplit(":", 1)
    stop = threading.Event()

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            b.close()

    def forward() -> None:
        time.sleep(0.4)  # nothing listens for the first 0.4 s: connections are refused
        with socket.create_server(("127.0.0.1", port)) as lsock:
            lsock.settimeout(0.2)
            while not stop.is_set():
                try:
                    c, _ = lsock.accept()
                except TimeoutError:
                    continue
                u = socket.create_connection((target[0], int(target[1])), timeout=5)
                for a, b in ((c, u), (u, c)):
                    threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    t = threading.Thread(target=forward, daemon=True)
    t.start()
    b = EtcdBackend.from_url(f"etcd://127.0.0.1:{port}?timeout=5")
    try:
        t0 = time.monotonic()
        assert b.log.append([ev("late", 1)]) == [1]
        assert time.monotonic() - t0 < 5.0
    finally:
        b.close()
        stop.set()
        t.join(5)
