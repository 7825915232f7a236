"""A low-latency peer channel: length-prefixed frames over TCP (or TLS).

An NBD FLUSH on a cluster volume is one journal append to R peers. Python gRPC's per-call
overhead (about 1 ms and ~470 us of CPU per unary call here) dwarfs the peer's ``fdatasync``, so
the appends travel over this channel instead, next to the peer's gRPC server, which stays the
fallback and serves everything else (docs/durability.md, "The journal channel"). Reads of
remote blocks (a 4 KiB range, a page CRC table, a whole block) take the same channel when the
server has a block store: one framed round trip instead of a gRPC call, and so do
replication writes (PUT, FLUSH: the gRPC ``PutBlocks`` / ``Flush`` semantics, the same
``boot_id``).

Frames (all integers little-endian)::

    request  length u32 | op u8 | payload         length = 1 + len(payload) <= MAX_FRAME
    reply    length u32 | status u8 | message    length = 1 + len(message)

    op APPEND (1): volume_id u64 | epoch u64 | n u32 | n x (len u32 | encoded record)
                   -> OK, empty message, once every record is durable (JournalStore.append)
    op FENCE  (2): volume_id u64 | epoch u64               -> OK, message = last_seq u64
    op TRIM   (3): volume_id u64 | epoch u64 | through u64 -> OK, message = removed u32
    op AUTH   (4): proof (32 bytes) | caller (UTF-8)       -> OK, or UNAUTHENTICATED and close
    op GET    (5): ref (24 bytes) | offset u32 | length u32 | page_size u32
                   -> OK, message = the block (length 0), bytes [offset, offset + length), or
                      (page_size > 0) the block's page CRC table, as gRPC ``GetBlock`` answers
    op PUT    (6): flags u8 (1 defer_flush, 2 repair) | n u32 | n x (ref (24 bytes) | len u32 |
                   data, trailing zeros may be cut: the store pads them back)
                   -> OK, message = written u32 | boot_id (UTF-8), as gRPC ``PutBlocks``
    op FLUSH  (7): (empty)                                 -> OK, message = boot_id (UTF-8)

    status OK (0) | STALE_EPOCH (1) | INVALID (2) | ERROR (3) | UNAUTHENTICATED (4) |
    REFUSED (5) | HELLO (6) | TYPED (7); a non-OK message is UTF-8 text, for TYPED the torus
    error's class name, a newline, then the text (:func:`~torus_core.rpc.status.wire_name`).

**Membership** (a server with a cluster key, :mod:`torus_core.rpc.auth`): the server opens each
connection with a HELLO reply whose message is a random 32-byte challenge; the client's first
request must be AUTH with ``HMAC-SHA256(key, "torus-journal-v1" | challenge | caller)``. Until
then the server reads nothing larger than an AUTH frame, and it closes a connection that sends
anything else, a wrong proof, or nothing within :data:`HANDSHAKE_TIMEOUT`.

**Timeouts and bounds** (server): :data:`HANDSHAKE_TIMEOUT` for TLS + AUTH,
``idle_timeout`` between requests (the client re-dials a connection closed while idle), and
``frame_timeout`` for each read of a request once its header arrived; at most
:data:`MAX_CONNECTIONS` connections, :data:`MAX_CONNECTIONS_PER_CALLER` per authenticated
caller. Volume ids must be ``1..VOLUME_MAX`` (INVALID otherwise, before the store sees them),
and with a :class:`~torus_core.rpc.guard.ReplicaGuard` requests no honest writer sends get
REFUSED.

A client raises :class:`~torus_core.errors.StaleEpoch` for STALE_EPOCH,
:class:`~torus_core.errors.InvalidArgument` for INVALID,
:class:`~torus_core.errors.ReplicaRefused` for REFUSED,
:class:`~torus_core.errors.Unauthenticated` for UNAUTHENTICATED, :class:`ChannelError` for
ERROR and :class:`~torus_core.errors.PeerUnavailable` (:class:`ChannelRefused` when the
connection was refused) when the peer cannot be reached or does not answer within the timeout.

The server runs one thread per accepted connection and answers a connection's requests in
order, so a client may pipeline. A frame that is not well formed (length out of range, unknown
op, payload that does not parse) gets INVALID and the connection is closed; records the store
refuses get INVALID or STALE_EPOCH and the connection stays open. With a
:class:`~torus_core.rpc.tls.TLSConfig` both ends use the peer RPC's certificates (the server
requires a client certificate when ``require_client_cert``); without one, only loopback
addresses are allowed unless ``allow_insecure``, as for gRPC.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, cast

from torus_core.blockstore import BlockStore
from torus_core.errors import (
    ConfigError,
    InvalidArgument,
    NotSupported,
    PeerUnavailable,
    ProtocolError,
    ReplicaRefused,
    StaleEpoch,
    TorusError,
    Unauthenticated,
)
from torus_core.journal.record import MAX_BODY
from torus_core.journal.store import JournalStore
from torus_core.refs import VOLUME_MAX, BlockRef
from torus_core.rpc.auth import (
    CHALLENGE_BYTES,
    ClusterKey,
    PeerAuth,
    channel_proof,
    check_caller,
    check_channel_proof,
)
from torus_core.rpc.guard import ReplicaGuard
from torus_core.rpc.server import write_replacing_corrupt
from torus_core.rpc.status import error_by_name, wire_name
from torus_core.rpc.tls import TLSConfig, check_insecure_allowed, split_host_port
from torus_core.rpc.wire import trim_zeros as _trim_zeros

log = logging.getLogger(__name__)

OP_APPEND = 1
OP_FENCE = 2
OP_TRIM = 3
OP_AUTH = 4
OP_GET = 5
OP_PUT = 6
OP_FLUSH = 7
PUT_DEFER_FLUSH = 1
PUT_REPAIR = 2

OK = 0
STALE_EPOCH = 1
INVALID = 2
ERROR = 3
UNAUTHENTICATED = 4
REFUSED = 5
HELLO = 6
TYPED = 7

#: Largest ``length`` of a frame either way: a 64 MiB batch plus room for headers.
MAX_FRAME = MAX_BODY + 64 * 1024
#: Seconds a server gives a new connection to finish its TLS handshake and AUTH.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a server keeps a connection that sends no request.
IDLE_TIMEOUT = 300.0
#: Seconds a server waits for each read of a request whose header it has.
FRAME_TIMEOUT = 30.0
#: Connections one server serves at once (more are closed on accept).
MAX_CONNECTIONS = 256
#: Connections one authenticated caller may hold (more are refused after AUTH).
MAX_CONNECTIONS_PER_CALLER = 64
#: Largest AUTH frame (a proof and a caller name).
MAX_AUTH_FRAME = 1 + 32 + 128

_HEAD = struct.Struct("<IB")
_VOL_EPOCH = struct.Struct("<QQI")
_FENCE = struct.Struct("<QQ")
_TRIM = struct.Struct("<QQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_GET = struct.Struct("<III")
_PUT_HEAD = struct.Struct("<BI")
_PUT_ITEM = struct.Struct("<24sI")
#: Replies at least this long are sent as header then body (no concatenated copy).
_SPLIT_REPLY = 64 * 1024


class ChannelError(TorusError):
    """The peer answered a journal channel request with ERROR (e.g. a disk error)."""


class ChannelRefused(PeerUnavailable):
    """The journal channel refused a new connection: nothing listens at its address, the TLS
    handshake failed, or the peer closed it before answering the first request. The request
    did not reach the store (or, at worst, was stored and may be sent again harmlessly), so the
    caller may try the peer's gRPC service instead."""


class _Malformed(Exception):
    """A request frame that does not parse: answered with INVALID, then the connection closes."""


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise InvalidArgument(f"journal {name} must be a u64, got {value!r}")


def encode_append(volume_id: int, epoch: int, payloads: Sequence[bytes]) -> bytes:
    """The whole APPEND request frame (encode once, send to every replica)."""
    _check_u64("volume id", volume_id)
    _check_u64("epoch", epoch)
    parts = [b"", _VOL_EPOCH.pack(volume_id, epoch, len(payloads))]
    length = 1 + _VOL_EPOCH.size
    for p in payloads:
        parts.append(_U32.pack(len(p)))
        parts.append(p)
        length += 4 + len(p)
    if length > MAX_FRAME:
        raise InvalidArgument(f"journal append of {length} bytes exceeds the channel's {MAX_FRAME}")
    parts[0] = _HEAD.pack(length, OP_APPEND)
    return b"".join(parts)


def _check_volume_id(volume_id: int) -> None:
    if not 0 < volume_id <= VOLUME_MAX:
        raise InvalidArgument(f"bad journal volume id {volume_id} (must be 1..{VOLUME_MAX})")


def _frame(op: int, payload: bytes) -> bytes:
    return _HEAD.pack(1 + len(payload), op) + payload


def _decode_append(payload: bytes) -> tuple[int, int, list[bytes]]:
    if len(payload) < _VOL_EPOCH.size:
        raise _Malformed("APPEND payload shorter than its header")
    volume_id, epoch, n = _VOL_EPOCH.unpack_from(payload)
    pos = _VOL_EPOCH.size
    if n > (len(payload) - pos) // 4:
        raise _Malformed(f"APPEND announces {n} records in {len(payload)} bytes")
    records: list[bytes] = []
    for _ in range(n):
        if pos + 4 > len(payload):
            raise _Malformed("APPEND record length past the end of the frame")
        (size,) = _U32.unpack_from(payload, pos)
        pos += 4
        if pos + size > len(payload):
            raise _Malformed("APPEND record past the end of the frame")
        records.append(payload[pos : pos + size])
        pos += size
    if pos != len(payload):
        raise _Malformed(f"{len(payload) - pos} stray bytes after the APPEND records")
    return volume_id, epoch, records


def _server_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        ctx.load_verify_locations(tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"journal channel TLS: cannot load certificates: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def _client_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(tls.ca_file)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"journal channel TLS: cannot load certificates: {exc}") from exc
    return ctx


class JournalChannelServer:
    """Serves a :class:`~torus_core.journal.store.JournalStore` over the journal channel.

    :param journal: the store appends, fences and trims go to.
    :param store: the block store GET reads and PUT writes (None: both answer NotSupported).
    :param boot_id: what PUT and FLUSH report (the peer's gRPC server's, so a client may mix
        the two transports and still tell a restart).
    :param on_put: called with the refs of every stored PUT batch.
    :param host: address to bind (the peer RPC's host).
    :param port: port to bind (0: any free port).
    :param tls: serve TLS with these certificates (None: plaintext, loopback only unless
        ``allow_insecure``).
    :param allow_insecure: allow plaintext on a non-loopback address.
    :param auth: the cluster key every connection must prove (None: no AUTH, for tests of the
        bare channel; a :class:`~torus_core.cluster.node.ClusterNode` always passes one).
    :param guard: refuses requests no honest writer sends.
    :param idle_timeout: seconds a connection may stay without a request.
    :param frame_timeout: seconds each read of a started request may take.
    """

    def __init__(
        self,
        journal: JournalStore,
        *,
        store: BlockStore | None = None,
        boot_id: str = "",
        on_put: Callable[[list[BlockRef]], None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSConfig | None = None,
        allow_insecure: bool = False,
        auth: ClusterKey | None = None,
        guard: ReplicaGuard | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        frame_timeout: float = FRAME_TIMEOUT,
    ) -> None:
        for name, value in (("idle", idle_timeout), ("frame", frame_timeout)):
            if not isinstance(value, int | float) or not value > 0:
                raise InvalidArgument(f"journal channel {name} timeout must be positive, got {value!r}")
        if tls is None:
            check_insecure_allowed(
                f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", allow_insecure
            )
        self.journal = journal
        self.store = store
        self.boot_id = boot_id
        self.on_put = on_put
        self.host = host
        self.tls = tls
        self.auth = auth
        self.guard = guard
        self.idle_timeout = float(idle_timeout)
        self.frame_timeout = float(frame_timeout)
        self._per_caller: dict[str, int] = {}
        self._ssl = _server_context(tls) if tls is not None else None
        self._port = port
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        #: requests answered, by status (for tests and debugging)
        self.answered = [0] * (TYPED + 1)
        #: GET and PUT requests served (for tests and debugging)
        self.gets = 0
        self.puts = 0

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._listener is None:
            raise TorusError("journal channel server not started")
        return int(self._listener.getsockname()[1])

    @property
    def address(self) -> str:
        """``host:port`` clients dial (after :meth:`start`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> JournalChannelServer:
        """Bind, listen and start accepting in a daemon thread."""
        if self._listener is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(64)
            sock.settimeout(0.25)  # the accept loop looks at the stop flag this often
        except OSError as exc:
            sock.close()
            raise ConfigError(f"journal channel cannot listen on {self.host}:{self._port}: {exc}") from exc
        self._listener = sock
        self._thread = threading.Thread(target=self._accept_loop, name="torus-journal-chan", daemon=True)
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopped.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopped.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            with self._lock:
                if self._stopped.is_set() or len(self._conns) >= MAX_CONNECTIONS:
                    sock.close()
                    continue
                self._conns.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="torus-journal-conn", daemon=True).start()

    def _authenticate(self, sock: socket.socket, rfile: BinaryIO) -> str | None:
        """Challenge the client and check its AUTH; the caller's name, or None (connection refused)."""
        assert self.auth is not None
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        self._reply(sock, HELLO, challenge)
        head = rfile.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return None
        length, op = _HEAD.unpack(head)
        if op != OP_AUTH or not 1 + 32 < length <= MAX_AUTH_FRAME:
            self._reply(sock, UNAUTHENTICATED, "journal channel: the first request must be AUTH")
            _linger(sock)
            return None
        payload = rfile.read(length - 1)
        if len(payload) < length - 1:
            return None
        proof, caller = payload[:32], payload[32:].decode("utf-8", "replace")
        try:
            check_channel_proof(self.auth, challenge, caller, proof)
        except Unauthenticated as exc:
            self._reply(sock, UNAUTHENTICATED, str(exc))
            _linger(sock)
            return None
        with self._lock:
            if self._per_caller.get(caller, 0) >= MAX_CONNECTIONS_PER_CALLER:
                busy = True
            else:
                busy = False
                self._per_caller[caller] = self._per_caller.get(caller, 0) + 1
        if busy:
            self._reply(sock, ERROR, f"caller {caller} already has {MAX_CONNECTIONS_PER_CALLER} connections")
            return None
        self._reply(sock, OK, b"")
        return caller

    def _serve(self, raw: socket.socket) -> None:
        sock: socket.socket = raw
        caller: str | None = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            raw.settimeout(HANDSHAKE_TIMEOUT)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(raw, server_side=True)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            rfile = cast(BinaryIO, sock.makefile("rb", buffering=256 * 1024))
            try:
                if self.auth is not None:
                    caller = self._authenticate(sock, rfile)
                    if caller is None:
                        return
                while not self._stopped.is_set():
                    sock.settimeout(self.idle_timeout)
                    head = rfile.read(_HEAD.size)
                    if len(head) < _HEAD.size:
                        return  # the client closed (or cut a header short)
                    sock.settimeout(self.frame_timeout)
                    length, op = _HEAD.unpack(head)
                    if not 1 <= length <= MAX_FRAME:
                        self._reply(sock, INVALID, f"frame length {length} out of range 1..{MAX_FRAME}")
                        return
                    payload = rfile.read(length - 1)
                    if len(payload) < length - 1:
                        return
                    try:
                        status, message = self._handle(op, payload)
                    except _Malformed as exc:
                        self._reply(sock, INVALID, f"malformed frame: {exc}")
                        return
                    self._reply(sock, status, message)
            finally:
                rfile.close()
        except (OSError, ValueError) as exc:  # resets, TLS failures, timeouts, a socket closed by stop()
            if not self._stopped.is_set():
                log.debug("journal channel connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(raw)
                if caller is not None:
                    left = self._per_caller.get(caller, 1) - 1
                    if left > 0:
                        self._per_caller[caller] = left
                    else:
                        self._per_caller.pop(caller, None)
            with contextlib.suppress(OSError):
                sock.close()
            with contextlib.suppress(OSError):
                raw.close()

    def _reply(self, sock: socket.socket, status: int, message: bytes | str) -> None:
        body = message.encode("utf-8", "replace") if isinstance(message, str) else message
        if len(body) >= _SPLIT_REPLY:
            sock.sendall(_HEAD.pack(1 + len(body), status))
            sock.sendall(body)
        else:
            sock.sendall(_HEAD.pack(1 + len(body), status) + body)
        self.answered[status] += 1

    def _get(self, payload: bytes) -> bytes:
        """Answer GET: a whole block, a range of one (unverified, as ``read_block_range``) or
        its page CRC table."""
        if len(payload) != BlockRef.SIZE + _GET.size:
            raise _Malformed(f"GET payload is not {BlockRef.SIZE + _GET.size} bytes")
        store = self.store
        if store is None:
            raise NotSupported("this peer's channel serves no block store")
        ref = BlockRef.from_bytes(payload[: BlockRef.SIZE])
        offset, length, page_size = _GET.unpack_from(payload, BlockRef.SIZE)
        self.gets += 1
        if page_size:
            return store.page_crcs(ref, page_size)
        if length == 0:
            if offset:
                raise InvalidArgument(f"GET offset {offset} without a length")
            return store.get_block(ref)
        bs = store.block_size
        if offset + length > bs:
            raise InvalidArgument(f"GET range [{offset}, {offset + length}) exceeds the block size {bs}")
        return store.read_block_range(ref, offset, length)

    def _put(self, payload: bytes) -> bytes:
        """Answer PUT: store the batch (replacing corrupt copies with ``repair``), flush unless
        deferred, reply ``written | boot_id``."""
        if len(payload) < _PUT_HEAD.size:
            raise _Malformed("PUT payload shorter than its header")
        flags, n = _PUT_HEAD.unpack_from(payload)
        view = memoryview(payload)
        pos = _PUT_HEAD.size
        if n > (len(payload) - pos) // _PUT_ITEM.size:
            raise _Malformed(f"PUT announces {n} blocks in {len(payload)} bytes")
        batch: list[tuple[BlockRef, memoryview]] = []
        for _ in range(n):
            if pos + _PUT_ITEM.size > len(payload):
                raise _Malformed("PUT block header past the end of the frame")
            raw_ref, size = _PUT_ITEM.unpack_from(payload, pos)
            pos += _PUT_ITEM.size
            if pos + size > len(payload):
                raise _Malformed("PUT block past the end of the frame")
            batch.append((BlockRef.from_bytes(raw_ref), view[pos : pos + size]))
            pos += size
        if pos != len(payload):
            raise _Malformed(f"{len(payload) - pos} stray bytes after the PUT blocks")
        store = self.store
        if store is None:
            raise NotSupported("this peer's channel serves no block store")
        if self.guard is not None:
            self.guard.check_block_volumes(ref.volume for ref, _ in batch)
        self.puts += 1
        try:
            for ref, data in batch:
                if flags & PUT_REPAIR:
                    write_replacing_corrupt(store, ref, data)
                else:
                    store.write_block(ref, data)
        finally:
            if not flags & PUT_DEFER_FLUSH:
                store.flush()  # durable whatever was written, even on a partial failure
        if self.on_put is not None and batch:
            self.on_put([ref for ref, _ in batch])
        return _U32.pack(len(batch)) + self.boot_id.encode()

    def _flush(self) -> bytes:
        if self.store is None:
            raise NotSupported("this peer's channel serves no block store")
        self.store.flush()
        return self.boot_id.encode()

    def _handle(self, op: int, payload: bytes) -> tuple[int, bytes | str]:
        guard = self.guard
        try:
            if op == OP_APPEND:
                volume_id, epoch, records = _decode_append(payload)
                _check_volume_id(volume_id)
                if guard is not None:
                    guard.check_append(volume_id, records)
                self.journal.append(volume_id, epoch, records)
                return OK, b""
            if op == OP_FENCE:
                if len(payload) != _FENCE.size:
                    raise _Malformed("FENCE payload is not 16 bytes")
                volume_id, epoch = _FENCE.unpack(payload)
                _check_volume_id(volume_id)
                if guard is not None:
                    guard.check_fence(volume_id, epoch)
                return OK, _U64.pack(self.journal.fence(volume_id, epoch))
            if op == OP_TRIM:
                if len(payload) != _TRIM.size:
                    raise _Malformed("TRIM payload is not 24 bytes")
                volume_id, epoch, through = _TRIM.unpack(payload)
                _check_volume_id(volume_id)
                if guard is not None:
                    guard.check_trim(volume_id, through)
                return OK, _U32.pack(min(self.journal.trim(volume_id, epoch, through), (1 << 32) - 1))
            if op == OP_GET:
                return OK, self._get(payload)
            if op == OP_PUT:
                return OK, self._put(payload)
            if op == OP_FLUSH:
                if payload:
                    raise _Malformed("FLUSH takes no payload")
                return OK, self._flush()
            raise _Malformed(f"unknown op {op}")
        except StaleEpoch as exc:
            return STALE_EPOCH, str(exc)
        except ReplicaRefused as exc:
            return REFUSED, str(exc)
        except InvalidArgument as exc:
            return INVALID, str(exc)
        except _Malformed:
            raise
        except TorusError as exc:
            name = wire_name(exc)
            if name is not None:  # e.g. BlockNotExist, CorruptBlock: the client rebuilds the type
                return TYPED, f"{name}\n{exc}"
            log.warning("journal channel op %d failed: %s", op, exc)
            return ERROR, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a disk error, a closed store: the client hands off
            log.warning("journal channel op %d failed: %s", op, exc)
            return ERROR, f"{type(exc).__name__}: {exc}"

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, close every connection, wait (bounded) for the accept thread."""
        self._stopped.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> JournalChannelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class JournalChannelClient:
    """Client of one peer's journal channel; thread-safe.

    Keeps idle connections open: each call takes one (or dials a new one), so concurrent
    callers (one per writer thread) each have their own and a connection carries one request
    at a time. A connection that failed is closed; the next call dials afresh. A request on a
    reused connection that the peer closed while idle (e.g. it restarted) is sent once more on
    a new connection (an APPEND stored twice is harmless: replay merges duplicates by
    sequence number).

    :param address: ``host:port`` of the peer's channel.
    :param tls: client certificates (the peer RPC's); None: plaintext, loopback only unless
        ``allow_insecure``.
    :param timeout: default seconds a call may take, connecting included.
    :param auth: the cluster credential each new connection proves (None: no AUTH).
    """

    def __init__(
        self,
        address: str,
        *,
        tls: TLSConfig | None = None,
        allow_insecure: bool = False,
        timeout: float = 5.0,
        auth: PeerAuth | None = None,
    ) -> None:
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidArgument(f"journal channel timeout must be positive, got {timeout!r}")
        self.host, self.port = split_host_port(address)
        self.address = address
        if tls is None:
            check_insecure_allowed(address, allow_insecure)
        self.tls = tls
        self.auth = auth
        self._ssl = _client_context(tls) if tls is not None else None
        self.timeout = float(timeout)
        #: largest PUT batch a caller should send in one request
        self.max_message_bytes = MAX_BODY
        self._idle: list[socket.socket] = []
        self._closed = False

    def _connect(self, deadline: float) -> socket.socket:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerUnavailable(f"journal channel {self.address}: timed out", address=self.address)
        try:
            sock = socket.create_connection((self.host, self.port), timeout=remaining)
        except ConnectionRefusedError as exc:
            raise ChannelRefused(f"journal channel {self.address}: {exc}", address=self.address) from exc
        except OSError as exc:
            raise PeerUnavailable(f"journal channel {self.address}: {exc}", address=self.address) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                name = self.tls.server_name if self.tls is not None and self.tls.server_name else self.host
                sock = self._ssl.wrap_socket(sock, server_hostname=name)
        except ssl.SSLError as exc:
            sock.close()
            raise ChannelRefused(f"journal channel {self.address}: TLS: {exc}", address=self.address) from exc
        except (OSError, ValueError) as exc:
            sock.close()
            raise PeerUnavailable(
                f"journal channel {self.address}: TLS: {exc}", address=self.address
            ) from exc
        if self.auth is not None:
            try:
                self._prove(sock, self.auth, deadline)
            except BaseException:
                sock.close()
                raise
        return sock

    def _prove(self, sock: socket.socket, auth: PeerAuth, deadline: float) -> None:
        """Answer the server's challenge (see the module docstring)."""
        try:
            status, challenge = self._read_reply(sock, deadline)
            if status != HELLO or len(challenge) != CHALLENGE_BYTES:
                raise ChannelRefused(
                    f"journal channel {self.address}: no membership challenge (status {status})",
                    address=self.address,
                )
            caller = check_caller(auth.caller).encode()
            sock.sendall(_frame(OP_AUTH, channel_proof(auth.key, challenge, auth.caller) + caller))
            status, message = self._read_reply(sock, deadline)
        except _IdleClosed as exc:
            raise ChannelRefused(f"journal channel {self.address}: {exc}", address=self.address) from None
        except (OSError, ValueError) as exc:
            raise ChannelRefused(
                f"journal channel {self.address}: AUTH: {exc}", address=self.address
            ) from exc
        if status == UNAUTHENTICATED:
            raise Unauthenticated(
                f"journal channel {self.address}: {message.decode('utf-8', 'replace')}", address=self.address
            )
        if status != OK:
            raise ChannelRefused(
                f"journal channel {self.address}: AUTH: {message.decode('utf-8', 'replace')}",
                address=self.address,
            )

    def call(self, frame: bytes | Sequence[bytes | memoryview], *, timeout: float | None = None) -> bytes:
        """Send one request frame (or its parts, sent in order without joining them); returns
        the OK reply's message (typed errors otherwise)."""
        if self._closed:
            raise PeerUnavailable(f"journal channel {self.address}: client closed", address=self.address)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reused = True
            try:
                sock = self._idle.pop()
            except IndexError:
                reused = False
                sock = self._connect(deadline)
            try:
                status, message = self._exchange(sock, frame, deadline)
            except _Challenged as exc:
                sock.close()
                raise Unauthenticated(
                    f"journal channel {self.address}: {exc}", address=self.address
                ) from None
            except _IdleClosed as exc:
                sock.close()
                if reused:
                    continue  # the peer closed it while idle: once more on a new connection
                raise ChannelRefused(f"journal channel {self.address}: {exc}", address=self.address) from None
            except ssl.SSLError as exc:  # e.g. TLS 1.3: the server refused our certificate
                sock.close()
                kind = PeerUnavailable if reused else ChannelRefused
                raise kind(f"journal channel {self.address}: TLS: {exc}", address=self.address) from exc
            except (OSError, ValueError) as exc:
                sock.close()
                what = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                raise PeerUnavailable(
                    f"journal channel {self.address}: {what}", address=self.address
                ) from exc
            if self._closed:
                sock.close()
            else:
                self._idle.append(sock)
            if status == OK:
                return message
            text = message.decode("utf-8", "replace")
            if status == STALE_EPOCH:
                raise StaleEpoch(text)
            if status == INVALID:
                raise InvalidArgument(f"journal channel {self.address}: {text}")
            if status == REFUSED:
                raise ReplicaRefused(f"journal channel {self.address}: {text}")
            if status == UNAUTHENTICATED:
                raise Unauthenticated(f"journal channel {self.address}: {text}", address=self.address)
            if status == TYPED:
                name, _, detail = text.partition("\n")
                raise error_by_name(name, f"peer channel {self.address}: {detail}", self.address)
            raise ChannelError(f"journal channel {self.address}: {text}")

    def _exchange(
        self, sock: socket.socket, frame: bytes | Sequence[bytes | memoryview], deadline: float
    ) -> tuple[int, bytes]:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            if isinstance(frame, bytes):
                sock.sendall(frame)
            else:
                for part in frame:
                    sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError) as exc:
            if self.auth is None and _was_challenged(sock):
                raise _Challenged("the peer demands a cluster credential and this client has none") from None
            raise _IdleClosed(str(exc)) from None
        status, message = self._read_reply(sock, deadline)
        if status == HELLO:
            raise _Challenged("the peer demands a cluster credential and this client has none")
        return status, message

    def _read_reply(self, sock: socket.socket, deadline: float) -> tuple[int, bytes]:
        head = _recv_exact(sock, _HEAD.size, deadline, first=True)
        length, status = _HEAD.unpack(head)
        if not 1 <= length <= MAX_FRAME or status > TYPED:
            raise ValueError(f"bad reply frame (length {length}, status {status})")
        return status, _recv_exact(sock, length - 1, deadline) if length > 1 else b""

    def append_encoded(self, frame: bytes, *, timeout: float | None = None) -> None:
        """APPEND a frame made by :func:`encode_append`; returns once the records are durable."""
        self.call(frame, timeout=timeout)

    def append(
        self, volume_id: int, epoch: int, payloads: Sequence[bytes], *, timeout: float | None = None
    ) -> None:
        """Append encoded records (one batch, one ``fdatasync`` on the peer)."""
        self.call(encode_append(volume_id, epoch, payloads), timeout=timeout)

    def fence(self, volume_id: int, epoch: int, *, timeout: float | None = None) -> int:
        """Raise the volume's epoch on the peer; returns the highest sequence number it stores."""
        _check_u64("volume id", volume_id)
        _check_u64("epoch", epoch)
        reply = self.call(_frame(OP_FENCE, _FENCE.pack(volume_id, epoch)), timeout=timeout)
        if len(reply) != _U64.size:
            raise PeerUnavailable(f"journal channel {self.address}: bad FENCE reply", address=self.address)
        return int(_U64.unpack(reply)[0])

    def trim(self, volume_id: int, epoch: int, through_seq: int, *, timeout: float | None = None) -> int:
        """Let the peer drop records ``<= through_seq``; returns how many segments it removed."""
        for name, v in (("volume id", volume_id), ("epoch", epoch), ("sequence number", through_seq)):
            _check_u64(name, v)
        reply = self.call(_frame(OP_TRIM, _TRIM.pack(volume_id, epoch, through_seq)), timeout=timeout)
        if len(reply) != _U32.size:
            raise PeerUnavailable(f"journal channel {self.address}: bad TRIM reply", address=self.address)
        return int(_U32.unpack(reply)[0])

    def _get(self, ref: BlockRef, offset: int, length: int, page_size: int, timeout: float | None) -> bytes:
        return self.call(
            _frame(OP_GET, ref.to_bytes() + _GET.pack(offset, length, page_size)), timeout=timeout
        )

    def get_block(self, ref: BlockRef, *, timeout: float | None = None) -> bytes:
        """Read one block from the peer (verified by the peer's store)."""
        return self._get(ref, 0, 0, 0, timeout)

    def get_block_range(
        self, ref: BlockRef, start: int, length: int, *, timeout: float | None = None
    ) -> bytes:
        """Bytes ``[start, start + length)`` of a block, **unverified** by the peer (as
        :meth:`~torus_core.rpc.client.PeerClient.get_block_range`)."""
        if type(start) is not int or type(length) is not int or start < 0 or length <= 0:
            raise InvalidArgument(f"bad block range start={start!r} length={length!r}")
        if start + length > 0xFFFFFFFF:
            raise InvalidArgument(f"block range end {start + length} does not fit the protocol")
        data = self._get(ref, start, length, 0, timeout)
        if len(data) != length:
            raise ProtocolError(f"peer channel {self.address} returned {len(data)} bytes for {length}")
        return data

    def get_block_page_crcs(
        self, ref: BlockRef, page_size: int, block_size: int, *, timeout: float | None = None
    ) -> bytes:
        """The CRC-32 of each ``page_size`` page of a ``block_size``-byte block, as the peer
        computed them from a read it verified (as
        :meth:`~torus_core.rpc.client.PeerClient.get_block_page_crcs`)."""
        if type(page_size) is not int or not 0 < page_size <= min(block_size, 0xFFFFFFFF):
            raise InvalidArgument(f"bad page size {page_size!r} for a {block_size}-byte block")
        table = self._get(ref, 0, 0, page_size, timeout)
        want = 4 * -(-block_size // page_size)
        if len(table) != want:
            raise ProtocolError(
                f"peer channel {self.address} returned {len(table)} bytes of page CRCs (wanted {want})"
            )
        return table

    def put_blocks_deferred(
        self,
        refs: Sequence[BlockRef],
        blocks: Sequence[bytes | bytearray | memoryview],
        *,
        repair: bool = False,
        defer_flush: bool = True,
        timeout: float | None = None,
        trim: bool = False,
    ) -> tuple[int, str]:
        """Store several blocks (as :meth:`~torus_core.rpc.client.PeerClient.put_blocks_deferred`:
        with ``defer_flush`` the peer does not flush before replying; ``trim`` cuts trailing
        zeros); returns ``(count, boot_id)``."""
        if len(refs) != len(blocks):
            raise InvalidArgument(f"put_blocks got {len(refs)} refs but {len(blocks)} blocks")
        flags = (PUT_DEFER_FLUSH if defer_flush else 0) | (PUT_REPAIR if repair else 0)
        parts: list[bytes | memoryview] = [b"", _PUT_HEAD.pack(flags, len(refs))]
        length = 1 + _PUT_HEAD.size
        for ref, block in zip(refs, blocks, strict=True):
            body = _trim_zeros(block) if trim else block
            view = memoryview(body).cast("B") if not isinstance(body, bytes) else body
            parts.append(_PUT_ITEM.pack(ref.to_bytes(), len(view)))
            parts.append(view)
            length += _PUT_ITEM.size + len(view)
        if length > MAX_FRAME:
            raise InvalidArgument(f"PUT of {length} bytes exceeds the channel's {MAX_FRAME}")
        parts[0] = _HEAD.pack(length, OP_PUT)
        reply = self.call(parts, timeout=timeout)
        if len(reply) < _U32.size:
            raise ProtocolError(f"peer channel {self.address}: bad PUT reply")
        return int(_U32.unpack_from(reply)[0]), reply[_U32.size :].decode("utf-8", "replace")

    def put_blocks(
        self,
        refs: Sequence[BlockRef],
        blocks: Sequence[bytes | bytearray | memoryview],
        *,
        repair: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Store several blocks; returns the count once the peer has flushed them."""
        return self.put_blocks_deferred(refs, blocks, repair=repair, defer_flush=False, timeout=timeout)[0]

    def flush(self, *, timeout: float | None = None) -> str:
        """Make every block the peer stored so far durable; returns its ``boot_id``."""
        return self.call(_frame(OP_FLUSH, b""), timeout=timeout).decode("utf-8", "replace")

    def close(self) -> None:
        """Close the idle connections; later calls raise PeerUnavailable. Idempotent."""
        self._closed = True
        while self._idle:
            try:
                sock = self._idle.pop()
            except IndexError:
                break
            with contextlib.suppress(OSError):
                sock.close()


#: Bytes and seconds a server reads (and drops) from a refused client before it closes.
_LINGER_BYTES = 64 * 1024
_LINGER_SECONDS = 0.5


def _linger(sock: socket.socket) -> None:
    """Half-close, then drop what the client sends (bounded) so that closing does not reset the
    connection before it read the refusal."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER_SECONDS
        got = 0
        while got < _LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(_LINGER_BYTES - got)
            if not chunk:
                break
            got += len(chunk)


class _Challenged(Exception):
    """A client without a cluster key got the server's membership challenge."""


class _IdleClosed(Exception):
    """The peer had closed the connection before this request reached it."""


def _was_challenged(sock: socket.socket) -> bool:
    """Whether the peer's first words on ``sock`` (already received) were a HELLO challenge."""
    try:
        sock.settimeout(0.2)
        head = sock.recv(_HEAD.size)
    except OSError:
        return False
    return len(head) == _HEAD.size and _HEAD.unpack(head)[1] == HELLO


def _recv_exact(sock: socket.socket, n: int, deadline: float, *, first: bool = False) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        try:
            k = sock.recv_into(view[got:])
        except ConnectionResetError as exc:
            if first and got == 0:
                raise _IdleClosed(str(exc)) from None
            raise
        if k == 0:
            if first and got == 0:
                raise _IdleClosed("connection closed by the peer")
            raise ConnectionResetError("connection closed by the peer mid-reply")
        got += k
    return bytes(buf)
