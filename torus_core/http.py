"""A small HTTP endpoint for metrics and health (``torusd --host H --port P``).

``GET /metrics`` returns Prometheus text: the gauges supplied by a ``collect()`` callback
(``{name: value}`` or ``{name: [(labels, value), ...]}``), followed by prometheus_client's
default registry (process metrics) when that library is installed. ``GET /healthz`` returns
``ok``. Binds 127.0.0.1 unless told otherwise; runs in a daemon thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

Labels = Mapping[str, str]
MetricValue = float | int | Sequence[tuple[Labels, float | int]]
Collector = Callable[[], Mapping[str, MetricValue]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(values: Mapping[str, MetricValue]) -> str:
    """Prometheus text exposition of gauges."""
    lines: list[str] = []
    for name in sorted(values):
        value = values[name]
        lines.append(f"# TYPE {name} gauge")
        if isinstance(value, int | float):
            lines.append(f"{name} {value}")
            continue
        for labels, v in value:
            body = ",".join(f'{k}="{_escape(str(lv))}"' for k, lv in sorted(labels.items()))
            lines.append(f"{name}{{{body}}} {v}")
    return "\n".join(lines) + "\n"


def _client_metrics() -> str:
    try:
        from prometheus_client import REGISTRY, generate_latest
    except ImportError:
        return ""
    return generate_latest(REGISTRY).decode("utf-8")


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` from a daemon thread."""

    def __init__(self, collect: Collector, host: str = "127.0.0.1", port: int = 4321) -> None:
        self.collect = collect
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = render_metrics(outer.collect()) + _client_metrics()
                        status = 200
                    except Exception as exc:  # report, don't crash the endpoint
                        body, status = f"# error collecting metrics: {exc}\n", 500
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/healthz":
                    body, status, ctype = "ok\n", 200, "text/plain; charset=utf-8"
                else:
                    body, status, ctype = "not found\n", 404, "text/plain; charset=utf-8"
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http: " + format, *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="torus-http", daemon=True)

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
