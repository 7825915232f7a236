"""Cluster membership for peer calls: an HMAC-SHA256 of a fresh nonce under the cluster key.

``torusctl init`` creates a random 32-byte cluster key and stores it in the metadata backend
(:meth:`~torus_core.metadata.MetadataService.cluster_key`), so every process holding the
metadata credential is a member and nothing else is (docs/cluster.md, "Peer authentication").
Two transports use it:

* **gRPC** (:class:`~torus_core.rpc.client.PeerClient`, :class:`ServerAuthInterceptor`): every call carries
  ``x-torus-peer-auth: v1.<caller>.<unix ms>.<nonce>.<mac>`` where ``mac`` is
  ``HMAC-SHA256(key, "torus-rpc-v1" | method | caller | ms | nonce)``. The server accepts a
  token once (it remembers every nonce for the skew window), only within :data:`MAX_SKEW`
  seconds of its clock, and only for the method it was made for. A refused call never reaches
  a handler thread's real work: it is aborted with ``UNAUTHENTICATED`` (client side:
  :class:`~torus_core.errors.Unauthenticated`).
* **the journal channel** (:mod:`torus_core.journal.channel`): the server opens each connection
  with a random 32-byte challenge and the client answers ``HMAC-SHA256(key, "torus-journal-v1"
  | challenge | caller)`` (:func:`channel_proof`); a fresh challenge per connection, so a proof
  cannot be replayed.

The key authenticates the caller; it does not encrypt. Off loopback, peer traffic needs TLS
(:mod:`torus_core.rpc.tls`), which keeps the tokens and the data private; a TLS certificate
alone is never a peer credential (an NBD client's certificate from the same CA is not one).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from torus_core.errors import InvalidArgument, Unauthenticated
from torus_core.rpc.status import ERROR_METADATA_KEY

#: Bytes of a cluster key made by :meth:`ClusterKey.generate`.
KEY_BYTES = 32
#: Shortest key accepted.
MIN_KEY_BYTES = 16
#: gRPC metadata key carrying the call token.
AUTH_METADATA_KEY = "x-torus-peer-auth"
#: Largest clock difference (seconds) between a caller and a peer for a token to be accepted.
MAX_SKEW = 120.0
#: Most nonces a verifier remembers (tokens beyond it are refused until old ones expire).
MAX_REMEMBERED = 1_000_000
#: Bytes of a journal channel challenge.
CHALLENGE_BYTES = 32

_CALLER = re.compile(r"^[A-Za-z0-9_:@+-]{1,128}$")
_RPC_DOMAIN = b"torus-rpc-v1"
_CHANNEL_DOMAIN = b"torus-journal-v1"


def check_caller(caller: str) -> str:
    """``caller`` if it is a valid caller name (1-128 of ``A-Z a-z 0-9 _ : @ + -``)."""
    if not isinstance(caller, str) or not _CALLER.match(caller):
        raise InvalidArgument(f"bad peer caller name {caller!r}")
    return caller


class ClusterKey:
    """The cluster's shared secret. Its ``repr`` never shows the bytes.

    :param secret: at least :data:`MIN_KEY_BYTES` random bytes.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < MIN_KEY_BYTES:
            raise InvalidArgument(f"a cluster key needs at least {MIN_KEY_BYTES} bytes")
        self._secret = secret

    @classmethod
    def generate(cls) -> ClusterKey:
        """A new random key (:func:`secrets.token_bytes`)."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str | bytes) -> ClusterKey:
        """Parse the hex form written by :meth:`to_text`."""
        raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
        try:
            return cls(bytes.fromhex(raw.strip()))
        except ValueError:
            raise InvalidArgument("a cluster key must be hex digits") from None

    def to_text(self) -> str:
        """Hex form (what the metadata backend stores)."""
        return self._secret.hex()

    def mac(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 over the length-prefixed ``parts`` (no two part lists collide)."""
        msg = b"".join(len(p).to_bytes(4, "little") + p for p in parts)
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "ClusterKey(<secret>)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterKey) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._secret).digest())


@dataclass(frozen=True)
class PeerAuth:
    """What a process presents and checks on peer transports.

    :param key: the cluster key.
    :param caller: this process's name in other peers' per-caller limits (its peer UUID).
    """

    key: ClusterKey
    caller: str

    def __post_init__(self) -> None:
        check_caller(self.caller)


def _token_mac(key: ClusterKey, method: str, caller: str, ms: str, nonce: str) -> bytes:
    return key.mac(_RPC_DOMAIN, method.encode(), caller.encode(), ms.encode(), nonce.encode())


def call_token(auth: PeerAuth, method: str, *, now: float | None = None) -> str:
    """A one-use token for a call of ``method`` (the full ``/package.Service/Method`` name)."""
    ms = str(int((time.time() if now is None else now) * 1000))
    nonce = secrets.token_hex(16)
    mac = _token_mac(auth.key, method, auth.caller, ms, nonce)
    return f"v1.{auth.caller}.{ms}.{nonce}.{mac.hex()}"


class TokenVerifier:
    """Checks call tokens: right key and method, fresh, never seen before. Thread-safe.

    :param key: the cluster key.
    :param max_skew: seconds a token's clock may differ from ours.
    :param clock: wall clock (tests).
    """

    def __init__(
        self, key: ClusterKey, *, max_skew: float = MAX_SKEW, clock: Callable[[], float] = time.time
    ) -> None:
        self.key = key
        self.max_skew = max_skew
        self._clock = clock
        self._lock = threading.Lock()
        #: nonce -> expiry (seconds), in insertion order, which is expiry order within the skew
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def verify(self, method: str, token: str | None) -> str:
        """The caller named by a valid ``token`` for ``method``; :class:`Unauthenticated` otherwise."""
        if not token:
            raise Unauthenticated(f"{method}: no cluster credential (x-torus-peer-auth)")
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != "v1":
            raise Unauthenticated(f"{method}: malformed cluster credential")
        _, caller, ms, nonce, mac_hex = parts
        if not _CALLER.match(caller) or not ms.isdigit() or len(nonce) != 32 or len(mac_hex) != 64:
            raise Unauthenticated(f"{method}: malformed cluster credential")
        try:
            mac = bytes.fromhex(mac_hex)
        except ValueError:
            raise Unauthenticated(f"{method}: malformed cluster credential") from None
        if not hmac.compare_digest(mac, _token_mac(self.key, method, caller, ms, nonce)):
            raise Unauthenticated(f"{method}: wrong cluster credential")
        now = self._clock()
        stamp = int(ms) / 1000.0
        if abs(now - stamp) > self.max_skew:
            raise Unauthenticated(
                f"{method}: credential time {stamp:.0f} is more than {self.max_skew:.0f} s from ours"
            )
        with self._lock:
            seen = self._seen
            while seen:
                oldest, expiry = next(iter(seen.items()))
                if expiry > now:
                    break
                seen.pop(oldest)
            if nonce in seen:
                raise Unauthenticated(f"{method}: replayed cluster credential")
            if len(seen) >= MAX_REMEMBERED:
                raise Unauthenticated(f"{method}: too many fresh credentials, retry later")
            seen[nonce] = now + 2 * self.max_skew
        return caller


def channel_proof(key: ClusterKey, challenge: bytes, caller: str) -> bytes:
    """The journal channel client's answer to ``challenge``."""
    return key.mac(_CHANNEL_DOMAIN, challenge, caller.encode())


def check_channel_proof(key: ClusterKey, challenge: bytes, caller: str, proof: bytes) -> None:
    """Raise :class:`Unauthenticated` unless ``proof`` answers ``challenge`` for ``caller``."""
    if not _CALLER.match(caller) or not hmac.compare_digest(proof, channel_proof(key, challenge, caller)):
        raise Unauthenticated("journal channel: wrong cluster credential")


# --- gRPC -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallLimits:
    """Per-caller bounds a peer server enforces (``PeerBusy`` beyond them).

    :param calls: calls one caller may have in flight (running or queued for a handler thread)
        at once. Generous: a unary call cannot idle (its request is complete before a handler
        runs), so this only bounds what one caller may queue; an NBD server at queue depth 32
        over several connections sends dozens of reads to one peer at once.
    :param streams: streaming calls (``PutBlockStream``, ``JournalRead``) one caller may have in
        flight at once.
    :param stream_idle: seconds a streaming call may go without a message from its client (or
        without taking one from the server) before the server cancels it.
    """

    calls: int = 128
    streams: int = 8
    stream_idle: float = 15.0

    def __post_init__(self) -> None:
        for name in ("calls", "streams"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidArgument(f"call limit {name!r} must be a positive integer, got {v!r}")
        if not isinstance(self.stream_idle, int | float) or not self.stream_idle > 0:
            raise InvalidArgument(f"stream idle timeout must be positive, got {self.stream_idle!r}")


class _Refused:
    """A handler behaviour that aborts at once with a fixed status (never reads the request)."""

    def __init__(self, code: grpc.StatusCode, name: str, message: str) -> None:
        self.code, self.name, self.message = code, name, message

    def __call__(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.set_trailing_metadata(((ERROR_METADATA_KEY, self.name),))
        context.abort(self.code, self.message)


def _rebuild(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind (and serializers) that runs ``behaviour``."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, des, ser)
    return grpc.unary_unary_rpc_method_handler(behaviour, des, ser)


class _Watchdog:
    """Cancels a client-streaming call whose client sends nothing for ``idle`` seconds."""

    def __init__(self, context: grpc.ServicerContext, idle: float) -> None:
        self.context, self.idle = context, idle
        self._timer: threading.Timer | None = None
        self.fired = False
        self.kick()

    def _fire(self) -> None:
        self.fired = True
        self.context.cancel()

    def kick(self) -> None:
        self.stop()
        self._timer = threading.Timer(self.idle, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def watch(self, it: Iterator[Any]) -> Iterator[Any]:
        for item in it:
            self.kick()
            yield item
        self.stop()


class ServerAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc: no hints
    """Serves a call only with a valid token, and within the caller's :class:`CallLimits`.

    Runs on gRPC's polling thread: a refused call costs a handler thread only the abort.

    :param key: the cluster key (None: every call is served without a credential, for tests of
        the bare server; per-caller limits then count every caller as one).
    :param limits: per-caller bounds.
    """

    STREAMING = frozenset({"PutBlockStream", "JournalRead"})

    def __init__(self, key: ClusterKey | None, limits: CallLimits | None = None) -> None:
        self.verifier = TokenVerifier(key) if key is not None else None
        self.limits = limits or CallLimits()
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._streams: collections.Counter[str] = collections.Counter()
        #: the counting handler of each (method, caller), built once
        self._wrapped: dict[tuple[str, str], grpc.RpcMethodHandler] = {}
        #: calls refused, by reason (tests and debugging)
        self.refused: collections.Counter[str] = collections.Counter()

    def in_flight(self, caller: str) -> tuple[int, int]:
        """``(calls, streams)`` ``caller`` has in flight now."""
        with self._lock:
            return self._calls[caller], self._streams[caller]

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method)
        short = method.rsplit("/", 1)[-1]
        caller = "-"
        if self.verifier is not None:
            token = None
            for k, v in handler_call_details.invocation_metadata or ():
                if k == AUTH_METADATA_KEY:
                    token = v if isinstance(v, str) else bytes(v).decode("ascii", "replace")
            try:
                caller = self.verifier.verify(method, token)
            except Unauthenticated as exc:
                self.refused["unauthenticated"] += 1
                refuse = _Refused(grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated", str(exc))
                return _rebuild(handler, refuse)
        streaming = short in self.STREAMING
        with self._lock:
            if self._calls[caller] >= self.limits.calls or (
                streaming and self._streams[caller] >= self.limits.streams
            ):
                self.refused["busy"] += 1
                what = "streams" if streaming and self._streams[caller] >= self.limits.streams else "calls"
                limit = self.limits.streams if what == "streams" else self.limits.calls
                refuse = _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "PeerBusy",
                    f"{short}: caller {caller} already has {limit} {what} in flight",
                )
                return _rebuild(handler, refuse)
            self._calls[caller] += 1
            if streaming:
                self._streams[caller] += 1
            wrapped = self._wrapped.get((method, caller))
        if wrapped is None:
            wrapped = _rebuild(handler, self._counted(handler, caller, streaming))
            with self._lock:
                if len(self._wrapped) >= 4096:
                    self._wrapped.clear()
                self._wrapped[(method, caller)] = wrapped
        return wrapped

    def _release(self, caller: str, streaming: bool) -> None:
        with self._lock:
            self._calls[caller] -= 1
            if self._calls[caller] <= 0:
                del self._calls[caller]
            if streaming:
                self._streams[caller] -= 1
                if self._streams[caller] <= 0:
                    del self._streams[caller]

    def _counted(self, handler: grpc.RpcMethodHandler, caller: str, streaming: bool) -> Callable[..., Any]:
        inner: Callable[..., Any] = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        idle = self.limits.stream_idle

        if handler.response_streaming:

            def streamed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                # a client that stops reading blocks the handler in flow control: the watchdog
                # cancels the call when a message waits ``idle`` seconds to be taken
                dog = _Watchdog(context, idle)
                try:
                    source = dog.watch(request) if handler.request_streaming else request
                    for item in inner(source, context):
                        dog.kick()
                        yield item
                finally:
                    dog.stop()
                    self._release(caller, streaming)

            return streamed

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                if handler.request_streaming:
                    dog = _Watchdog(context, idle)
                    try:
                        return inner(dog.watch(request), context)
                    finally:
                        dog.stop()
                return inner(request, context)
            finally:
                self._release(caller, streaming)

        return unary
