"""The peer RPC server: serves a local :class:`~torus_core.blockstore.BlockStore` over gRPC.

Usage (a storage daemon)::

    server = PeerServer(store, uuid=my_uuid, address="127.0.0.1:40000", tls=tls).start()
    ...advertise server.address...
    server.stop()

Torus errors from the store become gRPC status codes (see :mod:`torus_core.rpc.status`);
``PutBlocks`` and ``PutBlockStream`` flush the store before they reply, so an acknowledged
write is durable -- unless the client sets ``defer_flush`` on ``PutBlocks``; it then sends
``Flush`` before it relies on durability (an NBD FLUSH), which is how the distributor avoids one
fsync per write. Both replies carry the server's ``boot_id`` (random per process), so a client
can tell that a peer restarted between its deferred writes and the flush.

With a cluster key (``auth=``) every call must carry a valid membership token
(:mod:`torus_core.rpc.auth`; refused with ``UNAUTHENTICATED`` before any handler work), and each
caller is bounded (:class:`~torus_core.rpc.auth.CallLimits`). With a
:class:`~torus_core.rpc.guard.ReplicaGuard` the server refuses blocks and journal requests no
honest writer sends (:class:`~torus_core.errors.ReplicaRefused`).
"""

from __future__ import annotations

import logging
import threading
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any, NoReturn, TypeVar, cast

import grpc

from torus_core.blockstore import BlockStore
from torus_core.errors import (
    BlockNotExist,
    ConfigError,
    CorruptBlock,
    InvalidArgument,
    NotSupported,
    TorusError,
)
from torus_core.journal.record import encode_record, record_seq
from torus_core.journal.store import JournalStore
from torus_core.refs import VOLUME_MAX, BlockRef
from torus_core.rpc import torus_storage_pb2 as pb
from torus_core.rpc import torus_storage_pb2_grpc as pb_grpc
from torus_core.rpc.auth import CallLimits, ClusterKey, ServerAuthInterceptor
from torus_core.rpc.guard import ReplicaGuard
from torus_core.rpc.options import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, server_options
from torus_core.rpc.status import ERROR_METADATA_KEY, code_for, wire_name
from torus_core.rpc.tls import TLSConfig, check_insecure_allowed, normalize_address, split_host_port
from torus_core.rpc.wire import PutBlocksMessage, decode_put_blocks

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Optional callback told about refs stored through RPC (e.g. to warn about non-owned blocks).
PutObserver = Callable[[list[BlockRef]], None]

#: Bytes of encoded journal records per ``JournalRead`` stream message (a larger record goes alone).
JOURNAL_READ_CHUNK = 4 * 1024 * 1024


class ServerStats:
    """Thread-safe per-method call counters (``stats["GetBlock"]``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def inc(self, method: str) -> None:
        """Count one call of ``method``."""
        with self._lock:
            self._counts[method] += 1

    def __getitem__(self, method: str) -> int:
        with self._lock:
            return self._counts[method]

    def snapshot(self) -> dict[str, int]:
        """A copy of all counters."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self._counts.clear()


def _abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    name = wire_name(exc)
    if name is not None:
        context.set_trailing_metadata(((ERROR_METADATA_KEY, name),))
    context.abort(code_for(exc), str(exc) or type(exc).__name__)
    raise AssertionError("unreachable")  # context.abort always raises


def write_replacing_corrupt(store: BlockStore, ref: BlockRef, data: bytes | bytearray | memoryview) -> None:
    """Read repair: store ``data`` under ``ref``, first deleting a copy that fails its integrity check.

    A healthy existing copy is kept and the write then behaves as usual (identical content is a
    no-op; different content raises :class:`~torus_core.errors.BlockExists`).
    """
    if store.has_block(ref):
        try:
            store.get_block(ref)
        except CorruptBlock:
            log.warning("replacing corrupt copy of %s", ref)
            try:
                store.delete_block(ref)
            except BlockNotExist:
                pass
        except BlockNotExist:
            pass
    store.write_block(ref, data)


class StorageServicer(pb_grpc.TorusStorageServicer):
    """gRPC handlers over one local block store.

    :param store: the local store blocks are read from and written to.
    :param uuid: this peer's UUID, reported by ``Ping``.
    :param on_put: optional observer called with the refs of every accepted batch.
    :param journal: this peer's volume journal files, served by the ``Journal*`` RPCs (without
        it they answer UNIMPLEMENTED).
    :param guard: refuses requests no honest writer sends (checked against the metadata log).
    """

    def __init__(
        self,
        store: BlockStore,
        *,
        uuid: str = "",
        on_put: PutObserver | None = None,
        journal: JournalStore | None = None,
        guard: ReplicaGuard | None = None,
    ) -> None:
        self.store = store
        self.uuid = uuid
        self.on_put = on_put
        self.journal = journal
        self.guard = guard
        self.stats = ServerStats()
        #: Random per servicer (per process): changes when the peer restarts.
        self.boot_id = uuidlib.uuid4().hex

    def _run(self, context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T:
        self.stats.inc(method)
        try:
            return fn()
        except TorusError as exc:
            log.debug("%s failed: %s", method, exc)
            _abort(context, exc)
        except Exception as exc:  # a store bug must not kill the server thread silently
            log.exception("%s: unexpected error", method)
            _abort(context, exc)

    def GetBlock(self, request: pb.GetBlockRequest, context: grpc.ServicerContext) -> pb.GetBlockResponse:
        """Return one block's bytes, or with ``length`` a range of them (read with
        :meth:`~torus_core.blockstore.BlockStore.read_block_range`: the caller verifies it), or
        with ``page_crcs`` the block's page CRC table
        (:meth:`~torus_core.blockstore.BlockStore.page_crcs`)."""

        def do() -> pb.GetBlockResponse:
            ref = BlockRef.from_bytes(request.ref)
            offset, length = request.offset, request.length
            if request.page_crcs:
                return pb.GetBlockResponse(page_crcs=self.store.page_crcs(ref, request.page_crcs))
            if length == 0:
                if offset:
                    raise InvalidArgument(f"GetBlock offset {offset} without a length")
                return pb.GetBlockResponse(data=self.store.get_block(ref))
            bs = self.store.block_size
            if offset + length > bs:
                raise InvalidArgument(
                    f"GetBlock range [{offset}, {offset + length}) exceeds the block size {bs}"
                )
            return pb.GetBlockResponse(data=self.store.read_block_range(ref, offset, length))

        return self._run(context, "GetBlock", do)

    def _write_batch(
        self, refs: list[bytes], blocks: Sequence[bytes | memoryview], repair: bool = False
    ) -> int:
        if len(refs) != len(blocks):
            raise InvalidArgument(f"PutBlocks got {len(refs)} refs but {len(blocks)} blocks")
        decoded = [BlockRef.from_bytes(r) for r in refs]
        if self.guard is not None:
            self.guard.check_block_volumes(r.volume for r in decoded)
        for ref, data in zip(decoded, blocks, strict=True):
            if repair:
                write_replacing_corrupt(self.store, ref, data)
            else:
                self.store.write_block(ref, data)
        if self.on_put is not None and decoded:
            self.on_put(decoded)
        return len(decoded)

    def PutBlocks(
        self, request: pb.PutBlocksRequest | PutBlocksMessage, context: grpc.ServicerContext
    ) -> pb.PutBlocksResponse:
        """Store a batch, flush (unless ``defer_flush``), then acknowledge. The request comes
        from :func:`~torus_core.rpc.wire.decode_put_blocks` when served by :class:`PeerServer`."""

        def do() -> pb.PutBlocksResponse:
            if isinstance(request, PutBlocksMessage) and request.error:
                raise InvalidArgument(request.error)
            if request.defer_flush:
                written = self._write_batch(list(request.refs), list(request.blocks), request.repair)
                return pb.PutBlocksResponse(written=written, boot_id=self.boot_id)
            try:
                written = self._write_batch(list(request.refs), list(request.blocks), request.repair)
            finally:
                self.store.flush()  # make whatever was written durable, even on a partial failure
            return pb.PutBlocksResponse(written=written, boot_id=self.boot_id)

        return self._run(context, "PutBlocks", do)

    def PutBlockStream(
        self, request_iterator: Iterator[pb.PutBlocksRequest], context: grpc.ServicerContext
    ) -> pb.PutBlocksResponse:
        """Store every batch of the stream, flush once, then acknowledge."""

        def do() -> pb.PutBlocksResponse:
            written = 0
            try:
                for req in request_iterator:
                    written += self._write_batch(list(req.refs), list(req.blocks), req.repair)
            finally:
                self.store.flush()
            return pb.PutBlocksResponse(written=written, boot_id=self.boot_id)

        return self._run(context, "PutBlockStream", do)

    def Flush(self, request: pb.FlushRequest, context: grpc.ServicerContext) -> pb.FlushResponse:
        """Flush the store: every block stored before the call is durable when it returns."""

        def do() -> pb.FlushResponse:
            self.store.flush()
            return pb.FlushResponse(boot_id=self.boot_id)

        return self._run(context, "Flush", do)

    def RebalanceCheck(
        self, request: pb.RebalanceCheckRequest, context: grpc.ServicerContext
    ) -> pb.RebalanceCheckResponse:
        """For each ref, whether the local store has it."""

        def do() -> pb.RebalanceCheckResponse:
            refs = [BlockRef.from_bytes(r) for r in request.refs]
            return pb.RebalanceCheckResponse(has=[self.store.has_block(r) for r in refs])

        return self._run(context, "RebalanceCheck", do)

    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        """Identity and capacity of this peer."""

        def do() -> pb.PingResponse:
            return pb.PingResponse(
                uuid=self.uuid,
                protocol_version=PROTOCOL_VERSION,
                block_size=self.store.block_size,
                total_blocks=self.store.num_blocks(),
                used_blocks=self.store.used_blocks(),
            )

        return self._run(context, "Ping", do)

    # --- volume journal (torus_core.journal) -----------------------------------------------

    def _journal_for(self, volume_id: int) -> JournalStore:
        if self.journal is None:
            raise NotSupported(f"peer {self.uuid} keeps no volume journal")
        if not 0 < volume_id <= VOLUME_MAX:
            raise InvalidArgument(f"bad journal volume id {volume_id}")
        return self.journal

    def JournalFence(
        self, request: pb.JournalFenceRequest, context: grpc.ServicerContext
    ) -> pb.JournalFenceResponse:
        """Record the writer's lock epoch (StaleEpoch if a newer one was seen); returns the
        highest sequence number stored for the volume."""

        def do() -> pb.JournalFenceResponse:
            journal = self._journal_for(request.volume_id)
            if self.guard is not None:
                self.guard.check_fence(request.volume_id, request.epoch)
            return pb.JournalFenceResponse(last_seq=journal.fence(request.volume_id, request.epoch))

        return self._run(context, "JournalFence", do)

    def JournalAppend(
        self, request: pb.JournalAppendRequest, context: grpc.ServicerContext
    ) -> pb.JournalAppendResponse:
        """Append a batch of encoded records (one write + fdatasync), then acknowledge."""

        def do() -> pb.JournalAppendResponse:
            journal = self._journal_for(request.volume_id)
            records = list(request.records)
            if self.guard is not None:
                self.guard.check_append(request.volume_id, records)
            journal.append(request.volume_id, request.epoch, records)
            return pb.JournalAppendResponse(last_seq=record_seq(records[-1]) if records else 0)

        return self._run(context, "JournalAppend", do)

    def JournalRead(
        self, request: pb.JournalReadRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JournalReadResponse]:
        """Stream the volume's records with ``seq > after_seq``, re-encoded, in chunks."""

        def do() -> list[pb.JournalReadResponse]:
            journal = self._journal_for(request.volume_id)
            if self.guard is not None:
                self.guard.check_volume(request.volume_id, "journal read")
            out: list[pb.JournalReadResponse] = []
            chunk: list[bytes] = []
            size = 0
            for r in journal.read(request.volume_id, request.after_seq):
                raw = encode_record(r.volume_id, r.epoch, r.seq, r.extents)
                if chunk and size + len(raw) > JOURNAL_READ_CHUNK:
                    out.append(pb.JournalReadResponse(records=chunk))
                    chunk, size = [], 0
                chunk.append(raw)
                size += len(raw)
            if chunk:
                out.append(pb.JournalReadResponse(records=chunk))
            return out

        return iter(self._run(context, "JournalRead", do))

    def JournalTrim(
        self, request: pb.JournalTrimRequest, context: grpc.ServicerContext
    ) -> pb.JournalTrimResponse:
        """Drop segments holding only records ``<= through_seq`` (StaleEpoch as for appends)."""

        def do() -> pb.JournalTrimResponse:
            journal = self._journal_for(request.volume_id)
            if self.guard is not None:
                self.guard.check_trim(request.volume_id, request.through_seq)
            removed = journal.trim(request.volume_id, request.epoch, request.through_seq)
            return pb.JournalTrimResponse(removed=removed)

        return self._run(context, "JournalTrim", do)


class _HandlerCapture:
    """Collects the generated method handlers instead of registering them."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def _add_servicer(servicer: StorageServicer, server: Any) -> None:
    """Register the generated handlers, except that PutBlocks requests are decoded by
    :func:`~torus_core.rpc.wire.decode_put_blocks` (blocks as views, not copies)."""
    capture = _HandlerCapture()
    # the generated function is unannotated; it only calls the capture's two methods
    add_to_server = cast(
        Callable[[StorageServicer, _HandlerCapture], None], pb_grpc.add_TorusStorageServicer_to_server
    )
    add_to_server(servicer, capture)
    handlers = capture.handlers
    handlers["PutBlocks"] = grpc.unary_unary_rpc_method_handler(
        servicer.PutBlocks,
        request_deserializer=decode_put_blocks,
        response_serializer=pb.PutBlocksResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


class PeerServer:
    """A gRPC server for one peer's block store.

    :param store: the local store to serve.
    :param uuid: this peer's UUID.
    :param address: ``host:port`` to bind; port 0 picks a free port. Binds 127.0.0.1 by default.
    :param tls: mutual TLS settings; without them the address must be loopback unless
        ``allow_insecure`` is true (else :class:`~torus_core.errors.ConfigError`).
    :param max_workers: handler threads.
    :param max_message_bytes: largest message accepted or sent.
    :param on_put: optional observer of stored refs (see :class:`StorageServicer`).
    :param journal: this peer's journal store, served by the ``Journal*`` RPCs.
    :param auth: the cluster key every call must prove (None: calls need no credential -- only
        for tests of the bare server; a :class:`~torus_core.cluster.node.ClusterNode` always
        passes its cluster's key).
    :param limits: per-caller bounds on calls and streams.
    :param guard: refuses requests no honest writer sends (see :class:`StorageServicer`).
    """

    def __init__(
        self,
        store: BlockStore,
        *,
        uuid: str = "",
        address: str = "127.0.0.1:0",
        tls: TLSConfig | None = None,
        allow_insecure: bool = False,
        max_workers: int = 16,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        on_put: PutObserver | None = None,
        journal: JournalStore | None = None,
        auth: ClusterKey | None = None,
        limits: CallLimits | None = None,
        guard: ReplicaGuard | None = None,
    ) -> None:
        self._bind = normalize_address(address)
        if tls is None:
            check_insecure_allowed(self._bind, allow_insecure)
        self.tls = tls
        self.servicer = StorageServicer(store, uuid=uuid, on_put=on_put, journal=journal, guard=guard)
        #: checks every call's credential and the per-caller limits
        self.interceptor = ServerAuthInterceptor(auth, limits)
        self._max_workers = max_workers
        self._max_message_bytes = max_message_bytes
        self._server: Any = None
        self._port: int | None = None

    @property
    def stats(self) -> ServerStats:
        """Per-method call counters."""
        return self.servicer.stats

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise ConfigError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` clients should dial (after :meth:`start`)."""
        host, _ = split_host_port(self._bind)
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def start(self) -> PeerServer:
        """Bind and start serving; returns ``self``. Raises ConfigError if the bind fails."""
        if self._server is not None:
            return self
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="torus-rpc"),
            options=server_options(self._max_message_bytes),
            interceptors=[self.interceptor],
        )
        _add_servicer(self.servicer, server)
        try:
            if self.tls is not None:
                port = server.add_secure_port(self._bind, self.tls.server_credentials())
            else:
                port = server.add_insecure_port(self._bind)
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind peer RPC server to {self._bind}: {exc}") from exc
        if not port:
            raise ConfigError(f"cannot bind peer RPC server to {self._bind}")
        server.start()
        self._server = server
        self._port = port
        log.info("peer RPC server %s listening on %s", self.servicer.uuid, self.address)
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait(timeout=(grace or 0) + 5)

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
