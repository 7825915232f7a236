"""The transmission phase: many requests in flight per connection, replies in completion order.

Requests are read by one coroutine. Each valid request is executed either inline on the event
loop (exports with ``blocking = False``) or in a worker thread; its reply is written by the event
loop thread when the operation finishes, so replies may overtake each other. The number and the
payload bytes of requests being processed are bounded per connection; when a bound is reached
the reader stops taking requests (and the socket stops being read) until replies go out.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor, Future
from functools import partial
from typing import Any

from torus_core.errors import ProtocolError
from torus_core.nbd import wire
from torus_core.nbd.constants import REQUEST_MAGIC, Cmd, CmdFlag, Errno
from torus_core.nbd.errmap import errno_for
from torus_core.nbd.export import Export
from torus_core.nbd.session import ServerOptions, Session
from torus_core.nbd.stream import BufferedStream

log = logging.getLogger(__name__)

_READ, _WRITE, _DISC, _FLUSH, _TRIM, _ZEROES, _STATUS = (
    Cmd.READ,
    Cmd.WRITE,
    Cmd.DISC,
    Cmd.FLUSH,
    Cmd.TRIM,
    Cmd.WRITE_ZEROES,
    Cmd.BLOCK_STATUS,
)
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_MODIFYING = frozenset((_WRITE, _TRIM, _ZEROES))
#: Largest reply that is concatenated into one write (cheaper than a second send for small data).
_COALESCE = 64 * 1024
#: Most block-status descriptors sent in one reply.
_MAX_EXTENTS = 1024


class Transmission:
    """Serves one connection's requests against its negotiated :class:`Session`."""

    def __init__(
        self, stream: BufferedStream, session: Session, options: ServerOptions, executor: Executor
    ) -> None:
        self.stream = stream
        self.session = session
        self.export: Export = session.export
        self.options = options
        self.executor = executor
        self.loop = asyncio.get_running_loop()
        self.inflight = 0
        self.inflight_bytes = 0
        self._budget: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self.max_payload = min(options.max_payload, session.max_block_size)
        allowed = {
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

    async def run(self) -> None:
        """Serve until NBD_CMD_DISC or the connection ends; then wait for in-flight work and
        close the export (always, also on errors)."""
        try:
            await self._serve()
        finally:
            try:
                await self._wait_idle()
            finally:
                await self.loop.run_in_executor(self.executor, self.export.close)

    async def _serve(self) -> None:
        s = self.stream
        req = wire.REQUEST
        size = self.export.size
        read_only = self.export.read_only
        allowed = self._allowed
        max_payload = self.max_payload
        opts = self.options
        while True:
            fields = s.unpack_nowait(req)
            if fields is None:
                fields = req.unpack(await s.readexactly(req.size))
            magic, flags, cmd, handle, offset, length = fields
            if magic != REQUEST_MAGIC:
                s.abort()
                raise ProtocolError(f"bad request magic {magic:#x}")
            payload: bytearray | None = None
            if cmd == _WRITE:
                if length > max_payload:
                    await s.discard(length)
                    self._reply_error(handle, Errno.EINVAL, f"write of {length} bytes exceeds {max_payload}")
                    continue
                payload = bytearray(length)
                await s.readinto(memoryview(payload))
            elif cmd == _DISC:
                return
            # --- validation (spec: EINVAL unknown command/flags, EPERM read-only, ENOSPC/EINVAL range)
            ok = allowed.get(cmd)
            if ok is None:
                self._reply_error(handle, Errno.EINVAL, f"unsupported command {cmd}")
                continue
            if flags & ~ok:
                self._reply_error(handle, Errno.EINVAL, f"unsupported flags {flags:#x} for command {cmd}")
                continue
            if read_only and cmd in _MODIFYING:
                self._reply_error(handle, Errno.EPERM, "export is read-only")
                continue
            if cmd != _FLUSH and offset + length > size:
                err = Errno.ENOSPC if cmd in _MODIFYING else Errno.EINVAL
                self._reply_error(handle, err, f"range {offset}+{length} is beyond the export size {size}")
                continue
            if cmd == _READ and length > max_payload:
                self._reply_error(handle, Errno.EINVAL, f"read of {length} bytes exceeds {max_payload}")
                continue
            if cmd == _STATUS and length == 0:
                self._reply_error(handle, Errno.EINVAL, "block status of zero length")
                continue
            nbytes = length if cmd in (_READ, _WRITE) else 0
            if self.export.blocking:
                self.inflight += 1
                self.inflight_bytes += nbytes
                fut = self.executor.submit(self._execute, cmd, flags, offset, length, payload)
                fut.add_done_callback(
                    partial(self._done_in_thread, cmd, flags, handle, offset, length, nbytes)
                )
                if self.inflight >= opts.max_inflight or self.inflight_bytes >= opts.max_inflight_bytes:
                    await self._wait_budget()
            else:
                try:
                    result = self._execute(cmd, flags, offset, length, payload)
                except Exception as e:
                    self._failed(handle, cmd, e)
                else:
                    self._succeeded(handle, cmd, offset, length, result)
            if s.write_paused:
                await s.drain()

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

    def _done_in_thread(
        self, cmd: int, flags: int, handle: int, offset: int, length: int, nbytes: int, fut: Future[Any]
    ) -> None:
        self.loop.call_soon_threadsafe(self._complete, cmd, handle, offset, length, nbytes, fut)

    def _complete(
        self, cmd: int, handle: int, offset: int, length: int, nbytes: int, fut: Future[Any]
    ) -> None:
        self.inflight -= 1
        self.inflight_bytes -= nbytes
        exc = fut.exception()
        if exc is not None:
            self._failed(handle, cmd, exc)
        else:
            self._succeeded(handle, cmd, offset, length, fut.result())
        b = self._budget
        if b is not None and not b.done() and self.inflight < self.options.max_inflight:
            if self.inflight_bytes < self.options.max_inflight_bytes:
                b.set_result(None)
        if self.inflight == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def _wait_budget(self) -> None:
        while self.inflight >= self.options.max_inflight or (
            self.inflight_bytes >= self.options.max_inflight_bytes and self.inflight > 0
        ):
            self._budget = self.loop.create_future()
            await self._budget
        self._budget = None

    async def _wait_idle(self) -> None:
        while self.inflight > 0:
            self._idle = self.loop.create_future()
            await asyncio.shield(self._idle)

    # --- replies ----------------------------------------------------------------------------

    def _succeeded(self, handle: int, cmd: int, offset: int, length: int, result: Any) -> None:
        write = self.stream.write
        structured = self.session.structured
        if cmd == _READ:
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
        elif structured:
            write(wire.chunk_none(handle))
        else:
            write(wire.simple_reply(0, handle))

    def _failed(self, handle: int, cmd: int, exc: BaseException) -> None:
        err = errno_for(exc)
        if err == Errno.EIO:
            log.warning("NBD command %d on %s failed: %r", cmd, self.export.name, exc)
        self._reply_error(handle, err, str(exc) or type(exc).__name__)

    def _error_simple(self, handle: int, err: int, message: str) -> None:
        self.stream.write(wire.simple_reply(err, handle))

    def _error_structured(self, handle: int, err: int, message: str) -> None:
        self.stream.write(wire.chunk_error(handle, err, message))
