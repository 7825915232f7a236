"""Translation between torus errors and gRPC status codes (both directions).

The server aborts with the code from :func:`code_for` and sets the trailing metadata key
:data:`ERROR_METADATA_KEY` to the torus class name, so the client can rebuild the exact type
even where one gRPC code covers several torus errors. Transport failures (peer down, deadline
exceeded, TLS handshake refused) become :class:`~torus_core.errors.PeerUnavailable`, which is
retryable.
"""

from __future__ import annotations

import grpc

from torus_core import errors

#: Trailing metadata key carrying the torus error class name.
ERROR_METADATA_KEY = "torus-error"

# Most specific first: the first isinstance match wins.
_TO_CODE: tuple[tuple[type[errors.TorusError], grpc.StatusCode], ...] = (
    (errors.BlockNotExist, grpc.StatusCode.NOT_FOUND),
    (errors.CorruptBlock, grpc.StatusCode.DATA_LOSS),
    (errors.OutOfSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PeerBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.BlockExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.BlockUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Closed, grpc.StatusCode.UNAVAILABLE),
    (errors.NotSupported, grpc.StatusCode.UNIMPLEMENTED),
    (errors.StaleEpoch, grpc.StatusCode.FAILED_PRECONDITION),
)

#: Torus types the client may rebuild by name from the trailing metadata.
_BY_NAME: dict[str, type[errors.TorusError]] = {
    cls.__name__: cls
    for cls in (
        errors.BlockNotExist,
        errors.CorruptBlock,
        errors.OutOfSpace,
        errors.BlockExists,
        errors.InvalidArgument,
        errors.BlockUnavailable,
        errors.Closed,
        errors.NotSupported,
        errors.StaleEpoch,
        errors.ReplicaRefused,
        errors.Unauthenticated,
        errors.PeerBusy,
    )
}

_FROM_CODE: dict[grpc.StatusCode, type[errors.TorusError]] = {
    grpc.StatusCode.NOT_FOUND: errors.BlockNotExist,
    grpc.StatusCode.DATA_LOSS: errors.CorruptBlock,
    grpc.StatusCode.ALREADY_EXISTS: errors.BlockExists,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.UNIMPLEMENTED: errors.NotSupported,
    # only the journal RPCs answer FAILED_PRECONDITION (a newer volume-lock epoch was seen)
    grpc.StatusCode.FAILED_PRECONDITION: errors.StaleEpoch,
}

#: Codes meaning "could not talk to the peer" rather than "the peer answered with an error".
_TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a server replies with for ``exc``."""
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(exc: grpc.RpcError, address: str, method: str) -> errors.TorusError:
    """Rebuild the torus error for a failed call to ``address``."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    name = None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_METADATA_KEY:
            name = value if isinstance(value, str) else value.decode("utf-8", "replace")
    msg = f"peer {address} {method}: {details or code.name}"
    if name and name in _BY_NAME:
        return error_by_name(name, msg, address)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.Unauthenticated(msg, address=address)
    if code in _TRANSPORT_CODES:
        return errors.PeerUnavailable(msg, address=address)
    if code in _FROM_CODE:
        return _FROM_CODE[code](msg)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Without the torus marker this is gRPC's own limit (message too large), not a full store.
        return errors.InvalidArgument(msg)
    return errors.ProtocolError(msg)


def error_by_name(name: str, msg: str, address: str) -> errors.TorusError:
    """The torus error a peer at ``address`` reported by its :func:`wire_name` (any transport);
    an unknown name is a :class:`~torus_core.errors.ProtocolError`."""
    cls = _BY_NAME.get(name)
    if cls is errors.BlockUnavailable or cls is errors.Closed:
        # The peer is up but cannot serve (shutting down, store closed): a peer-side outage.
        return errors.PeerUnavailable(msg, address=address)
    if cls is errors.Unauthenticated or cls is errors.PeerBusy:
        return cls(msg, address=address)
    if cls is not None:
        return cls(msg)
    return errors.ProtocolError(f"{msg} (unknown error type {name!r})")


def wire_name(exc: BaseException) -> str | None:
    """The torus class name sent in trailing metadata for ``exc`` (nearest known base class)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _BY_NAME and _BY_NAME[cls.__name__] is cls:
            return cls.__name__
    return None
