"""Fixed-newstyle handshake and option haggling (server side).

A connection the server refused (too many connections) is still greeted, and each option it
sends is answered with ``NBD_REP_ERR_POLICY`` carrying the reason, as the NBD protocol allows, so
that the client can show it (libnbd/qemu: "server policy prevents ..." / "Denied by server"),
up to :data:`REFUSE_OPTIONS` options. Names and messages put into log lines are shortened
(:func:`~torus_core.nbd.logs.shorten`): a client picks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

from torus_core.errors import Locked, NotExist, ProtocolError, TorusError
from torus_core.nbd import wire
from torus_core.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_STRING,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
)
from torus_core.nbd.export import Export, ExportInfo, ExportProvider
from torus_core.nbd.logs import RateLimitFilter, shorten
from torus_core.nbd.session import ServerOptions, Session, block_sizes, transmission_flags
from torus_core.nbd.stream import BufferedStream

log = logging.getLogger(__name__)
RateLimitFilter.install(log)
T = TypeVar("T")

#: Options of a refused connection answered (with the refusal) before it is closed.
REFUSE_OPTIONS = 16

#: Context id handed out for base:allocation after NBD_OPT_SET_META_CONTEXT.
ALLOCATION_CONTEXT_ID = 1


class _OptionError(Exception):
    """Internal: reply to the current option with an error and continue haggling."""

    def __init__(self, rep: Rep, message: str) -> None:
        super().__init__(message)
        self.rep = rep
        self.message = message


class Negotiator:
    """Runs the handshake for one connection; :meth:`run` yields a :class:`Session` or None."""

    def __init__(
        self,
        stream: BufferedStream,
        provider: ExportProvider,
        options: ServerOptions,
        executor: Executor,
        refuse: str | None = None,
    ) -> None:
        self.stream = stream
        self.provider = provider
        self.options = options
        self.executor = executor
        self.refuse = refuse
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # export for which base:allocation was selected
        #: The handshake's timeout (set by the server); paused while the server opens an export.
        self.deadline: asyncio.Timeout | None = None
        self._refused_options = 0

    def _peer(self) -> str:
        """The client's address for log lines (``?`` if unknown)."""
        transport = self.stream.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer) if peer else "?"

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @contextlib.contextmanager
    def _server_time(self) -> Iterator[None]:
        """Do not count the enclosed (server-side) wait against the client's handshake timeout:
        opening a volume may wait for its previous connection's close (bounded by the provider)."""
        deadline = self.deadline
        when = deadline.when() if deadline is not None else None
        if deadline is None or when is None:
            yield
            return
        loop = asyncio.get_running_loop()
        left = when - loop.time()
        deadline.reschedule(None)
        try:
            yield
        finally:
            deadline.reschedule(loop.time() + max(left, 0.0))

    async def _open(self, name: str) -> Export:
        """Open an export in a worker; if we are cancelled meanwhile, close it when it arrives."""
        fut = asyncio.get_running_loop().run_in_executor(self.executor, self.provider.open_export, name)
        try:
            with self._server_time():
                return await asyncio.shield(fut)
        except asyncio.CancelledError:

            def _late_close(f: asyncio.Future[Export]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.executor.submit(f.result().close)

            fut.add_done_callback(_late_close)
            raise

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.stream.write(wire.option_reply(opt, rep, data))

    async def run(self) -> Session | None:
        """Greet, haggle, and return the session (None if the client aborted or was refused)."""
        s = self.stream
        s.write(wire.greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        (cflags,) = wire.CLIENT_FLAGS.unpack(await s.readexactly(4))
        if cflags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & ClientFlag.NO_ZEROES)
        while True:
            magic, opt, length = wire.OPTION_HEADER.unpack(await s.readexactly(wire.OPTION_HEADER.size))
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > self.options.max_option_length:
                # Do not read (or allocate) the payload; we cannot resynchronise cheaply, so close.
                self._reply(opt, Rep.ERR_TOO_BIG, f"option payload of {length} bytes is too big".encode())
                s.close()
                return None
            data = await s.readexactly(length) if length else b""
            try:
                result = await self._option(opt, data)
            except _OptionError as e:
                self._reply(opt, e.rep, e.message.encode()[:MAX_STRING])
                continue
            if result is not None:
                return result if isinstance(result, Session) else None

    async def _option(self, opt: int, data: bytes) -> Session | bool | None:
        """Handle one option. Returns a Session to enter transmission, False to end, None to go on."""
        if self.refuse is not None:
            self._refused_options += 1
            if opt == Opt.ABORT:
                self._reply(opt, Rep.ACK)
            elif opt != Opt.EXPORT_NAME:  # EXPORT_NAME cannot carry an error: just close
                self._reply(opt, Rep.ERR_POLICY, self.refuse.encode()[:MAX_STRING])
                if self._refused_options < REFUSE_OPTIONS:
                    return None
            self.stream.close()
            return False
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self.stream.close()
            return False
        if opt == Opt.STARTTLS:
            await self._starttls(data)
            return None
        if self.options.tls_required and not self.tls_active:
            if opt == Opt.EXPORT_NAME:
                self.stream.close()  # this option cannot carry an error: end the session
                return False
            raise _OptionError(Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        if opt == Opt.EXPORT_NAME:
            return await self._export_name(data)
        if opt in (Opt.GO, Opt.INFO):
            return await self._info_or_go(opt, data)
        if opt == Opt.LIST:
            await self._list(data)
            return None
        if opt == Opt.STRUCTURED_REPLY:
            if data:
                raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            self._reply(opt, Rep.ACK)
            return None
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            await self._meta_context(opt, data)
            return None
        raise _OptionError(Rep.ERR_UNSUP, f"option {opt} is not supported")

    async def _starttls(self, data: bytes) -> None:
        if self.options.tls is None:
            raise _OptionError(Rep.ERR_UNSUP, "this server does not offer TLS")
        if self.tls_active:
            raise _OptionError(Rep.ERR_INVALID, "TLS is already active")
        if data:
            raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        self._reply(Opt.STARTTLS, Rep.ACK)
        await self.stream.start_tls(self.options.tls, self.options.handshake_timeout)
        self.tls_active = True
        # Anything negotiated in clear text is void after the upgrade.
        self.structured = False
        self.meta_export = None

    def _resolve_name(self, name: str) -> str:
        if name:
            return name
        default = self.provider.default_export()
        if default is None:
            raise _OptionError(Rep.ERR_UNKNOWN, "there is no default export")
        return default

    async def _export_name(self, data: bytes) -> Session | bool:
        try:
            if len(data) > MAX_STRING:
                raise _OptionError(Rep.ERR_INVALID, f"export name of {len(data)} bytes is too long")
            name = self._resolve_name(data.decode())
            export = await self._open(name)
        except (UnicodeDecodeError, _OptionError, TorusError) as e:
            level = logging.WARNING if isinstance(e, Locked) else logging.INFO
            log.log(level, "NBD client %s: NBD_OPT_EXPORT_NAME refused: %s", self._peer(), shorten(str(e)))
            self.stream.close()  # no way to report an error for this option
            return False
        info = export.info()
        flags = transmission_flags(info, self.structured)
        msg = wire.EXPORT_NAME_REPLY.pack(info.size, flags)
        self.stream.write(msg if self.no_zeroes else msg + wire.ZERO_PAD)
        return self._session(export, info, flags)

    def _session(self, export: Export, info: ExportInfo, flags: int) -> Session:
        return Session(
            export=export,
            flags=flags,
            structured=self.structured,
            allocation_context=ALLOCATION_CONTEXT_ID
            if self.structured and self.meta_export == export.name
            else None,
            max_block_size=block_sizes(info, self.options.max_payload)[2],
        )

    @staticmethod
    def _parse_name(data: bytes, pos: int = 0) -> tuple[str, int]:
        if len(data) < pos + 4:
            raise _OptionError(Rep.ERR_INVALID, "option data too short")
        (n,) = wire.U32.unpack_from(data, pos)
        pos += 4
        if n > MAX_STRING or len(data) < pos + n:
            raise _OptionError(Rep.ERR_INVALID, "bad string length in option data")
        try:
            return data[pos : pos + n].decode(), pos + n
        except UnicodeDecodeError:
            raise _OptionError(Rep.ERR_INVALID, "string is not UTF-8") from None

    async def _info_or_go(self, opt: int, data: bytes) -> Session | None:
        name, pos = self._parse_name(data)
        if len(data) < pos + 2:
            raise _OptionError(Rep.ERR_INVALID, "option data too short")
        (nreq,) = wire.U16.unpack_from(data, pos)
        pos += 2
        if len(data) != pos + 2 * nreq:
            raise _OptionError(Rep.ERR_INVALID, "information request count does not match length")
        requests = {wire.U16.unpack_from(data, pos + 2 * i)[0] for i in range(nreq)}
        name = self._resolve_name(name)
        export: Export | None = None
        try:
            if opt == Opt.GO:
                export = await self._open(name)
                info = export.info()
            else:
                info = await self._call(self.provider.describe, name)
        except NotExist:
            raise _OptionError(Rep.ERR_UNKNOWN, f"no export named {name!r}") from None
        except Locked as e:
            # ERR_POLICY, not ERR_UNKNOWN: libnbd reports UNKNOWN as "server has no export
            # named ..." and qemu as "Requested export not available", both misleading for a
            # volume that exists but is held elsewhere; for POLICY qemu prints "Denied by
            # server" plus our message, libnbd "server policy prevents NBD_OPT_GO" (and our
            # message in its debug output).
            log.warning(
                "NBD client %s refused export %s: %s", self._peer(), shorten(repr(name)), shorten(str(e))
            )
            raise _OptionError(Rep.ERR_POLICY, str(e)) from None
        except TorusError as e:
            raise self._unavailable(name, e) from None
        flags = transmission_flags(info, self.structured)
        self._reply(opt, Rep.INFO, wire.info_export(info.size, flags))
        if Info.NAME in requests:
            self._reply(opt, Rep.INFO, wire.info_name(info.name))
        if Info.DESCRIPTION in requests and info.description:
            self._reply(opt, Rep.INFO, wire.info_description(info.description))
        self._reply(opt, Rep.INFO, wire.info_block_size(*block_sizes(info, self.options.max_payload)))
        self._reply(opt, Rep.ACK)
        if export is None:
            return None
        return self._session(export, info, flags)

    def _unavailable(self, name: str, e: TorusError) -> _OptionError:
        """The refusal of an export that exists (or may) but cannot be opened now, e.g. while
        the metadata service is unreachable: ERR_POLICY with the reason, not ERR_UNKNOWN, which
        clients print as "no export named ..." (see the Locked case); logged, rate-limited."""
        log.warning(
            "NBD client %s: export %s is not available: %s",
            self._peer(),
            shorten(repr(name)),
            shorten(str(e)),
        )
        return _OptionError(Rep.ERR_POLICY, f"export {name!r} is not available now: {e}")

    async def _list(self, data: bytes) -> None:
        if data:
            raise _OptionError(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        for name in await self._call(self.provider.list_exports):
            raw = name.encode()
            self._reply(Opt.LIST, Rep.SERVER, wire.U32.pack(len(raw)) + raw)
        self._reply(Opt.LIST, Rep.ACK)

    async def _meta_context(self, opt: int, data: bytes) -> None:
        if opt == Opt.SET_META_CONTEXT and not self.structured:
            raise _OptionError(Rep.ERR_INVALID, "negotiate structured replies first")
        name, pos = self._parse_name(data)
        if len(data) < pos + 4:
            raise _OptionError(Rep.ERR_INVALID, "option data too short")
        (nq,) = wire.U32.unpack_from(data, pos)
        pos += 4
        queries: list[str] = []
        for _ in range(nq):
            q, pos = self._parse_name(data, pos)
            queries.append(q)
        if pos != len(data):
            raise _OptionError(Rep.ERR_INVALID, "trailing bytes in option data")
        name = self._resolve_name(name)
        try:
            await self._call(self.provider.describe, name)
        except NotExist:
            raise _OptionError(Rep.ERR_UNKNOWN, f"no export named {name!r}") from None
        except TorusError as e:
            raise self._unavailable(name, e) from None
        reply = wire.U32.pack(ALLOCATION_CONTEXT_ID) + BASE_ALLOCATION.encode()
        if opt == Opt.LIST_META_CONTEXT:
            if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
                self._reply(opt, Rep.META_CONTEXT, reply)
        else:
            self.meta_export = None
            if BASE_ALLOCATION in queries:
                self.meta_export = name
                self._reply(opt, Rep.META_CONTEXT, reply)
        self._reply(opt, Rep.ACK)
