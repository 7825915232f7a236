"""The metrics and health HTTP endpoint of the daemons (``--metrics HOST:PORT``).

``GET /metrics`` returns the Prometheus text exposition of a prometheus_client registry (see
:mod:`torus_core.metrics`). ``GET /healthz`` returns ``200 ok`` when every readiness check
passes, else ``503`` with one ``not ready: <reason>`` line per failing check. Checks must be
cheap and never block: slow dependencies are probed in the background by a
:class:`BackgroundProbe` whose cached answer the check reads. Binds 127.0.0.1 unless told
otherwise; serves from daemon threads, one per connection, bounded: a connection that sends
nothing for ``timeout`` seconds is closed, and beyond ``max_connections`` at once a newcomer gets
``503`` and is closed without a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from torus_core.errors import ConfigError, InvalidArgument

log = logging.getLogger(__name__)

#: Seconds an HTTP connection may stay silent (idle keep-alive, slow request) before it is closed.
DEFAULT_TIMEOUT = 10.0
#: Connections served at once (one thread each); more are answered 503 and closed.
DEFAULT_MAX_CONNECTIONS = 32


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with at most ``max_connections`` handler threads at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        self.max_connections = max_connections
        self._active = 0
        self._lock = threading.Lock()
        super().__init__(address, handler)

    @property
    def active(self) -> int:
        """Connections being served now."""
        return self._active

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a handler thread, or answer 503 and close when the cap is reached."""
        with self._lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            log.debug("metrics endpoint: refusing %s, %d connections open", client_address, self._active)
            body = f"too many connections (the limit is {self.max_connections})\n".encode()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            try:
                request.settimeout(1.0)
                request.sendall(head + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                self._active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._active -= 1


#: A readiness check: ``(ready, reason)``; the reason is shown when not ready.
HealthCheck = Callable[[], tuple[bool, str]]


class BackgroundProbe:
    """Calls ``probe()`` every ``interval`` seconds in a daemon thread and caches the outcome.

    :meth:`status` is healthy only if the last call succeeded **and** a call succeeded within
    ``interval + timeout`` seconds: a call that hangs (a SIGSTOPped etcd) turns the probe
    unhealthy after ``timeout`` without the reader ever waiting for it.

    :param what: what is probed, for the reasons (``"metadata backend"``).
    :param probe: the cheap call to make (its result is ignored; raising means unreachable).
    :param interval: seconds between calls.
    :param timeout: seconds a call may take before the probe reports unhealthy.
    """

    def __init__(
        self, what: str, probe: Callable[[], object], *, interval: float = 1.0, timeout: float = 2.0
    ) -> None:
        self.what = what
        self.probe = probe
        self.interval = float(interval)
        self.timeout = float(timeout)
        self._last_ok: float | None = None
        self._error: str | None = None
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe-{what}", daemon=True)

    def start(self) -> BackgroundProbe:
        """Start probing (the first call happens at once)."""
        self._started = time.monotonic()
        self._thread.start()
        return self

    def probe_once(self) -> None:
        """One call, recording the outcome (also what the thread loops over)."""
        try:
            self.probe()
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.debug("%s probe failed: %s", self.what, self._error)
        else:
            self._last_ok = time.monotonic()
            self._error = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probe_once()
            self._stop.wait(self.interval)

    def status(self) -> tuple[bool, str]:
        """``(healthy, reason)`` from the cached outcome; never blocks."""
        now = time.monotonic()
        limit = self.interval + self.timeout
        if self._last_ok is None:
            if self._error is not None:
                return False, f"{self.what} unreachable: {self._error}"
            if now - self._started > limit:
                return False, f"{self.what} did not answer for {now - self._started:.1f} s"
            return False, f"{self.what} not probed yet"
        if self._error is not None:
            return False, f"{self.what} unreachable: {self._error}"
        age = now - self._last_ok
        if age > limit:
            return False, f"{self.what} did not answer for {age:.1f} s (limit {limit:.1f} s)"
        return True, ""

    @property
    def healthy(self) -> bool:
        """Shorthand for ``status()[0]``."""
        return self.status()[0]

    def stop(self, timeout: float = 2.0) -> None:
        """Stop probing (a call in progress is left to finish in its daemon thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


def run_checks(checks: Sequence[HealthCheck]) -> tuple[bool, list[str]]:
    """Run every check; ``(all ready, reasons of the failing ones)``. A check that raises fails."""
    reasons: list[str] = []
    for check in checks:
        try:
            ok, reason = check()
        except Exception as exc:
            ok, reason = False, f"health check failed: {exc!r}"
        if not ok:
            reasons.append(reason or "not ready")
    return not reasons, reasons


class MetricsServer:
    """Serves ``/metrics`` (``registry``) and ``/healthz`` (``checks``) from daemon threads.

    :param registry: what ``/metrics`` exposes.
    :param checks: readiness checks (none: always ready).
    :param host: bind address (loopback by default).
    :param port: TCP port (0 picks a free one; see :attr:`port`).
    :param timeout: seconds a connection may stay silent before it is closed.
    :param max_connections: connections served at once; more get ``503`` and are closed.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        checks: Sequence[HealthCheck] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not timeout > 0:
            raise InvalidArgument(f"HTTP timeout must be positive, not {timeout!r}")
        if max_connections < 1:
            raise InvalidArgument(f"HTTP max_connections must be at least 1, not {max_connections!r}")
        self.registry = registry
        self.checks = list(checks)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        data, status = generate_latest(outer.registry), 200
                    except Exception as exc:  # report, don't crash the endpoint
                        log.exception("collecting metrics failed")
                        data, status = f"# error collecting metrics: {exc}\n".encode(), 500
                    self._reply(status, CONTENT_TYPE_LATEST, data)
                elif path == "/healthz":
                    ready, reasons = outer.health()
                    body = "ok\n" if ready else "".join(f"not ready: {r}\n" for r in reasons)
                    self._reply(200 if ready else 503, "text/plain; charset=utf-8", body.encode())
                else:
                    self._reply(404, "text/plain; charset=utf-8", b"not found\n")

            def _reply(self, status: int, ctype: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http: " + format, *args)

        Handler.timeout = timeout
        try:
            self._httpd = _BoundedHTTPServer((host, port), Handler, max_connections)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for /metrics: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="torus-http", daemon=True)

    def health(self) -> tuple[bool, list[str]]:
        """What ``/healthz`` answers: ``(ready, reasons)``."""
        return run_checks(self.checks)

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._httpd.server_address[1])

    def start(self) -> MetricsServer:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (bounded)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout)
        self._httpd.server_close()
