"""Running a :class:`~torus_core.daemon.server.Server` from a command (``torusd``, ``torusblk``).

:func:`check_tls_options` validates the NBD TLS flags, :func:`serve_nbd` starts an NBD listener
and prints its ``NBD LISTENING host:port`` line, :func:`serve_metrics` starts the
``/metrics`` + ``/healthz`` endpoint and prints ``HTTP LISTENING host:port``,
:func:`serve_until_signalled` starts the
listeners (closing the server if that fails) and blocks until SIGTERM/SIGINT.

Shutdown is bounded: the server closes (volumes folded in and unlocked) in a helper thread,
and if that has not finished within ``--shutdown-timeout`` seconds (a peer or the metadata
store not answering), or a second SIGTERM/SIGINT arrives, the process logs what it gave up on
and exits with status 1 at once. Flushed writes are durable in the journal by then, so the
next start replays them; volume locks free themselves when their lease expires.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import click

from torus_core.daemon.server import Server, parse_listen, tls_context
from torus_core.errors import UsageError


def check_tls_options(tls_cert: str | None, tls_key: str | None, require_tls: bool) -> None:
    """UsageError unless ``--tls-cert``/``--tls-key`` come together and ``--require-tls`` has them."""
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if require_tls and not tls_cert:
        raise UsageError("--require-tls needs --tls-cert and --tls-key")


def serve_nbd(
    server: Server,
    listen: str,
    tls_cert: str | None,
    tls_key: str | None,
    require_tls: bool,
    ca_file: str | None,
) -> None:
    """Serve ``server``'s volumes over NBD on ``listen`` (HOST:PORT) and print ``NBD LISTENING``."""
    host, port = parse_listen(listen)
    tls = tls_context(tls_cert, tls_key, ca_file) if tls_cert and tls_key else None
    nbd = server.serve_nbd(host, port, tls=tls, tls_required=require_tls)
    click.echo(f"NBD LISTENING {host}:{nbd.port}")


def metrics_address(metrics: str | None, host: str | None = None, port: int = 4321) -> str | None:
    """The ``--metrics HOST:PORT`` address, also accepting the older ``--host H --port P``.

    Raises UsageError for both spellings at once or a malformed address (before anything opens).
    """
    if metrics and host:
        raise UsageError("give either --metrics HOST:PORT or --host/--port, not both")
    if host:
        metrics = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if metrics:
        parse_listen(metrics, default_port=4321)
    return metrics


def serve_metrics(server: Server, listen: str) -> None:
    """Serve ``/metrics`` and ``/healthz`` on ``listen`` (HOST:PORT) and print ``HTTP LISTENING``."""
    host, port = parse_listen(listen, default_port=4321)
    http = server.serve_metrics(host, port)
    click.echo(f"HTTP LISTENING {host}:{http.port}")


#: Seconds a graceful shutdown may take before the process exits without finishing it.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
#: Exit status of a shutdown that ran out of time (or was cut short by a second signal).
FORCED_EXIT_STATUS = 1

log = logging.getLogger("torusd")


def shutdown_timeout_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--shutdown-timeout SECONDS`` option (validated by :func:`check_shutdown_timeout`)."""
    return click.option(
        "--shutdown-timeout",
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        show_default=True,
        type=float,
        help="Longest a graceful shutdown (SIGTERM/SIGINT) may take before the process exits anyway (s).",
    )(fn)


def check_shutdown_timeout(seconds: float) -> float:
    """UsageError unless ``seconds`` is a positive, finite number."""
    if not 0 < seconds < float("inf"):
        raise UsageError(f"--shutdown-timeout must be a positive number of seconds, got {seconds!r}")
    return seconds


def run_until_signalled(
    server: Server,
    stop: threading.Event | None = None,
    *,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Block until SIGTERM/SIGINT (or ``stop``), then close ``server`` gracefully, within
    ``shutdown_timeout`` seconds: past it, or at a second signal, the process exits with
    ``FORCED_EXIT_STATUS`` (see the module docstring)."""
    event = stop or threading.Event()
    signals: list[int] = []

    def _handler(signum: int, _frame: Any) -> None:
        signals.append(signum)
        if len(signals) == 1:
            log.info("signal %d: shutting down (at most %gs)", signum, shutdown_timeout)
        event.set()

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not event.wait(1.0):
            pass
    finally:
        try:
            _close_bounded(server, shutdown_timeout, signals)
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _close_bounded(server: Server, timeout: float, signals: list[int]) -> None:
    """Close ``server`` in a helper thread; exit the process if that outlasts ``timeout`` or
    another signal arrives meanwhile."""
    done = threading.Event()
    failure: list[BaseException] = []

    def close() -> None:
        try:
            server.close()
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
        finally:
            done.set()

    seen = len(signals)
    threading.Thread(target=close, name="torus-shutdown", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(0.1):
        if len(signals) > max(seen, 1) or time.monotonic() >= deadline:
            why = "a second signal" if len(signals) > max(seen, 1) else f"{timeout:g}s"
            log.error(
                "shutdown did not finish (%s): exiting without it; flushed writes are in the "
                "journal and replayed at the next start, volume locks expire with their lease",
                why,
            )
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(FORCED_EXIT_STATUS)
    if failure:
        raise failure[0]


def serve_until_signalled(
    server: Server, start: Callable[[], None], *, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
) -> None:
    """Run ``start()`` (the listeners; ``server`` is closed if it fails), flush stdout, then
    :func:`run_until_signalled`."""
    try:
        start()
        sys.stdout.flush()
    except BaseException:
        server.close()
        raise
    run_until_signalled(server, shutdown_timeout=shutdown_timeout)
