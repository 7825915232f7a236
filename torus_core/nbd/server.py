"""The asyncio NBD server: accepts connections, runs the handshake, then serves transmission.

Usage in-process::

    server = NBDServer(provider, port=0)
    await server.start()          # server.port is the bound port
    await server.serve_forever()  # or: await server.close()

or from synchronous code (tests, CLIs) with :class:`ServerThread`.

Admission and limits (see :class:`~torus_core.nbd.session.ServerOptions` for the numbers): at
most ``max_connections`` connections, and ``max_connections_per_address`` from one client
address, are admitted. A connection beyond a limit still gets the greeting, and every option it
sends is answered with ``NBD_REP_ERR_POLICY`` carrying the reason (``NBD_OPT_EXPORT_NAME``, which
cannot carry an error, is answered by closing), for at most :data:`REFUSE_TIMEOUT` seconds and
:data:`REFUSE_OPTIONS` options; at most :data:`MAX_REFUSING` such refusals run at once (a new
one closes the oldest, so a flood of silent sockets cannot keep a newcomer from its reason).
The handshake of an admitted connection is bounded by
``handshake_timeout``. An established session is never closed for being idle on its own (a
kernel NBD client or a VM disk may go hours without I/O, and a dropped connection is an I/O error
for it); only when a new connection would be refused by a limit, the longest-idle session in that
limit's scope with no request in flight and no traffic for ``idle_timeout`` is closed to make
room, so idle sockets cannot lock clients out for longer than that. A new connection costs a
small receive buffer only; the full one is
allocated when its session starts, and what all sessions hold is bounded by a
:class:`~torus_core.nbd.budget.ByteBudget`. After connections close the server gives free heap
memory back to the kernel (:func:`~torus_core.nbd.budget.release_free_memory`, at most once per
:data:`TRIM_INTERVAL`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torus_core.errors import ConfigError, InvalidArgument, ProtocolError, TorusError
from torus_core.nbd.budget import ByteBudget, release_free_memory
from torus_core.nbd.export import ExportProvider
from torus_core.nbd.handshake import REFUSE_OPTIONS, Negotiator
from torus_core.nbd.logs import RateLimitFilter
from torus_core.nbd.session import ServerOptions
from torus_core.nbd.stream import TRANSPORT_HIGH, BufferedStream, ConnectionClosed
from torus_core.nbd.transmission import Transmission
from torus_core.nbd.workers import WorkerPool

log = logging.getLogger(__name__)
RateLimitFilter.install(log)

#: Seconds a refused connection is given to read its refusal.
REFUSE_TIMEOUT = 5.0
#: Refusals in progress at once; a new one closes the oldest.
MAX_REFUSING = 64
#: Least seconds between two heap releases after connections closed.
TRIM_INTERVAL = 1.0


class NBDServer:
    """A fixed-newstyle NBD server for the exports of an :class:`ExportProvider`.

    Listens on 127.0.0.1 by default; ``port=0`` picks a free port (see :attr:`port`). Other
    keyword arguments are the fields of :class:`ServerOptions`.
    """

    def __init__(
        self,
        provider: ExportProvider,
        host: str = "127.0.0.1",
        port: int = 10809,
        *,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        handshake_timeout: float = 10.0,
        max_connections: int = 64,
        max_payload: int = 32 * 1024 * 1024,
        **more: Any,
    ) -> None:
        if tls_required and tls is None:
            raise InvalidArgument("tls_required needs a TLS context")
        if max_payload < 512:
            raise InvalidArgument("max_payload must be at least 512 bytes")
        self.provider = provider
        self.host = host
        self._port = port
        self.options = ServerOptions(
            tls=tls,
            tls_required=tls_required,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            max_payload=max_payload,
            **more,
        )
        if self.options.max_inflight_bytes < max_payload:
            raise InvalidArgument("max_inflight_bytes must be at least max_payload")
        if self.options.max_total_inflight_bytes < self.options.max_inflight_bytes:
            raise InvalidArgument("max_total_inflight_bytes must be at least max_inflight_bytes")
        if not self.options.handshake_timeout > 0:
            raise InvalidArgument("handshake_timeout must be positive")
        if self.options.idle_timeout < 0:
            raise InvalidArgument("idle_timeout must not be negative (0: never)")
        if self.options.max_connections < 1 or self.options.max_connections_per_address < 0:
            raise InvalidArgument(
                "max_connections must be at least 1, max_connections_per_address at least 0"
            )
        workers = self.options.workers or min(32, (os.cpu_count() or 1) + 4)
        # Control calls (open/describe/close/list) and data calls of blocking exports.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nbd-ctl")
        self._workers = WorkerPool(workers)
        self._server: asyncio.Server | None = None
        self._streams: set[BufferedStream] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._admitted = 0
        self._per_address: Counter[str] = Counter()
        self._refusing: dict[BufferedStream, None] = {}  # oldest first
        self._sessions: dict[BufferedStream, tuple[str, Transmission]] = {}
        self.budget = ByteBudget(self.options.max_total_inflight_bytes)
        self._trim_at = 0.0
        self._trim_handle: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self._port

    @property
    def connections(self) -> int:
        """Number of open client connections (admitted or being refused)."""
        return len(self._streams)

    @property
    def admitted(self) -> int:
        """Number of admitted connections (in the handshake or in a session)."""
        return self._admitted

    async def start(self) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._make_stream, self.host, self._port, reuse_address=True
            )
        except OSError as exc:
            where = f"[{self.host}]:{self._port}" if ":" in self.host else f"{self.host}:{self._port}"
            raise ConfigError(f"cannot listen on {where} for NBD: {exc.strerror or exc}") from None
        sock = self._server.sockets[0]
        self._port = sock.getsockname()[1]
        log.info("NBD server listening on %s:%d", self.host, self._port)
        assert REFUSE_OPTIONS > 0

    async def serve_forever(self) -> None:
        """Serve until cancelled or closed."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop listening, disconnect clients, wait (bounded) for their handlers, stop workers."""
        if self._server is not None:
            self._server.close()
        if self._trim_handle is not None:
            self._trim_handle.cancel()
        for stream in list(self._streams):
            stream.close()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
            for t in pending:
                t.cancel()
        self._executor.shutdown(wait=False, cancel_futures=False)
        self._workers.shutdown()

    # --- per connection ---------------------------------------------------------------------

    def _make_stream(self) -> BufferedStream:
        stream = BufferedStream()
        stream.on_made = self._on_connection
        return stream

    def _on_connection(self, stream: BufferedStream) -> None:
        transport = stream.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=TRANSPORT_HIGH)
        opts = self.options
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        refuse = None
        if self._admitted >= opts.max_connections:
            if not self._evict_idle(None):
                refuse = f"too many connections (the limit is {opts.max_connections})"
        elif (
            opts.max_connections_per_address
            and self._per_address[address] >= opts.max_connections_per_address
        ):
            if not self._evict_idle(address):
                refuse = (
                    f"too many connections from {address} "
                    f"(the limit is {opts.max_connections_per_address} per address)"
                )
        if refuse is not None and len(self._refusing) >= MAX_REFUSING:
            oldest = next(iter(self._refusing))
            del self._refusing[oldest]
            oldest.close()
        stream.budget = self.budget
        self._streams.add(stream)
        if refuse is None:
            self._admitted += 1
            self._per_address[address] += 1
        else:
            self._refusing[stream] = None
        task = asyncio.get_running_loop().create_task(self._handle(stream, address, refuse))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _evict_idle(self, address: str | None) -> bool:
        """Close the longest-idle session (of ``address``, or of any address when None) that
        has been idle for at least ``idle_timeout``; True if one was closed."""
        timeout = self.options.idle_timeout
        if timeout <= 0:
            return False
        best: Transmission | None = None
        best_idle = timeout
        for owner, session in self._sessions.values():
            if address is not None and owner != address:
                continue
            idle = session.idle_seconds()
            if idle >= best_idle:
                best, best_idle = session, idle
        if best is None:
            return False
        best.evict(f"idle for {best_idle:.0f} s and its slot is needed by a new connection")
        return True

    async def _handle(self, stream: BufferedStream, address: str, refuse: str | None) -> None:
        opts = self.options
        peer = stream.transport.get_extra_info("peername") if stream.transport else None
        try:
            if refuse is not None:
                log.warning("NBD connection from %s refused: %s", address, refuse)
                negotiator = Negotiator(stream, self.provider, opts, self._executor, refuse)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REFUSE_TIMEOUT):
                        await negotiator.run()
                return
            negotiator = Negotiator(stream, self.provider, opts, self._executor)
            try:
                async with asyncio.timeout(opts.handshake_timeout) as deadline:
                    negotiator.deadline = deadline
                    session = await negotiator.run()
            except TimeoutError:
                log.info("NBD handshake with %s timed out after %.0f s", peer, opts.handshake_timeout)
                return
            if session is None:
                return
            stream.grow()
            transmission = Transmission(stream, session, opts, self._executor, self._workers, self.budget)
            self._sessions[stream] = (address, transmission)
            await transmission.run()
        except (ConnectionClosed, ConnectionError, ssl.SSLError) as e:
            log.debug("NBD connection %s ended: %r", peer, e)
        except ProtocolError as e:
            log.info("NBD protocol violation from %s: %s", peer, e)
            stream.abort()
        except TorusError as e:  # e.g. the final flush at close met a full store: no traceback
            log.error("NBD connection %s ended with an error: %s", peer, e)
        except Exception:
            log.exception("NBD connection %s failed", peer)
        finally:
            stream.close()
            self._streams.discard(stream)
            self._sessions.pop(stream, None)
            if refuse is None:
                self._admitted -= 1
                self._per_address[address] -= 1
                if self._per_address[address] <= 0:
                    del self._per_address[address]
            else:
                self._refusing.pop(stream, None)
            self._schedule_trim()

    def _schedule_trim(self) -> None:
        """Give free heap memory back soon (at most once per TRIM_INTERVAL)."""
        if self._trim_handle is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._trim_at + TRIM_INTERVAL - time.monotonic())
        self._trim_handle = loop.call_later(delay, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        self._trim_at = time.monotonic()
        # runs in the control executor: malloc_trim walks the heap (milliseconds for GiBs)
        with contextlib.suppress(RuntimeError):  # the executor is shut down: nothing to give back
            self._executor.submit(release_free_memory)


class ServerThread:
    """Runs an :class:`NBDServer` on its own event loop in a daemon thread (tests, CLIs)."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="nbd-server", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.close())
        self._loop.close()

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Start the thread and wait until the server listens."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("NBD server did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        """The bound port."""
        return self.server.port

    def stop(self, timeout: float = 10.0) -> None:
        """Close the server and join the thread (bounded)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        if not self._ready.is_set():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
