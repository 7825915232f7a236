"""The peer RPC client: one reusable gRPC channel per peer address.

Every call carries a deadline (:class:`~torus_core.rpc.options.RPCTimeouts`, overridable per
call with ``timeout=``). Errors come back as torus types: the peer's own errors keep their type
(``BlockNotExist``, ``CorruptBlock``, ``OutOfSpace``, ``BlockExists``, ``InvalidArgument``) and
transport failures raise :class:`~torus_core.errors.PeerUnavailable` (retryable).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import grpc

from torus_core.crc32 import page_crcs
from torus_core.errors import Closed, InvalidArgument, NotSupported, PeerUnavailable, ProtocolError
from torus_core.metrics import RPC_CLIENT_ERRORS_BY_METHOD, RPC_CLIENT_SECONDS_BY_METHOD
from torus_core.refs import BlockRef
from torus_core.rpc import torus_storage_pb2 as pb
from torus_core.rpc import torus_storage_pb2_grpc as pb_grpc
from torus_core.rpc.auth import AUTH_METADATA_KEY, PeerAuth, call_token
from torus_core.rpc.options import DEFAULT_MAX_MESSAGE_BYTES, RPCTimeouts, channel_options
from torus_core.rpc.status import error_from_rpc
from torus_core.rpc.tls import TLSConfig, check_insecure_allowed, normalize_address
from torus_core.rpc.wire import encode_journal_append, encode_put_blocks

#: Prefix of every method's full name.
_SERVICE = "/torus.rpc.v1.TorusStorage/"
#: Full name of the PutBlocks method (called with hand-encoded requests, see rpc.wire).
_PUT_BLOCKS = "/torus.rpc.v1.TorusStorage/PutBlocks"
#: Full name of the JournalAppend method (hand-encoded requests too).
_JOURNAL_APPEND = "/torus.rpc.v1.TorusStorage/JournalAppend"

BlockData = bytes | bytearray | memoryview

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Req_contra = TypeVar("_Req_contra", contravariant=True)
_Resp_co = TypeVar("_Resp_co", covariant=True)


class _Call(Protocol[_Req_contra, _Resp_co]):
    """One blocking gRPC call (a multi-callable of the channel) as this module uses it."""

    def __call__(
        self, request: _Req_contra, /, *, timeout: float, metadata: Sequence[tuple[str, str]] | None = None
    ) -> _Resp_co: ...


class _StorageStub(Protocol):
    """The typed face of the generated (unannotated) ``TorusStorageStub``."""

    GetBlock: _Call[pb.GetBlockRequest, pb.GetBlockResponse]
    PutBlockStream: _Call[Iterable[pb.PutBlocksRequest], pb.PutBlocksResponse]
    Flush: _Call[pb.FlushRequest, pb.FlushResponse]
    RebalanceCheck: _Call[pb.RebalanceCheckRequest, pb.RebalanceCheckResponse]
    Ping: _Call[pb.PingRequest, pb.PingResponse]
    JournalFence: _Call[pb.JournalFenceRequest, pb.JournalFenceResponse]
    JournalRead: _Call[pb.JournalReadRequest, Iterator[pb.JournalReadResponse]]
    JournalTrim: _Call[pb.JournalTrimRequest, pb.JournalTrimResponse]


def _storage_stub(channel: Any) -> _StorageStub:
    """The generated stub over ``channel`` (a ``grpc.Channel``; grpc ships no type hints)."""
    new_stub = cast(Callable[[Any], _StorageStub], pb_grpc.TorusStorageStub)
    return new_stub(channel)


@dataclass(frozen=True)
class PeerInfoReply:
    """What ``Ping`` reports about a peer."""

    uuid: str
    protocol_version: int
    block_size: int
    total_blocks: int
    used_blocks: int


class PeerClient:
    """Calls to one peer over one channel. Thread-safe; create through :class:`PeerClientPool`.

    :param address: ``host:port`` of the peer.
    :param tls: mutual TLS settings, or None for plaintext (loopback only unless ``allow_insecure``).
    :param timeouts: default deadlines.
    :param max_message_bytes: largest message sent or received.
    :param auth: the cluster credential presented on every call (None: no credential).
    """

    def __init__(
        self,
        address: str,
        *,
        tls: TLSConfig | None = None,
        allow_insecure: bool = False,
        timeouts: RPCTimeouts | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        auth: PeerAuth | None = None,
    ) -> None:
        self.address = normalize_address(address)
        self.timeouts = timeouts or RPCTimeouts()
        self.max_message_bytes = max_message_bytes
        options: list[tuple[str, Any]] = list(channel_options(max_message_bytes))
        if tls is None:
            check_insecure_allowed(self.address, allow_insecure)
            self._channel = grpc.insecure_channel(self.address, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(self.address, tls.channel_credentials(), options=options)
        self.auth = auth
        self._stub = _storage_stub(self._channel)
        # requests are already serialized (torus_core.rpc.wire): no message object, no copy
        self._put_raw: _Call[bytes, pb.PutBlocksResponse] = self._channel.unary_unary(
            _PUT_BLOCKS, request_serializer=None, response_deserializer=pb.PutBlocksResponse.FromString
        )
        self._journal_append_raw: _Call[bytes, pb.JournalAppendResponse] = self._channel.unary_unary(
            _JOURNAL_APPEND,
            request_serializer=None,
            response_deserializer=pb.JournalAppendResponse.FromString,
        )
        self._closed = False

    def _call(self, method: str, fn: _Call[_Req, _Resp], request: _Req, timeout: float) -> _Resp:
        if self._closed:
            raise Closed(f"client for {self.address} is closed")
        t0 = time.perf_counter()
        auth = self.auth
        try:
            if auth is None:
                return fn(request, timeout=timeout)
            # a fresh one-use membership token per call (torus_core.rpc.auth)
            return fn(
                request, timeout=timeout, metadata=((AUTH_METADATA_KEY, call_token(auth, _SERVICE + method)),)
            )
        except grpc.RpcError as exc:
            RPC_CLIENT_ERRORS_BY_METHOD[method].inc()
            raise error_from_rpc(exc, self.address, method) from None
        except ValueError as exc:  # grpc raises ValueError on a closed channel
            RPC_CLIENT_ERRORS_BY_METHOD[method].inc()
            raise PeerUnavailable(f"peer {self.address} {method}: {exc}", address=self.address) from None
        finally:
            RPC_CLIENT_SECONDS_BY_METHOD[method].observe(time.perf_counter() - t0)

    def get_block(self, ref: BlockRef, *, timeout: float | None = None) -> bytes:
        """Read one block from the peer."""
        req = pb.GetBlockRequest(ref=ref.to_bytes())
        resp = self._call("GetBlock", self._stub.GetBlock, req, timeout or self.timeouts.get)
        return bytes(resp.data)

    def get_block_range(
        self, ref: BlockRef, start: int, length: int, *, timeout: float | None = None
    ) -> bytes:
        """Bytes ``[start, start + length)`` of a block, **unverified** by the peer (the caller
        checks them, like :meth:`~torus_core.blockstore.BlockStore.read_block_range`).

        A peer that predates ranged reads returns the whole block; it is sliced here. Raises
        :class:`~torus_core.errors.InvalidArgument` for a negative or empty range and
        :class:`~torus_core.errors.ProtocolError` for an answer of the wrong length.
        """
        if not isinstance(start, int) or not isinstance(length, int) or start < 0 or length <= 0:
            raise InvalidArgument(f"bad block range start={start!r} length={length!r}")
        if start + length > 0xFFFFFFFF:
            raise InvalidArgument(f"block range end {start + length} does not fit the protocol")
        req = pb.GetBlockRequest(ref=ref.to_bytes(), offset=start, length=length)
        resp = self._call("GetBlock", self._stub.GetBlock, req, timeout or self.timeouts.get)
        data = resp.data
        if len(data) == length:
            return bytes(data)
        if len(data) >= start + length:  # an old peer sent the whole block
            return bytes(memoryview(data)[start : start + length])
        raise ProtocolError(f"peer {self.address} returned {len(data)} bytes for a range of {length}")

    def get_block_page_crcs(
        self, ref: BlockRef, page_size: int, block_size: int, *, timeout: float | None = None
    ) -> bytes:
        """The CRC-32 of each ``page_size`` page of a ``block_size``-byte block, as the peer
        computed them from a read it verified (:meth:`~torus_core.blockstore.BlockStore.page_crcs`;
        the caller checks the table against its own CRC of the block). A peer that predates
        page tables returns the whole (verified) block; the table is computed here.
        """
        if type(page_size) is not int or not 0 < page_size <= min(block_size, 0xFFFFFFFF):
            raise InvalidArgument(f"bad page size {page_size!r} for a {block_size}-byte block")
        req = pb.GetBlockRequest(ref=ref.to_bytes(), page_crcs=page_size)
        resp = self._call("GetBlock", self._stub.GetBlock, req, timeout or self.timeouts.get)
        want = 4 * -(-block_size // page_size)
        if len(resp.page_crcs) == want:
            return bytes(resp.page_crcs)
        if not resp.page_crcs and len(resp.data) == block_size:  # an old peer sent the block
            return page_crcs(resp.data, page_size)
        raise ProtocolError(
            f"peer {self.address} returned {len(resp.page_crcs)} bytes of page CRCs (wanted {want})"
        )

    def put_blocks(
        self,
        refs: Sequence[BlockRef],
        blocks: Sequence[BlockData],
        *,
        repair: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Store several blocks in one call; returns the count once the peer has flushed them.

        With ``repair=True`` the peer replaces copies that fail their integrity check.
        """
        return self.put_blocks_deferred(refs, blocks, repair=repair, defer_flush=False, timeout=timeout)[0]

    def put_blocks_deferred(
        self,
        refs: Sequence[BlockRef],
        blocks: Sequence[BlockData],
        *,
        repair: bool = False,
        defer_flush: bool = True,
        timeout: float | None = None,
        trim: bool = False,
    ) -> tuple[int, str]:
        """Store several blocks; with ``defer_flush`` the peer does not flush before replying.

        ``trim``: send each block without its trailing zeros (the peer's store pads them back);
        only for blocks the caller knows are at most the block size.

        Returns ``(count, boot_id)``; the blocks are durable only after a :meth:`flush` that
        reports the same ``boot_id`` (a different one means the peer restarted in between).
        """
        if len(refs) != len(blocks):
            raise InvalidArgument(f"put_blocks got {len(refs)} refs but {len(blocks)} blocks")
        req = encode_put_blocks(refs, blocks, repair=repair, defer_flush=defer_flush, trim=trim)
        resp = self._call("PutBlocks", self._put_raw, req, timeout or self.timeouts.put)
        return int(resp.written), str(resp.boot_id)

    def flush(self, *, timeout: float | None = None) -> str:
        """Make every block the peer stored so far durable; returns the peer's ``boot_id``.

        A peer without the Flush RPC (it flushes every PutBlocks) returns ``""``.
        """
        try:
            resp = self._call("Flush", self._stub.Flush, pb.FlushRequest(), timeout or self.timeouts.put)
        except NotSupported:
            return ""
        return str(resp.boot_id)

    def put_block_stream(
        self,
        items: Iterable[tuple[BlockRef, BlockData]],
        *,
        batch_bytes: int = 8 * 1024 * 1024,
        timeout: float | None = None,
    ) -> int:
        """Stream many blocks (bulk moves) in batches of about ``batch_bytes``; returns the count stored."""
        limit = max(1, min(batch_bytes, self.max_message_bytes // 2))

        def batches() -> Iterable[pb.PutBlocksRequest]:
            refs: list[bytes] = []
            blocks: list[bytes] = []
            size = 0
            for ref, data in items:
                raw = bytes(data)
                if refs and size + len(raw) > limit:
                    yield pb.PutBlocksRequest(refs=refs, blocks=blocks)
                    refs, blocks, size = [], [], 0
                refs.append(ref.to_bytes())
                blocks.append(raw)
                size += len(raw)
            if refs:
                yield pb.PutBlocksRequest(refs=refs, blocks=blocks)

        resp = self._call(
            "PutBlockStream", self._stub.PutBlockStream, batches(), timeout or self.timeouts.stream
        )
        return int(resp.written)

    def rebalance_check(self, refs: Sequence[BlockRef], *, timeout: float | None = None) -> list[bool]:
        """For each ref, whether the peer holds it."""
        req = pb.RebalanceCheckRequest(refs=[r.to_bytes() for r in refs])
        resp = self._call("RebalanceCheck", self._stub.RebalanceCheck, req, timeout or self.timeouts.check)
        has = [bool(h) for h in resp.has]
        if len(has) != len(refs):
            raise ProtocolError(f"peer {self.address} answered {len(has)} of {len(refs)} refs")
        return has

    def ping(self, *, timeout: float | None = None) -> PeerInfoReply:
        """The peer's identity and capacity."""
        resp = self._call("Ping", self._stub.Ping, pb.PingRequest(), timeout or self.timeouts.ping)
        return PeerInfoReply(
            uuid=resp.uuid,
            protocol_version=int(resp.protocol_version),
            block_size=int(resp.block_size),
            total_blocks=int(resp.total_blocks),
            used_blocks=int(resp.used_blocks),
        )

    # --- volume journal (torus_core.journal) -------------------------------------------------

    def journal_fence(self, volume_id: int, epoch: int, *, timeout: float | None = None) -> int:
        """Make the peer refuse journal writes of epochs older than ``epoch`` for the volume;
        returns the highest sequence number it stores. ``StaleEpoch`` if it saw a newer epoch."""
        _check_u64(volume_id=volume_id, epoch=epoch)
        req = pb.JournalFenceRequest(volume_id=volume_id, epoch=epoch)
        resp = self._call("JournalFence", self._stub.JournalFence, req, timeout or self.timeouts.journal)
        return int(resp.last_seq)

    def journal_append(
        self, volume_id: int, epoch: int, payloads: Sequence[bytes], *, timeout: float | None = None
    ) -> int:
        """Append encoded records; returns once the peer made them durable (its highest stored
        sequence number). ``StaleEpoch`` if it saw a newer epoch, ``InvalidArgument`` for records
        that are not whole, valid records of this volume and epoch."""
        _check_u64(volume_id=volume_id, epoch=epoch)
        return self.journal_append_encoded(encode_journal_append(volume_id, epoch, payloads), timeout=timeout)

    def journal_append_encoded(self, request: bytes, *, timeout: float | None = None) -> int:
        """:meth:`journal_append` of a request already encoded with
        :func:`~torus_core.rpc.wire.encode_journal_append` (one encoding for all replicas).

        A blocking call: gRPC's asynchronous ``future()`` calls cost about twice the CPU and
        latency of blocking ones here, so callers that append to several peers in parallel run
        blocking calls on their own threads (see :mod:`torus_core.journal.remote`).
        """
        resp = self._call(
            "JournalAppend", self._journal_append_raw, request, timeout or self.timeouts.journal
        )
        return int(resp.last_seq)

    def journal_read(
        self, volume_id: int, after_seq: int = 0, *, timeout: float | None = None
    ) -> list[bytes]:
        """The peer's encoded records of the volume with ``seq > after_seq``, in stored order
        (decode them with :func:`~torus_core.journal.record.decode_record`)."""
        _check_u64(volume_id=volume_id, after_seq=after_seq)
        req = pb.JournalReadRequest(volume_id=volume_id, after_seq=after_seq)

        def read_all(
            request: pb.JournalReadRequest,
            /,
            *,
            timeout: float,
            metadata: Sequence[tuple[str, str]] | None = None,
        ) -> list[bytes]:
            out: list[bytes] = []
            for msg in self._stub.JournalRead(request, timeout=timeout, metadata=metadata):
                out.extend(msg.records)
            return out

        return self._call("JournalRead", read_all, req, timeout or self.timeouts.journal)

    def journal_trim(
        self, volume_id: int, epoch: int, through_seq: int, *, timeout: float | None = None
    ) -> int:
        """Let the peer drop the volume's segments holding only records ``<= through_seq``;
        returns how many it removed. ``StaleEpoch`` if it saw a newer epoch."""
        _check_u64(volume_id=volume_id, epoch=epoch, through_seq=through_seq)
        req = pb.JournalTrimRequest(volume_id=volume_id, epoch=epoch, through_seq=through_seq)
        resp = self._call("JournalTrim", self._stub.JournalTrim, req, timeout or self.timeouts.journal)
        return int(resp.removed)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (a pool drops closed clients after a reset)."""
        return self._closed

    def close(self) -> None:
        """Close the channel. Idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()


def _check_u64(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
            raise InvalidArgument(f"journal {name} must be a u64, got {v!r}")


class PeerClientPool:
    """One :class:`PeerClient` per address, created on first use and reused.

    A channel that saw a transport failure can be dropped with :meth:`reset` (the next call
    dials afresh), which is what the distributor does after a :class:`PeerUnavailable`.
    All clients share the pool's TLS settings, cluster credential, timeouts and message limit.
    """

    def __init__(
        self,
        *,
        tls: TLSConfig | None = None,
        allow_insecure: bool = False,
        timeouts: RPCTimeouts | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        auth: PeerAuth | None = None,
    ) -> None:
        self.tls = tls
        self.auth = auth
        self.allow_insecure = allow_insecure
        self.timeouts = timeouts or RPCTimeouts()
        self.max_message_bytes = max_message_bytes
        self._clients: dict[str, PeerClient] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, address: str) -> PeerClient:
        """The client for ``address`` (created on first use)."""
        key = normalize_address(address)
        with self._lock:
            if self._closed:
                raise Closed("peer client pool is closed")
            client = self._clients.get(key)
            if client is None:
                client = PeerClient(
                    key,
                    tls=self.tls,
                    allow_insecure=self.allow_insecure,
                    timeouts=self.timeouts,
                    max_message_bytes=self.max_message_bytes,
                    auth=self.auth,
                )
                self._clients[key] = client
            return client

    def reset(self, address: str) -> None:
        """Drop (and close) the cached channel for ``address``, if any."""
        key = normalize_address(address)
        with self._lock:
            client = self._clients.pop(key, None)
        if client is not None:
            client.close()

    def addresses(self) -> list[str]:
        """Addresses with an open channel."""
        with self._lock:
            return list(self._clients)

    def close(self) -> None:
        """Close every channel. Idempotent."""
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> PeerClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
