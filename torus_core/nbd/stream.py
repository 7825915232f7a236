"""A zero-copy byte stream over asyncio's BufferedProtocol.

:class:`BufferedStream` lets a coroutine read exact-sized headers (``readexactly``) and receive
bulk payloads straight into a caller's buffer (``readinto``): while a ``readinto`` is pending and
nothing is buffered, ``get_buffer`` hands the kernel the caller's memory, so write payloads are
not copied in Python. Small reads are served from an internal buffer without suspending when the
bytes are already there.

Writes: the transport is kept nearly empty (its high-water mark is :data:`TRANSPORT_HIGH`) and
the rest waits in a queue of memoryviews, handed over in :data:`_PIECE` slices as the transport
drains. asyncio's own buffer (3.11) is a ``bytearray`` that copies every unsent byte and moves
the remainder after each ``send``; letting megabytes of read replies pile up there cost more
than the reads themselves. Flow control (``write_paused``/``drain``) is on the queued bytes,
which are also charged to the server's :class:`~torus_core.nbd.budget.ByteBudget` if one is set.

Memory: a new connection starts with a small receive buffer (:data:`HANDSHAKE_BUF_SIZE`);
:meth:`BufferedStream.grow` gives it the transmission-sized one once the server admitted it and
the handshake succeeded, so sockets that are refused or never finish the handshake cost little.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from torus_core.errors import ProtocolError
from torus_core.nbd.budget import ByteBudget

#: Receive buffer of an established session (see :meth:`BufferedStream.grow`).
BUF_SIZE = 256 * 1024
#: Receive buffer of a new connection (greeting, options; larger option payloads are read
#: into their own buffer).
HANDSHAKE_BUF_SIZE = 4096
#: High-water mark set on the transport's own buffer (see the module docstring).
TRANSPORT_HIGH = 64 * 1024
#: Largest slice handed to the transport at once.
_PIECE = 256 * 1024
#: Queued bytes above which ``write_paused`` turns true, and below which it turns false again.
QUEUE_HIGH = 8 * 1024 * 1024
QUEUE_LOW = 2 * 1024 * 1024


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (or it broke) while we were waiting for bytes."""


#: Writes up to this size are gathered while corked; larger ones are handed over directly.
_CORK_PIECE = 64 * 1024


class BufferedStream(asyncio.BufferedProtocol):
    """asyncio protocol + stream-style reader/writer for one NBD connection."""

    def __init__(self, buffer_size: int = HANDSHAKE_BUF_SIZE) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(buffer_size)
        self._bufview = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._target: memoryview | None = None  # pending readinto destination
        self._target_pos = 0
        self._need = 0  # bytes wanted in _buf for a pending readexactly
        self._waiter: asyncio.Future[None] | None = None
        self._closed_exc: BaseException | None = None
        self._eof = False
        self._paused = False
        self._reading_paused = False
        self._hold = False
        #: Consumer-mode callback (see :meth:`set_consumer`).
        self.consumer: Callable[[], None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] | None = None
        #: Called once the connection is made (the server starts its handler from here).
        self.on_made: Callable[[BufferedStream], None] | None = None
        #: Called on EOF or connection loss (consumer mode has no pending read to fail).
        self.on_lost: Callable[[], None] | None = None
        #: Called when the transport's write buffer drained (consumer mode back-pressure).
        self.on_resume_writing: Callable[[], None] | None = None
        self._corked = 0
        self._out = bytearray()
        self._queue: deque[memoryview] = deque()
        self._queued = 0
        self._tpaused = False
        #: Server-wide budget charged with the queued bytes (None: not accounted).
        self.budget: ByteBudget | None = None
        #: ``time.monotonic()`` of the last bytes received or of the transport draining.
        self.last_io = time.monotonic()

    # --- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.lost = loop.create_future()
        if self.on_made is not None:
            self.on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Give the caller's buffer if a readinto is pending and nothing is buffered."""
        if self._target is not None and self._start == self._end:
            return self._target[self._target_pos :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < 65536 and self._start > 0:
            # Compact: move the unread tail to the front.
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        if self._end == len(self._buf):
            self._buf.extend(bytes(len(self._buf)))
            self._bufview.release()
            self._bufview = memoryview(self._buf)
        return self._bufview[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Account received bytes; wake the reader or run the consumer."""
        self.last_io = time.monotonic()
        if self._target is not None and self._start == self._end:
            self._target_pos += nbytes
            if self._target_pos >= len(self._target):
                if self.consumer is not None:
                    self._target = None
                    self.consumer()
                else:
                    self._wake()
            return
        self._end += nbytes
        if self.consumer is not None:
            if self._target is not None and not self._fill_target():
                return
            self.consumer()
        elif self._target is not None or self._end - self._start >= self._need:
            self._wake()
        self._update_reading()

    def _fill_target(self) -> bool:
        """Move buffered bytes into the pending payload target; True once it is complete."""
        target = self._target
        assert target is not None
        k = min(self._end - self._start, len(target) - self._target_pos)
        if k:
            target[self._target_pos : self._target_pos + k] = self._bufview[self._start : self._start + k]
            self._start += k
            self._target_pos += k
        if self._target_pos >= len(target):
            self._target = None
            return True
        return False

    def _update_reading(self) -> None:
        """Pause reading from the socket while the consumer holds or the buffer is half full."""
        t = self.transport
        if t is None or t.is_closing():
            return
        want_pause = self._hold or self._end - self._start >= len(self._buf) // 2
        if want_pause != self._reading_paused:
            self._reading_paused = want_pause
            if want_pause:
                t.pause_reading()
            else:
                t.resume_reading()

    def _consumed(self) -> None:
        if self._reading_paused:
            self._update_reading()

    # --- synchronous consumer mode (transmission phase) -------------------------------------

    def set_consumer(self, consumer: Callable[[], None] | None) -> None:
        """Switch to consumer mode: ``consumer()`` is called whenever bytes arrive and pulls
        them with :meth:`unpack_nowait` / :meth:`begin_payload` (no coroutine per message)."""
        self.consumer = consumer
        if consumer is not None and self._end > self._start:
            asyncio.get_running_loop().call_soon(consumer)

    def begin_payload(self, target: memoryview) -> bool:
        """Start filling ``target``; True if it is already complete, else the consumer is
        called again once it is (the bytes are received straight into ``target``)."""
        self._target = target
        self._target_pos = 0
        done = self._fill_target()
        if self._reading_paused:
            self._update_reading()
        return done

    @property
    def payload_pending(self) -> bool:
        """Whether a :meth:`begin_payload` target is still being filled."""
        return self._target is not None

    @property
    def holding(self) -> bool:
        """Whether :meth:`hold_reading` is in effect."""
        return self._hold

    def hold_reading(self, hold: bool) -> None:
        """Stop (or resume) reading from the socket, e.g. while the in-flight budget is full."""
        self._hold = hold
        self._update_reading()

    def eof_received(self) -> bool:
        """Peer half-closed: fail pending reads; let the transport close."""
        self._eof = True
        self._wake()
        if self.on_lost is not None:
            self.on_lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail pending reads and drains."""
        self._closed_exc = exc or ConnectionClosed("connection closed")
        self._eof = True
        self._drop_queue()
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        """The transport's write buffer is above its high-water mark: queue further writes."""
        self._tpaused = True

    def resume_writing(self) -> None:
        """The transport's write buffer drained below its low-water mark: feed it more."""
        self._tpaused = False
        self.last_io = time.monotonic()
        self._pump()
        if self._hold and self.on_resume_writing is not None:
            # the consumer holds reading (e.g. its in-flight budget is full of queued replies)
            self.on_resume_writing()

    def _drop_queue(self) -> None:
        """Forget queued bytes that can no longer be sent."""
        self._queue.clear()
        if self.budget is not None and self._queued:
            self.budget.release(self._queued)
        self._queued = 0

    def _pump(self) -> None:
        """Hand queued bytes to the transport until it pauses or the queue is empty."""
        t = self.transport
        q = self._queue
        sent = 0
        while q and not self._tpaused:
            if t is None or t.is_closing():
                break
            head = q[0]
            if len(head) > _PIECE:
                piece = head[:_PIECE]
                q[0] = head[_PIECE:]
            else:
                piece = q.popleft()
            sent += len(piece)
            t.write(piece)
        self._queued -= sent
        if sent and self.budget is not None:
            self.budget.release(sent)
        if q and (t is None or t.is_closing()):
            self._drop_queue()
        if self._paused and self._queued <= QUEUE_LOW:
            self._paused = False
            if self._drain_waiter is not None and not self._drain_waiter.done():
                self._drain_waiter.set_result(None)
            if self.on_resume_writing is not None:
                self.on_resume_writing()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        if self._eof:
            raise ConnectionClosed("connection closed by peer")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # --- reading ----------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return self._end - self._start

    @property
    def queued(self) -> int:
        """Bytes written but still waiting in the queue (not yet handed to the transport)."""
        return self._queued

    @property
    def buffer_size(self) -> int:
        """Size of the receive buffer."""
        return len(self._buf)

    def grow(self, size: int = BUF_SIZE) -> None:
        """Give the receive buffer ``size`` bytes (keeping what is buffered); call between
        messages, not while a payload is being received."""
        if size <= len(self._buf) or self._target is not None:
            return
        n = self._end - self._start
        buf = bytearray(size)
        buf[:n] = self._bufview[self._start : self._end]
        self._bufview.release()
        self._buf, self._bufview = buf, memoryview(buf)
        self._start, self._end = 0, n
        self._update_reading()

    def peek_nowait(self, st: struct.Struct) -> tuple[Any, ...] | None:
        """Like :meth:`unpack_nowait` but leaves the bytes buffered (see :meth:`skip`)."""
        if self._end - self._start >= st.size:
            return st.unpack_from(self._buf, self._start)
        return None

    def skip(self, n: int) -> None:
        """Consume ``n`` buffered bytes (after :meth:`peek_nowait`)."""
        self._start += n
        if self._reading_paused:
            self._consumed()

    def unpack_nowait(self, st: struct.Struct) -> tuple[Any, ...] | None:
        """Unpack ``st`` from the buffered bytes if enough are there, else None (no suspension)."""
        s = self._start
        if self._end - s >= st.size:
            self._start = s + st.size
            fields = st.unpack_from(self._buf, s)
            if self._reading_paused:
                self._consumed()
            return fields
        return None

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes (for headers and small option payloads)."""
        while self._end - self._start < n:
            if n > len(self._buf) // 2:  # reading pauses at half a buffer: receive directly
                data = bytearray(n)
                await self.readinto(memoryview(data))
                return bytes(data)
            self._need = n
            try:
                await self._wait()
            finally:
                self._need = 0
        s = self._start
        self._start = s + n
        self._consumed()
        return bytes(self._bufview[s : s + n])

    async def readinto(self, target: memoryview) -> None:
        """Fill ``target`` completely, receiving directly into it where possible."""
        total = len(target)
        have = min(self._end - self._start, total)
        if have:
            target[:have] = self._bufview[self._start : self._start + have]
            self._start += have
            self._consumed()
        if have == total:
            return
        self._target = target
        self._target_pos = have
        try:
            while self._target_pos < total:
                if self._start != self._end:
                    # Bytes landed in our buffer (a get_buffer call raced the target); move them.
                    k = min(self._end - self._start, total - self._target_pos)
                    target[self._target_pos : self._target_pos + k] = self._bufview[
                        self._start : self._start + k
                    ]
                    self._start += k
                    self._target_pos += k
                    self._consumed()
                    continue
                await self._wait()
        finally:
            self._target = None

    async def discard(self, n: int, chunk: int = 1 << 20) -> None:
        """Consume and drop ``n`` bytes using at most ``chunk`` bytes of memory."""
        scratch = memoryview(bytearray(min(n, chunk)))
        while n > 0:
            k = min(n, len(scratch))
            await self.readinto(scratch[:k])
            n -= k

    # --- writing ----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for sending (no-op once the connection is gone).

        While corked (:meth:`cork`), small writes are gathered and sent by :meth:`uncork` in one
        go (one ``send`` for a batch of replies); a large one first sends what was gathered."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if self._corked:
            if len(data) <= _CORK_PIECE:
                self._out += data
                return
            if self._out:
                out, self._out = self._out, bytearray()
                self._send(out)
        self._send(data)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        if not self._queue and not self._tpaused and len(data) <= _PIECE:
            assert self.transport is not None
            self.transport.write(data)
            return
        mv = memoryview(data).cast("B")
        self._queue.append(mv)
        self._queued += len(mv)
        if self.budget is not None:
            self.budget.charge(len(mv))
        self._pump()
        if self._queued > QUEUE_HIGH:
            self._paused = True

    def cork(self) -> None:
        """Gather small writes until the matching :meth:`uncork` (calls nest)."""
        self._corked += 1

    def uncork(self) -> None:
        """End one :meth:`cork`; the outermost one sends everything gathered."""
        self._corked -= 1
        if self._corked == 0 and self._out:
            out, self._out = self._out, bytearray()
            t = self.transport
            if t is not None and not t.is_closing():
                self._send(out)

    @property
    def write_paused(self) -> bool:
        """Whether too many bytes wait to be sent (writers should hold back)."""
        return self._paused

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        while self._paused and self._closed_exc is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        self._drain_waiter = None

    async def start_tls(self, context: ssl.SSLContext, timeout: float | None) -> None:
        """Upgrade this connection to TLS as the server side (after NBD_OPT_STARTTLS)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=timeout
        )
        assert isinstance(new, asyncio.Transport)
        self.transport = new

    def close(self) -> None:
        """Close the transport (pending writes, queued ones included, are flushed first)."""
        t = self.transport
        if t is not None:
            if self._queue and not t.is_closing():
                t.set_write_buffer_limits(high=1 << 62)
                self._tpaused = False
                self._pump()
            t.close()

    def abort(self) -> None:
        """Drop the connection immediately (protocol violation)."""
        if self.transport is not None:
            self.transport.abort()
