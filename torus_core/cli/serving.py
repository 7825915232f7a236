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

import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from torus_core.daemon.health import DiskSpaceCheck, DiskSpaceCollector
from torus_core.daemon.server import Server, parse_listen, tls_context, warn_if_plaintext
from torus_core.errors import InvalidArgument, UsageError
from torus_core.nbd.session import ServerOptions
from torus_core.units import format_size, parse_size


def check_tls_options(tls_cert: str | None, tls_key: str | None, require_tls: bool) -> None:
    """UsageError unless ``--tls-cert``/``--tls-key`` come together and ``--require-tls`` has them."""
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if require_tls and not tls_cert:
        raise UsageError("--require-tls needs --tls-cert and --tls-key")


F = TypeVar("F", bound=Callable[..., Any])


def nbd_limit_options(func: F) -> F:
    """The NBD listener's abuse limits as options; the command receives ``nbd_limits``, a dict
    of :class:`~torus_core.nbd.session.ServerOptions` fields for :func:`serve_nbd`."""
    defaults = ServerOptions()
    options = [
        click.option(
            "--nbd-handshake-timeout",
            default=defaults.handshake_timeout,
            show_default=True,
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds an NBD client has to finish the handshake.",
        ),
        click.option(
            "--nbd-idle-timeout",
            default=defaults.idle_timeout,
            show_default=True,
            type=click.FloatRange(min=0),
            help="An NBD session with no I/O for this many seconds may be closed when a new "
            "connection needs its slot (0: never).",
        ),
        click.option(
            "--nbd-max-connections",
            default=defaults.max_connections,
            show_default=True,
            type=click.IntRange(min=1),
            help="NBD connections served at once; more are refused with a reason.",
        ),
        click.option(
            "--nbd-max-connections-per-address",
            default=defaults.max_connections_per_address,
            show_default=True,
            type=click.IntRange(min=0),
            help="NBD connections served at once from one client address (0: no limit).",
        ),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["nbd_limits"] = {
            "handshake_timeout": kwargs.pop("nbd_handshake_timeout"),
            "idle_timeout": kwargs.pop("nbd_idle_timeout"),
            "max_connections": kwargs.pop("nbd_max_connections"),
            "max_connections_per_address": kwargs.pop("nbd_max_connections_per_address"),
        }
        return func(*args, **kwargs)

    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


#: The largest ``--size`` a server accepts: 2**63 - 1 bytes, what a file offset can address.
MAX_STORAGE_SIZE = (1 << 63) - 1


def check_storage_size(size: int) -> None:
    """UsageError unless the local store's capacity (``--size``) is positive and addressable."""
    if size <= 0:
        raise UsageError(f"--size must be greater than 0, got {size}")
    if size > MAX_STORAGE_SIZE:
        raise UsageError(
            f"--size {format_size(size)} is larger than a file can be ({MAX_STORAGE_SIZE} bytes)"
        )


def check_listen(flag: str, listen: str | None) -> None:
    """UsageError if ``listen`` (HOST:PORT of ``flag``) is malformed."""
    if listen is None:
        return
    try:
        parse_listen(listen)
    except InvalidArgument as exc:
        raise UsageError(f"{flag}: {exc}") from None


def parse_min_free_space(text: str) -> int:
    """``--min-free-space SIZE`` in bytes; UsageError if it is not a size."""
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise UsageError(f"--min-free-space: {exc}") from None


def watch_disk(server: Server, data_dir: str, min_free_bytes: int) -> None:
    """Make ``/healthz`` report the data dir's disk (:class:`DiskSpaceCheck`) when ``server``
    keeps data there (a persistent store); the check stops with the server."""
    if server.journal_store is None:  # no persistent store: nothing of ours on that disk
        return
    exports = server.exports
    disk = DiskSpaceCheck(data_dir, min_free_bytes=min_free_bytes, guard=lambda: exports.space)
    server.add_health_check(disk.start())
    server.add_collector(DiskSpaceCollector(disk))
    server.add_stopper(disk.stop)


#: ``--min-free-space`` option of the serving commands.
min_free_space_option = click.option(
    "--min-free-space",
    default="128MiB",
    show_default=True,
    metavar="SIZE",
    help="/healthz is not ready while the data dir's file system has less free space (0: off).",
)


def serve_nbd(
    server: Server,
    listen: str,
    tls_cert: str | None,
    tls_key: str | None,
    require_tls: bool,
    ca_file: str | None,
    limits: dict[str, Any] | None = None,
) -> None:
    """Serve ``server``'s volumes over NBD on ``listen`` (HOST:PORT) and print ``NBD LISTENING``.

    ``limits``: :class:`~torus_core.nbd.session.ServerOptions` fields (see
    :func:`nbd_limit_options`)."""
    host, port = parse_listen(listen)
    tls = tls_context(tls_cert, tls_key, ca_file) if tls_cert and tls_key else None
    warn_if_plaintext("NBD", host, tls is not None)
    nbd = server.serve_nbd(host, port, tls=tls, tls_required=require_tls, **(limits or {}))
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
    warn_if_plaintext("/metrics and /healthz", host, False)
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
