"""Real etcd and Redis servers on loopback for tests and benchmarks.

:func:`start_etcd` / :func:`start_redis` launch a private server (temporary data dir, free
127.0.0.1 ports) and return a handle that is stopped by PID: SIGTERM, a bounded wait, then
SIGKILL, always reaped with :meth:`subprocess.Popen.wait`. Handles offer ``pause()`` /
``resume()`` (SIGSTOP / SIGCONT), ``kill()`` and ``restart()`` for outage tests; an etcd restart
reuses its data dir and ports, a Redis restart comes back empty (no persistence).

The pytest fixtures ``etcd_server`` and ``redis_server`` (session scoped) are exported through
:mod:`torus_core.testing.pytest_plugin`. A missing binary makes the fixture **fail** with a
clear message; nothing is skipped. ``TORUS_TEST_ETCD_ENDPOINTS=host:port[,...]`` and
``TORUS_TEST_REDIS_URL=redis://...`` point the fixtures at external servers instead (those
handles cannot pause/kill).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

#: Seconds a server gets to become ready before start-up is declared failed.
READY_TIMEOUT = 15.0
#: Seconds a server gets to exit after SIGTERM before it is SIGKILLed.
STOP_TIMEOUT = 5.0


class ServiceError(RuntimeError):
    """A test service could not be started, or its binary is missing."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        raise ServiceError(
            f"{name!r} is not installed (not on PATH nor in /usr/bin); install it "
            f"(Debian: apt-get install {'etcd-server' if name == 'etcd' else 'redis-server'}) "
            f"or point the tests at a running server with "
            f"{'TORUS_TEST_ETCD_ENDPOINTS' if name == 'etcd' else 'TORUS_TEST_REDIS_URL'}"
        )
    return path


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``proc`` (continuing it first if stopped), wait boundedly, then SIGKILL; always reap."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@dataclass
class ServerProcess:
    """A server started by this module; the base of :class:`EtcdServer` and :class:`RedisServer`."""

    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    external: bool = False
    _log: object | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        """PID of the running server process (``None`` when external or stopped)."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _require_own(self) -> subprocess.Popen[bytes]:
        if self.external or self.proc is None:
            raise ServiceError("this server was not started by the test services; cannot signal it")
        return self.proc

    def start(self) -> None:
        """Launch the server and wait (bounded) until it answers its readiness probe."""
        if self.external:
            return
        log = open(self.workdir / "server.log", "ab")
        self._log = log
        self.proc = subprocess.Popen(
            self._command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.workdir / "server.log").read_text(errors="replace")[-2000:]
                raise ServiceError(f"{self._command()[0]} exited with {self.proc.returncode}: {tail}")
            if self._ready():
                return
            time.sleep(0.02)
        _stop_process(self.proc)
        raise ServiceError(f"{self._command()[0]} not ready within {READY_TIMEOUT}s")

    def stop(self) -> None:
        """Stop the server by PID (SIGTERM, bounded wait, SIGKILL) and reap it."""
        if self.proc is not None:
            _stop_process(self.proc)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        os.kill(self._require_own().pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze a paused server (SIGCONT)."""
        os.kill(self._require_own().pid, signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Context manager: the server is paused (SIGSTOP) while entered, resumed on exit."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def kill(self) -> None:
        """SIGKILL the server and reap it (a crash: no clean shutdown)."""
        proc = self._require_own()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Start the server again on the same ports and data dir after :meth:`kill`/:meth:`stop`."""
        self._require_own()
        self.stop()
        self.start()


S = TypeVar("S", bound=ServerProcess)


@dataclass(frozen=True)
class ServerTLS:
    """TLS settings of a test server (PEM paths), e.g. from :func:`torus_core.testing.rpc.make_test_pki`.

    ``cert_file``/``key_file`` are the server's pair, ``ca_file`` the CA that signed it and that
    client certificates must chain to when ``require_client_cert`` is set. The readiness probe
    presents ``client_cert_file``/``client_key_file`` (needed with ``require_client_cert``).
    """

    ca_file: str
    cert_file: str
    key_file: str
    client_cert_file: str | None = None
    client_key_file: str | None = None
    require_client_cert: bool = True

    def probe_context(self) -> ssl.SSLContext:
        """A client SSL context trusting ``ca_file`` and presenting the client pair, if any."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert_file and self.client_key_file:
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx


@dataclass
class EtcdServer(ServerProcess):
    """A single-node etcd on loopback with fast raft timing."""

    client_port: int = 0
    peer_port: int = 0
    host: str = "127.0.0.1"
    extra_args: tuple[str, ...] = ()
    external_endpoints: str | None = None
    tls: ServerTLS | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client URL."""
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        """The torus metadata URL (``etcd://host:port``)."""
        return f"etcd://{self.external_endpoints or self.endpoint}"

    def _command(self) -> list[str]:
        scheme = "https" if self.tls is not None else "http"
        client = f"{scheme}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls_args: list[str] = []
        if self.tls is not None:
            tls_args = [
                f"--cert-file={self.tls.cert_file}",
                f"--key-file={self.tls.key_file}",
                f"--trusted-ca-file={self.tls.ca_file}",
            ]
            if self.tls.require_client_cert:
                tls_args.append("--client-cert-auth")
        return [
            _require_binary("etcd"),
            "--name=torus-test",
            f"--data-dir={self.workdir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=torus-test={peer}",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            *tls_args,
            *self.extra_args,
        ]

    def _ready(self) -> bool:
        scheme = "https" if self.tls is not None else "http"
        ctx = self.tls.probe_context() if self.tls is not None else None
        try:
            with urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{self.client_port}/health", timeout=0.5, context=ctx
            ) as r:
                return b"true" in r.read()
        except (OSError, urllib.error.URLError):
            return False


@dataclass
class RedisServer(ServerProcess):
    """A redis-server on loopback without persistence."""

    port: int = 0
    host: str = "127.0.0.1"
    external_url: str | None = None
    extra_args: tuple[str, ...] = ()
    tls: ServerTLS | None = None

    @property
    def url(self) -> str:
        """The torus metadata URL (``redis://127.0.0.1:PORT/0``; ``rediss://`` with :attr:`tls`)."""
        scheme = "rediss" if self.tls is not None else "redis"
        return self.external_url or f"{scheme}://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            ports = [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", self.tls.cert_file, "--tls-key-file", self.tls.key_file,
                "--tls-ca-cert-file", self.tls.ca_file,
                "--tls-auth-clients", "yes" if self.tls.require_client_cert else "no",
            ]  # fmt: skip
        return [
            _require_binary("redis-server"),
            *ports,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra_args,
        ]

    def _ready(self) -> bool:
        # A server with requirepass answers -NOAUTH to an unauthenticated PING: it is up all the same.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                s = raw
                if self.tls is not None:
                    s = self.tls.probe_context().wrap_socket(raw, server_hostname="127.0.0.1")
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


def start_etcd(
    workdir: Path | None = None, extra_args: tuple[str, ...] = (), tls: ServerTLS | None = None
) -> EtcdServer:
    """Start a private etcd (https client URL with ``tls``); the caller must stop it."""
    wd = workdir or Path(tempfile.mkdtemp(prefix="torus-etcd-"))
    server = EtcdServer(
        workdir=wd, client_port=free_port(), peer_port=free_port(), extra_args=tuple(extra_args), tls=tls
    )
    server.start()
    return server


def start_redis(
    workdir: Path | None = None, extra_args: tuple[str, ...] = (), tls: ServerTLS | None = None
) -> RedisServer:
    """Start a private redis-server (TLS-only port with ``tls``); the caller must stop it."""
    wd = workdir or Path(tempfile.mkdtemp(prefix="torus-redis-"))
    server = RedisServer(workdir=wd, port=free_port(), extra_args=tuple(extra_args), tls=tls)
    server.start()
    return server


@contextlib.contextmanager
def _private_service(server: S) -> Iterator[S]:
    """Start ``server``; on exit stop it by PID and remove its work dir."""
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@contextlib.contextmanager
def etcd_service(extra_args: tuple[str, ...] = (), tls: ServerTLS | None = None) -> Iterator[EtcdServer]:
    """Context manager: a private etcd, stopped by PID and its data dir removed on exit."""
    wd = Path(tempfile.mkdtemp(prefix="torus-etcd-"))
    server = EtcdServer(
        workdir=wd, client_port=free_port(), peer_port=free_port(), extra_args=extra_args, tls=tls
    )
    with _private_service(server):
        yield server


@contextlib.contextmanager
def redis_service(extra_args: tuple[str, ...] = (), tls: ServerTLS | None = None) -> Iterator[RedisServer]:
    """Context manager: a private redis-server, stopped by PID and its dir removed on exit."""
    wd = Path(tempfile.mkdtemp(prefix="torus-redis-"))
    server = RedisServer(workdir=wd, port=free_port(), extra_args=extra_args, tls=tls)
    with _private_service(server) as server:
        yield server


def _external_etcd() -> EtcdServer | None:
    spec = os.environ.get("TORUS_TEST_ETCD_ENDPOINTS")
    if not spec:
        return None
    host, _, port = spec.split(",")[0].rpartition(":")
    return EtcdServer(
        workdir=Path(tempfile.gettempdir()),
        external=True,
        host=host,
        client_port=int(port),
        external_endpoints=spec,
    )


def _external_redis() -> RedisServer | None:
    url = os.environ.get("TORUS_TEST_REDIS_URL")
    if not url:
        return None
    return RedisServer(workdir=Path(tempfile.gettempdir()), external=True, external_url=url)


def _session_server(
    external: S | None, service: Callable[[], contextlib.AbstractContextManager[S]], what: str
) -> Iterator[S]:
    """Yield ``external`` if set, else a server from ``service()`` (a failed start fails the test)."""
    if external is not None:
        yield external
        return
    try:
        cm = service()
        server = cm.__enter__()
    except ServiceError as exc:
        pytest.fail(f"cannot start {what} for the tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A session-wide etcd on loopback (or ``TORUS_TEST_ETCD_ENDPOINTS``); fails if etcd is missing."""
    yield from _session_server(_external_etcd(), etcd_service, "etcd")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A session-wide redis-server on loopback (or ``TORUS_TEST_REDIS_URL``); fails if missing."""
    yield from _session_server(_external_redis(), redis_service, "redis-server")
