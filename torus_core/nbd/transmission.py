"""The transmission phase: many requests in flight per connection, replies in completion order.

Requests are read by one coroutine. Each valid request is executed either inline on the event
loop (exports with ``blocking = False``) or in a worker thread; its reply is written by the event
loop thread when the operation finishes, so replies may overtake each other. Small reads and
non-FUA writes of blocking exports are first offered to ``read_nowait``/``write_nowait`` on the
loop (no thread hop when the export can serve them without waiting). The number and the
payload bytes of requests being processed plus the reply bytes waiting to be sent are bounded
per connection (``max_inflight``, ``max_inflight_bytes``) and, over all connections, by the
server's :class:`~torus_core.nbd.budget.ByteBudget`; a request that does not fit is left
unread (and the socket stops being read) until replies go out or another connection releases
bytes. How long a session has gone with nothing in flight and no bytes moving is
:meth:`Transmission.idle_seconds`; the server closes the longest-idle one (past ``idle_timeout``)
only when a new connection needs its slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from typing import Any

from torus_core import metrics
from torus_core.errors import ProtocolError
from torus_core.nbd import wire
from torus_core.nbd.budget import ByteBudget
from torus_core.nbd.bufpool import BufferPool
from torus_core.nbd.constants import REQUEST_MAGIC, Cmd, CmdFlag, Errno
from torus_core.nbd.errmap import errno_for
from torus_core.nbd.export import Export
from torus_core.nbd.logs import RateLimitFilter
from torus_core.nbd.session import ServerOptions, Session
from torus_core.nbd.stream import BufferedStream, ConnectionClosed
from torus_core.nbd.workers import CompletionSink, WorkerPool

log = logging.getLogger(__name__)
RateLimitFilter.install(log)

_READ, _WRITE, _DISC, _FLUSH, _TRIM, _ZEROES, _STATUS = (
    int(Cmd.READ),
    int(Cmd.WRITE),
    int(Cmd.DISC),
    int(Cmd.FLUSH),
    int(Cmd.TRIM),
    int(Cmd.WRITE_ZEROES),
    int(Cmd.BLOCK_STATUS),
)
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_MODIFYING = frozenset((_WRITE, _TRIM, _ZEROES))
#: Largest reply that is concatenated into one write (cheaper than a second send for small data).
_COALESCE = 64 * 1024
#: Largest read/write a blocking export is offered on the event loop first (``*_nowait``).
_INLINE_MAX = 128 * 1024
#: Most block-status descriptors sent in one reply.
_MAX_EXTENTS = 1024
#: Metric label of each command served (see torus_core.metrics.NBD_COMMANDS).
_CMD_NAMES = {
    _READ: "read",
    _WRITE: "write",
    _FLUSH: "flush",
    _TRIM: "trim",
    _ZEROES: "write_zeroes",
    _STATUS: "block_status",
}
_now = time.perf_counter


class Transmission:
    """Serves one connection's requests against its negotiated :class:`Session`."""

    def __init__(
        self,
        stream: BufferedStream,
        session: Session,
        options: ServerOptions,
        executor: Executor,
        workers: WorkerPool,
        budget: ByteBudget | None = None,
    ) -> None:
        self.stream = stream
        self.session = session
        self.export: Export = session.export
        self.options = options
        self.executor = executor
        self.workers = workers
        self.loop = asyncio.get_running_loop()
        self._sink = CompletionSink(self.loop, self._complete, (stream.cork, stream.uncork))
        self.inflight = 0
        self.inflight_bytes = 0
        self._idle: asyncio.Future[None] | None = None
        self.budget = budget if budget is not None else ByteBudget(options.max_total_inflight_bytes)
        self._pool = BufferPool(budget=self.budget)
        self._waiting_budget = False
        self.max_payload = min(options.max_payload, session.max_block_size)
        allowed: dict[int, int] = {
            _READ: int(CmdFlag.DF) if session.structured else 0,
            _WRITE: _FUA,
            _FLUSH: 0,
            _TRIM: _FUA,
            _ZEROES: _FUA | _NO_HOLE,
            _DISC: 0,
        }
        if session.allocation_context is not None:
            allowed[_STATUS] = _REQ_ONE
        self._allowed = allowed
        self._reply_error = self._error_structured if session.structured else self._error_simple
        # per-connection, lock-free (only this loop's thread updates it); folded in at close
        self._metrics = m = metrics.NBD.connection(getattr(self.export, "name", ""), _CMD_NAMES)
        self._latency, self._errors = m.latency, m.errors
        self._read_bytes, self._written_bytes = m.read_bytes, m.written_bytes

    async def run(self) -> None:
        """Serve until NBD_CMD_DISC or the connection ends; then wait for in-flight work and
        close the export (always, also on errors)."""
        s = self.stream
        self._finished: asyncio.Future[None] = self.loop.create_future()
        self._pending: tuple[int, int, int, int, bytearray] | None = None  # write awaiting payload
        self._discard_left = 0
        self._discard_reply: tuple[int, str] | None = None
        self._disc = False
        s.on_lost = self._on_lost
        s.on_resume_writing = self._unblock
        try:
            s.set_consumer(self._consume)
            if s.lost is not None and s.lost.done():
                self._on_lost()
            await self._finished
        finally:
            s.set_consumer(None)
            s.on_lost = None
            s.on_resume_writing = None
            try:
                await self._wait_idle()
            finally:
                if self._pending is not None:  # a write whose payload never fully arrived
                    self._release(self._pending[3])
                    self._pending = None
                self._pool.clear()
                if self._scratch is not None:
                    self._scratch = None
                metrics.NBD.retire(self._metrics)
                await self.loop.run_in_executor(self.executor, self.export.close)

    def idle_seconds(self) -> float:
        """Seconds with nothing in flight and no bytes moving either way (0 while busy)."""
        finished = getattr(self, "_finished", None)  # set when run() starts
        if finished is None or finished.done() or self.inflight:
            return 0.0
        return time.monotonic() - self.stream.last_io

    def evict(self, reason: str) -> None:
        """Close this session to free its slot (the server's idle eviction)."""
        finished = getattr(self, "_finished", None)
        if finished is None or finished.done():
            return
        log.info("NBD session on %s closed: %s", getattr(self.export, "name", "?"), reason)
        self.stream.close()
        self._finish()

    def _on_lost(self) -> None:
        if not self._finished.done():
            self._finished.set_exception(ConnectionClosed("connection closed by peer"))

    def _finish(self, exc: BaseException | None = None) -> None:
        if self._finished.done():
            return
        if exc is None:
            self._finished.set_result(None)
        else:
            self._finished.set_exception(exc)

    def _blocked(self) -> bool:
        opts = self.options
        return (
            self.inflight >= opts.max_inflight
            or (self.inflight_bytes >= opts.max_inflight_bytes and self.inflight > 0)
            or self.stream.write_paused
        )

    def _fits(self, length: int) -> bool:
        """Whether a READ/WRITE of ``length`` bytes may be taken now (else wait for room)."""
        own = self.inflight_bytes + self.stream.queued
        if own and own + length > self.options.max_inflight_bytes:
            return False  # woken by the stream draining or by a completion
        if self.budget.fits(own, length):
            return True
        if not self._waiting_budget:
            self._waiting_budget = True
            self.budget.wait(self._budget_freed)
        return False

    def _budget_freed(self) -> None:
        self._waiting_budget = False
        if self.stream.holding:
            self._unblock()

    def _unblock(self) -> None:
        """Budget or write buffer freed: resume reading and process what is buffered."""
        if self.stream.consumer is not None and not self._blocked():
            self.stream.hold_reading(False)
            self._consume()

    def _consume(self) -> None:
        """Parse and dispatch every complete request in the buffer (called on data arrival)."""
        s = self.stream
        if self._finished.done() or self._disc:
            return
        if s.payload_pending:
            return  # called early (e.g. a completion freed budget); the payload is not in yet
        s.cork()  # replies of this batch go out together
        try:
            if self._discard_reply is not None and not self._continue_discard():
                return
            pending = self._pending
            if pending is not None:
                # The payload of this write has just been completed by the stream.
                self._pending = None
                self._dispatch(_WRITE, *pending)
            req = wire.REQUEST
            size = self.export.size
            read_only = self.export.read_only
            allowed = self._allowed
            max_payload = self.max_payload
            while True:
                if self._blocked():
                    s.hold_reading(True)
                    return
                fields = s.peek_nowait(req)
                if fields is None:
                    return
                magic, flags, cmd, handle, offset, length = fields
                if magic != REQUEST_MAGIC:
                    s.abort()
                    self._finish(ProtocolError(f"bad request magic {magic:#x}"))
                    return
                if (cmd == _READ or cmd == _WRITE) and length <= max_payload and not self._fits(length):
                    s.hold_reading(True)  # the request stays buffered until there is room
                    return
                s.skip(req.size)
                if cmd == _WRITE:
                    err = self._validate(cmd, flags, offset, length, allowed, size, read_only, max_payload)
                    if err is not None:
                        # Consume and drop the payload in bounded chunks, then reply.
                        self._discard_left = length
                        self._discard_reply = (handle, err)
                        if not self._continue_discard():
                            return
                        continue
                    payload = self._pool.get(length)
                    self.inflight_bytes += length
                    self.budget.charge(length)
                    if not s.begin_payload(memoryview(payload)):
                        self._pending = (flags, handle, offset, length, payload)
                        return
                    self._dispatch(_WRITE, flags, handle, offset, length, payload)
                    continue
                if cmd == _DISC:
                    self._disc = True
                    if self.inflight == 0:
                        self._finish()
                    return
                err = self._validate(cmd, flags, offset, length, allowed, size, read_only, max_payload)
                if err is not None:
                    self._reply_error(handle, self._last_errno, err)
                    continue
                self._dispatch(cmd, flags, handle, offset, length, None)
        except Exception as e:  # never let a bug kill the event loop callback silently
            log.exception("NBD transmission failed")
            s.abort()
            self._finish(e)
        finally:
            s.uncork()

    def _continue_discard(self) -> bool:
        """Drop payload bytes of a refused write; True once all are gone and replied to."""
        s = self.stream
        while self._discard_left:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(1 << 20))
            k = min(self._discard_left, len(self._scratch))
            self._discard_left -= k
            if not s.begin_payload(self._scratch[:k]):
                return False
        assert self._discard_reply is not None
        handle, msg = self._discard_reply
        self._discard_reply = None
        self._reply_error(handle, self._discard_errno, msg)
        return True

    _scratch: memoryview | None = None
    _last_errno: int = 0
    _discard_errno: int = 0

    def _validate(
        self,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        allowed: dict[int, int],
        size: int,
        read_only: bool,
        max_payload: int,
    ) -> str | None:
        """None if the request may run, else the error message (errno in _last_errno).

        Spec: EINVAL for unknown commands and flags, EPERM for writes to read-only exports,
        ENOSPC for modifications beyond the end, EINVAL for other out-of-range requests."""
        ok = allowed.get(cmd)
        err: int
        msg: str | None = None
        if ok is None:
            err, msg = Errno.EINVAL, f"unsupported command {cmd}"
        elif flags & ~ok:
            err, msg = Errno.EINVAL, f"unsupported flags {flags:#x} for command {cmd}"
        elif read_only and cmd in _MODIFYING:
            err, msg = Errno.EPERM, "export is read-only"
        elif cmd != _FLUSH and offset + length > size:
            err = Errno.ENOSPC if cmd in _MODIFYING else Errno.EINVAL
            msg = f"range {offset}+{length} is beyond the export size {size}"
        elif cmd in (_READ, _WRITE) and length > max_payload:
            err, msg = Errno.EINVAL, f"payload of {length} bytes exceeds the maximum {max_payload}"
        elif cmd == _STATUS and length == 0:
            err, msg = Errno.EINVAL, "block status of zero length"
        else:
            return None
        self._last_errno = self._discard_errno = err
        return msg

    def _dispatch(
        self, cmd: int, flags: int, handle: int, offset: int, length: int, payload: bytearray | None
    ) -> None:
        t0 = _now()
        # READ/WRITE bytes are held from here (a WRITE's since its payload buffer was taken)
        # until the reply is written: see _release
        nbytes = length if cmd == _READ or cmd == _WRITE else 0
        if cmd == _READ:
            self.inflight_bytes += length
            self.budget.charge(length)
        if self.export.blocking:
            if length <= _INLINE_MAX and (cmd == _READ or (cmd == _WRITE and not flags & _FUA)):
                if self._try_inline(cmd, handle, offset, length, payload):
                    self._release(nbytes)
                    self._latency[cmd].observe(_now() - t0)
                    return
            self.inflight += 1
            self.workers.submit(
                self._execute,
                (cmd, flags, offset, length, payload),
                self._sink,
                (cmd, handle, offset, length, nbytes, payload, t0),
            )
            return
        try:
            result = self._execute(cmd, flags, offset, length, payload)
        except Exception as e:
            self._failed(handle, cmd, e)
        else:
            self._succeeded(handle, cmd, offset, length, result)
        self._release(nbytes)
        self._latency[cmd].observe(_now() - t0)
        if payload is not None:
            self._pool.put(payload)

    def _release(self, nbytes: int) -> None:
        """A READ/WRITE of ``nbytes`` finished (its reply, if any, is queued on the stream,
        which accounts for it from now on)."""
        if nbytes:
            self.inflight_bytes -= nbytes
            self.budget.release(nbytes)

    def _try_inline(self, cmd: int, handle: int, offset: int, length: int, payload: bytearray | None) -> bool:
        """Serve a small read/write of a blocking export on the loop if it needs no waiting."""
        export = self.export
        try:
            if cmd == _READ:
                data = export.read_nowait(offset, length)
                if data is None:
                    return False
                if len(data) != length:
                    raise OSError(f"export returned {len(data)} bytes for a read of {length}")
                self._succeeded(handle, cmd, offset, length, data)
                return True
            assert payload is not None
            if not export.write_nowait(offset, payload, False):
                return False
            self._succeeded(handle, cmd, offset, length, None)
        except Exception as e:
            self._failed(handle, cmd, e)
        if payload is not None:
            self._pool.put(payload)
        return True

    # --- execution (worker thread or inline) ------------------------------------------------

    def _execute(self, cmd: int, flags: int, offset: int, length: int, payload: bytearray | None) -> Any:
        export = self.export
        if cmd == _READ:
            data = export.read(offset, length)
            if len(data) != length:
                raise OSError(f"export returned {len(data)} bytes for a read of {length}")
            return data
        if cmd == _WRITE:
            assert payload is not None
            export.write(offset, payload, bool(flags & _FUA))
            return None
        if cmd == _FLUSH:
            export.flush()
            return None
        if cmd == _TRIM:
            export.trim(offset, length)
        elif cmd == _ZEROES:
            export.write_zeroes(offset, length, not (flags & _NO_HOLE))
        elif cmd == _STATUS:
            return self._clip_extents(export.extents(offset, length), length, bool(flags & _REQ_ONE))
        if flags & _FUA:
            export.flush()
        return None

    @staticmethod
    def _clip_extents(extents: list[tuple[int, int]], length: int, one: bool) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        left = length
        for ext_len, ext_flags in extents:
            if ext_len <= 0 or left <= 0:
                break
            n = min(ext_len, left)
            if out and out[-1][1] == ext_flags:
                out[-1] = (out[-1][0] + n, ext_flags)
            else:
                out.append((n, ext_flags))
            left -= n
            if len(out) >= (1 if one else _MAX_EXTENTS):
                break
        if not out:
            raise OSError("export returned no extents")
        return out

    def _complete(self, tag: tuple[Any, ...], ok: bool, result: Any) -> None:
        cmd, handle, offset, length, nbytes, payload, t0 = tag
        self.inflight -= 1
        if ok:
            self._succeeded(handle, cmd, offset, length, result)
        else:
            self._failed(handle, cmd, result)
        self._release(nbytes)
        self._latency[cmd].observe(_now() - t0)
        if payload is not None:
            self._pool.put(payload)
        if self.inflight == 0:
            if self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
            if self._disc:
                self._finish()
        if self.stream.holding:
            self._unblock()

    async def _wait_idle(self) -> None:
        while self.inflight > 0:
            self._idle = self.loop.create_future()
            await asyncio.shield(self._idle)

    # --- replies ----------------------------------------------------------------------------

    def _succeeded(self, handle: int, cmd: int, offset: int, length: int, result: Any) -> None:
        write = self.stream.write
        structured = self.session.structured
        if cmd == _READ:
            self._read_bytes.inc(length)
            if structured:
                if length == 0:
                    write(wire.chunk_none(handle))
                    return
                head = wire.chunk_data_header(handle, offset, length)
            else:
                head = wire.simple_reply(0, handle)
            if length <= _COALESCE:
                write(head + result)
            else:
                write(head)
                write(result)
        elif cmd == _STATUS:
            assert self.session.allocation_context is not None
            write(wire.chunk_block_status(handle, self.session.allocation_context, result))
        else:
            if cmd == _WRITE:
                self._written_bytes.inc(length)
            write(wire.chunk_none(handle) if structured else wire.simple_reply(0, handle))

    def _failed(self, handle: int, cmd: int, exc: BaseException) -> None:
        self._errors[cmd].inc()
        err = errno_for(exc)
        if err == Errno.EIO:
            log.warning("NBD command %d on %s failed: %r", cmd, self.export.name, exc)
        self._reply_error(handle, err, str(exc) or type(exc).__name__)

    def _error_simple(self, handle: int, err: int, message: str) -> None:
        self.stream.write(wire.simple_reply(err, handle))

    def _error_structured(self, handle: int, err: int, message: str) -> None:
        self.stream.write(wire.chunk_error(handle, err, message))
