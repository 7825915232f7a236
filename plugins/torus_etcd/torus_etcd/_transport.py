"""gRPC transport to etcd: endpoints, failover, deadlines, auth, and error translation.

The protocol is cslab-etcd3's generated stubs (``etcd3.etcdrpc``); channels, failover and
deadlines are ours (see the README for why the client's own layer is not used). Every RPC goes
through :meth:`EtcdTransport.call`, which applies one deadline per call and translates gRPC
errors with :data:`ERRORS_BY_CODE` in one place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from etcd3 import etcdrpc

from torus_core.errors import (
    Closed,
    ConfigError,
    InvalidArgument,
    LeaseNotFound,
    MetadataError,
    MetadataUnavailable,
    TorusError,
)
from torus_etcd._config import TransportConfig

BACKEND = "etcd"

#: gRPC channel options: reconnect quickly after an outage (the default backoff grows to 120 s).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.enable_retries", 0),
]

#: Codes meaning "this endpoint did not answer": fail over and raise MetadataUnavailable.
UNAVAILABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

#: Rounds over the endpoints a unary call makes while they answer UNAVAILABLE (within its budget).
UNAVAILABLE_ROUNDS = 8


def _translate_invalid(message: str) -> TorusError:
    if "lease not found" in message:
        return LeaseNotFound(message)
    if "authentication failed" in message:
        return ConfigError(f"etcd authentication failed (check user/password): {message}")
    return InvalidArgument(f"etcd rejected the request: {message}")


#: One table from gRPC status codes to torus errors (called with the server's message).
ERRORS_BY_CODE: dict[grpc.StatusCode, Callable[[str], TorusError]] = {
    grpc.StatusCode.UNAVAILABLE: lambda m: MetadataUnavailable(f"etcd unavailable: {m}", backend=BACKEND),
    grpc.StatusCode.DEADLINE_EXCEEDED: lambda m: MetadataUnavailable(
        f"etcd did not answer in time: {m}", backend=BACKEND
    ),
    grpc.StatusCode.CANCELLED: lambda m: MetadataUnavailable(f"etcd call cancelled: {m}", backend=BACKEND),
    grpc.StatusCode.NOT_FOUND: lambda m: LeaseNotFound(m) if "lease" in m else MetadataError(m),
    grpc.StatusCode.INVALID_ARGUMENT: _translate_invalid,
    grpc.StatusCode.FAILED_PRECONDITION: lambda m: MetadataError(f"etcd precondition failed: {m}"),
    grpc.StatusCode.UNAUTHENTICATED: lambda m: ConfigError(f"etcd authentication failed: {m}"),
    grpc.StatusCode.PERMISSION_DENIED: lambda m: ConfigError(f"etcd permission denied: {m}"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: lambda m: MetadataError(f"etcd resource exhausted: {m}"),
}


#: Added to "cannot connect" errors of a TLS channel: a refused handshake looks like an outage to gRPC.
TLS_HINT = (
    "over TLS; if the server is up, the TLS handshake was refused: check ca_file (the CA that signed "
    "the server), and cert_file/key_file (a client certificate the server's CA trusts)"
)


def translate(exc: grpc.RpcError, *, tls: bool = False) -> TorusError:
    """Map a gRPC error to the torus exception it means (``tls``: the channel uses TLS)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code == grpc.StatusCode.UNKNOWN and "deadline exceeded" in details:
        code = grpc.StatusCode.DEADLINE_EXCEEDED  # etcd relays the propagated deadline as UNKNOWN
    if tls and code == grpc.StatusCode.UNAVAILABLE:
        details = f"{details} ({TLS_HINT})"
    factory = ERRORS_BY_CODE.get(code)
    if factory is None:
        return MetadataError(f"etcd error {code.name}: {details}")
    return factory(details)


# --- typed views of the responses read by this plugin ------------------------------------------
# etcd3's generated protobuf modules carry no type hints, so EtcdTransport.call/stream return
# Any; a caller names the response it expects with one of these protocols (read-only fields, as
# protobuf messages expose them) and every later use of it is checked.

_T_co = TypeVar("_T_co", covariant=True)


class KeyValue(Protocol):
    """``mvccpb.KeyValue`` (the fields read here)."""

    @property
    def key(self) -> bytes: ...
    @property
    def value(self) -> bytes: ...
    @property
    def mod_revision(self) -> int: ...


class ResponseHeader(Protocol):
    """``etcdserverpb.ResponseHeader``."""

    @property
    def revision(self) -> int: ...


class RangeResponse(Protocol):
    """``etcdserverpb.RangeResponse``."""

    @property
    def header(self) -> ResponseHeader: ...
    @property
    def kvs(self) -> Sequence[KeyValue]: ...


class DeleteRangeResponse(Protocol):
    """``etcdserverpb.DeleteRangeResponse``."""

    @property
    def deleted(self) -> int: ...


class ResponseOp(Protocol):
    """``etcdserverpb.ResponseOp`` (the range and delete-range answers inside a transaction)."""

    @property
    def response_range(self) -> RangeResponse: ...
    @property
    def response_delete_range(self) -> DeleteRangeResponse: ...


class TxnResponse(Protocol):
    """``etcdserverpb.TxnResponse``."""

    @property
    def header(self) -> ResponseHeader: ...
    @property
    def succeeded(self) -> bool: ...
    @property
    def responses(self) -> Sequence[ResponseOp]: ...


class LeaseGrantResponse(Protocol):
    """``etcdserverpb.LeaseGrantResponse``."""

    @property
    def ID(self) -> int: ...
    @property
    def error(self) -> str: ...


class LeaseKeepAliveResponse(Protocol):
    """``etcdserverpb.LeaseKeepAliveResponse``."""

    @property
    def TTL(self) -> int: ...


class WatchResponse(Protocol):
    """``etcdserverpb.WatchResponse`` (the fields read here)."""

    @property
    def events(self) -> Sequence[object]: ...
    @property
    def canceled(self) -> bool: ...
    @property
    def compact_revision(self) -> int: ...


class StreamCall(Protocol[_T_co]):
    """A response-streaming gRPC call: iterate its responses, ``cancel()`` to end it."""

    def __iter__(self) -> Iterator[_T_co]: ...
    def cancel(self) -> bool: ...


class EtcdTransport:
    """Channels to several etcd endpoints with failover; every call has a deadline."""

    def __init__(self, config: TransportConfig, *, force_tls: bool = False) -> None:
        if not config.endpoints:
            raise ConfigError("etcd URL names no endpoint")
        self.config = config
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._current = 0
        self._closed = False
        self._token: str | None = None
        self._creds: grpc.ChannelCredentials | None = None
        if config.ca_file or config.cert_file or force_tls:
            self._creds = self._load_creds()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _load_creds(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read etcd TLS file {path!r}: {exc}") from exc

        return grpc.ssl_channel_credentials(
            read(self.config.ca_file), read(self.config.key_file), read(self.config.cert_file)
        )

    def _channel(self, endpoint: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise Closed("etcd backend is closed")
            ch = self._channels.get(endpoint)
            if ch is None:
                if self._creds is not None:
                    ch = grpc.secure_channel(endpoint, self._creds, options=CHANNEL_OPTIONS)
                else:
                    ch = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
                self._channels[endpoint] = ch
            return ch

    def _metadata(self, endpoint: str, deadline: float) -> tuple[tuple[str, str], ...] | None:
        if self.config.user is None:
            return None
        if self._token is None:
            stub = etcdrpc.AuthStub(self._channel(endpoint))
            req = etcdrpc.AuthenticateRequest(name=self.config.user, password=self.config.password or "")
            resp = stub.Authenticate(req, timeout=max(0.05, deadline - time.monotonic()))
            self._token = resp.token
        return (("token", self._token),)

    def stub(self, kind: str, endpoint: str) -> Any:
        """A stub of service ``kind`` (``KV``, ``Lease``, ``Watch``) on ``endpoint``."""
        return getattr(etcdrpc, f"{kind}Stub")(self._channel(endpoint))

    def call(self, kind: str, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Send one unary RPC with a deadline, failing over to the next endpoint on UNAVAILABLE.

        A call that timed out is not re-sent (its outcome is unknown); the next call starts on
        the next endpoint. Raises torus errors only.
        """
        budget = self.config.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        endpoints = self.config.endpoints
        last: TorusError | None = None
        start = self._current
        # UNAVAILABLE (no connection, e.g. "timed out before receiving SETTINGS frame" on a busy
        # machine) is tried again on the next endpoint, round after round with a short back-off,
        # while the budget lasts; a bounded number of attempts in all.
        for attempt in range(len(endpoints) * UNAVAILABLE_ROUNDS):
            idx = (start + attempt) % len(endpoints)
            endpoint = endpoints[idx]
            if attempt and attempt % len(endpoints) == 0:
                time.sleep(
                    min(0.05 * 2 ** (attempt // len(endpoints)), 0.5, max(0.0, deadline - time.monotonic()))
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                md = self._metadata(endpoint, deadline)
                rpc = getattr(self.stub(kind, endpoint), method)
                result = rpc(request, timeout=remaining, metadata=md)
                self._current = idx
                return result
            except grpc.RpcError as exc:
                err = translate(exc, tls=self._creds is not None)
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.UNAUTHENTICATED and self._token is not None:
                    self._token = None  # expired token: re-authenticate on the next call
                    err = MetadataUnavailable(f"etcd auth token expired: {err}", backend=BACKEND)
                if not isinstance(err, MetadataUnavailable):
                    raise err from exc
                last = err
                self._current = (idx + 1) % len(endpoints)
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise err from exc  # a timeout: outcome unknown, never re-send
        raise last or MetadataUnavailable(f"etcd call {method} ran out of time ({budget}s)", backend=BACKEND)

    def stream(self, kind: str, method: str, requests: Iterator[Any], timeout: float) -> tuple[Any, str]:
        """Open a streaming RPC on the current endpoint; returns ``(call, endpoint)``."""
        endpoint = self.config.endpoints[self._current % len(self.config.endpoints)]
        deadline = time.monotonic() + timeout
        try:
            md = self._metadata(endpoint, deadline)
            call = getattr(self.stub(kind, endpoint), method)(requests, timeout=timeout, metadata=md)
        except grpc.RpcError as exc:
            self._current = (self._current + 1) % len(self.config.endpoints)
            raise translate(exc, tls=self._creds is not None) from exc
        return call, endpoint

    def fail_over(self) -> None:
        """Move to the next endpoint (after a streaming call failed)."""
        self._current = (self._current + 1) % len(self.config.endpoints)

    def close(self) -> None:
        """Close every channel. Idempotent."""
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()
