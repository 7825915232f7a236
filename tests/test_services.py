"""The test-service helpers: real etcd and redis-server started, signalled and stopped by PID."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request

import pytest

from torus_core.testing.services import (
    EtcdServer,
    RedisServer,
    ServiceError,
    _require_binary,
    _stop_process,
    etcd_service,
    free_port,
    redis_service,
)


def _ping_redis(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_missing_binary_raises_a_clear_service_error() -> None:
    with pytest.raises(ServiceError, match="not installed"):
        _require_binary("torus-no-such-server-binary")


def test_redis_service_answers_pauses_resumes_and_is_reaped_on_exit() -> None:
    with redis_service() as srv:
        pid = srv.pid
        assert pid is not None and _ping_redis(srv.port)
        srv.pause()
        for _ in range(100):  # SIGSTOP is delivered asynchronously; bounded wait for state T
            if _proc_state(pid) == "T":
                break
            time.sleep(0.02)
        assert _proc_state(pid) == "T"
        assert not _ping_redis(srv.port, timeout=0.3)
        srv.resume()
        assert _ping_redis(srv.port)
        srv.kill()
        assert srv.pid is None and not _ping_redis(srv.port)
        srv.restart()
        assert srv.pid is not None and srv.pid != pid and _ping_redis(srv.port)
        last = srv.pid
    assert _proc_state(last) is None  # stopped and reaped, not a zombie


def test_etcd_service_is_healthy_on_loopback_and_keeps_its_data_dir_across_restart() -> None:
    with etcd_service() as srv:
        assert srv.endpoint.startswith("127.0.0.1:")
        with urllib.request.urlopen(f"http://{srv.endpoint}/health", timeout=2) as r:
            assert b"true" in r.read()
        data_dir = srv.workdir / "data"
        assert data_dir.is_dir()
        srv.kill()
        srv.restart()
        assert data_dir.is_dir()
        with urllib.request.urlopen(f"http://{srv.endpoint}/health", timeout=2) as r:
            assert b"true" in r.read()
        pid = srv.pid
        assert pid is not None
    assert _proc_state(pid) is None


def test_stop_escalates_to_sigkill_for_a_process_ignoring_sigterm() -> None:
    import subprocess
    import sys

    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    _stop_process(proc, timeout=0.5)
    assert proc.returncode == -signal.SIGKILL
    assert _proc_state(proc.pid) is None


def test_session_fixtures_provide_live_servers(etcd_server: EtcdServer, redis_server: RedisServer) -> None:
    assert _ping_redis(redis_server.port) or redis_server.external
    with urllib.request.urlopen(f"http://{etcd_server.endpoint}/health", timeout=2) as r:
        assert b"true" in r.read()
