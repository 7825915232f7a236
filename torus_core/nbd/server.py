"""The asyncio NBD server: accepts connections, runs the handshake, then serves transmission.

Usage in-process::

    server = NBDServer(provider, port=0)
    await server.start()          # server.port is the bound port
    await server.serve_forever()  # or: await server.close()

or from synchronous code (tests, CLIs) with :class:`ServerThread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torus_core.errors import ConfigError, InvalidArgument, ProtocolError
from torus_core.nbd.export import ExportProvider
from torus_core.nbd.handshake import Negotiator
from torus_core.nbd.session import ServerOptions
from torus_core.nbd.stream import TRANSPORT_HIGH, BufferedStream, ConnectionClosed
from torus_core.nbd.transmission import Transmission
from torus_core.nbd.workers import WorkerPool

log = logging.getLogger(__name__)


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
        workers = self.options.workers or min(32, (os.cpu_count() or 1) + 4)
        # Control calls (open/describe/close/list) and data calls of blocking exports.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nbd-ctl")
        self._workers = WorkerPool(workers)
        self._server: asyncio.Server | None = None
        self._streams: set[BufferedStream] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self._port

    @property
    def connections(self) -> int:
        """Number of open client connections."""
        return len(self._streams)

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
        self._streams.add(stream)
        task = asyncio.get_running_loop().create_task(self._handle(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, stream: BufferedStream) -> None:
        opts = self.options
        refuse = None
        if len(self._streams) > opts.max_connections:
            refuse = f"too many connections (the limit is {opts.max_connections})"
        peer = stream.transport.get_extra_info("peername") if stream.transport else None
        try:
            negotiator = Negotiator(stream, self.provider, opts, self._executor, refuse)
            try:
                async with asyncio.timeout(opts.handshake_timeout):
                    session = await negotiator.run()
            except TimeoutError:
                log.info("NBD handshake with %s timed out", peer)
                return
            if session is None:
                return
            await Transmission(stream, session, opts, self._executor, self._workers).run()
        except (ConnectionClosed, ConnectionError, ssl.SSLError) as e:
            log.debug("NBD connection %s ended: %r", peer, e)
        except ProtocolError as e:
            log.info("NBD protocol violation from %s: %s", peer, e)
            stream.abort()
        except Exception:
            log.exception("NBD connection %s failed", peer)
        finally:
            stream.close()
            self._streams.discard(stream)


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
