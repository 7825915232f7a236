"""The lease store on etcd leases: keys attached to a lease vanish when it expires.

Keys live under ``P kv/``. etcd lease TTLs are whole seconds, so a requested TTL is rounded up
(minimum 1 s). etcd does no keep-alive by itself here: the holder calls :meth:`keepalive`
(``torusd`` does it from its heartbeat loop); a lease that expired or was revoked raises
:class:`LeaseNotFound`.
"""

from __future__ import annotations

import math

import grpc
from etcd3 import etcdrpc

from torus_core.errors import InvalidArgument, LeaseNotFound, MetadataError
from torus_core.eventlog import Lease, LeaseStore
from torus_etcd._append import prefix_end
from torus_etcd._transport import (
    DeleteRangeResponse,
    EtcdTransport,
    LeaseGrantResponse,
    LeaseKeepAliveResponse,
    RangeResponse,
    StreamCall,
    TxnResponse,
    translate,
)


def _check_key(key: str) -> bytes:
    if not isinstance(key, str) or not key:
        raise InvalidArgument("lease-store keys are non-empty strings")
    return key.encode()


def _check_value(value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgument("lease-store values are bytes")
    return bytes(value)


class EtcdLeaseStore(LeaseStore):
    """:class:`LeaseStore` on etcd v3 leases."""

    def __init__(self, transport: EtcdTransport, prefix: bytes) -> None:
        self._t = transport
        self._p = prefix + b"kv/"

    def grant(self, ttl: float) -> Lease:
        """Grant an etcd lease of ``ceil(ttl)`` seconds."""
        if not ttl > 0:
            raise InvalidArgument("lease ttl must be > 0")
        resp: LeaseGrantResponse = self._t.call(
            "Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        )
        if resp.error:
            raise MetadataError(f"etcd refused the lease: {resp.error}")
        return Lease(id=resp.ID, ttl=float(ttl))

    def keepalive(self, lease: Lease) -> None:
        """Refresh ``lease`` once (one LeaseKeepAlive round trip); LeaseNotFound if it is gone."""
        req = etcdrpc.LeaseKeepAliveRequest(ID=lease.id)
        call: StreamCall[LeaseKeepAliveResponse]
        call, _ep = self._t.stream("Lease", "LeaseKeepAlive", iter([req]), self._t.config.timeout)
        try:
            resp = next(iter(call), None)
        except grpc.RpcError as exc:
            self._t.fail_over()
            raise translate(exc) from exc
        finally:
            call.cancel()
        if resp is None or resp.TTL <= 0:
            raise LeaseNotFound(f"lease {lease.id:x} expired or was revoked")

    def revoke(self, lease: Lease) -> None:
        """Revoke ``lease`` (its keys are deleted); a missing lease is a no-op."""
        try:
            self._t.call("Lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease.id))
        except LeaseNotFound:
            pass

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        """Set ``key``, attached to ``lease`` if given."""
        req = etcdrpc.PutRequest(
            key=self._p + _check_key(key), value=_check_value(value), lease=lease.id if lease else 0
        )
        self._t.call("KV", "Put", req)

    def put_if_absent(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        """Set ``key`` only if absent; return whether it was set."""
        k = self._p + _check_key(key)
        put = etcdrpc.PutRequest(key=k, value=_check_value(value), lease=lease.id if lease else 0)
        req = etcdrpc.TxnRequest(
            compare=[
                etcdrpc.Compare(
                    result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.CREATE, key=k, create_revision=0
                )
            ],
            success=[etcdrpc.RequestOp(request_put=put)],
        )
        resp: TxnResponse = self._t.call("KV", "Txn", req)
        return bool(resp.succeeded)

    def get(self, key: str) -> bytes | None:
        """Value of a live key or ``None``."""
        resp: RangeResponse = self._t.call("KV", "Range", etcdrpc.RangeRequest(key=self._p + _check_key(key)))
        return bytes(resp.kvs[0].value) if resp.kvs else None

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """All live keys starting with ``prefix``."""
        if not isinstance(prefix, str):
            raise InvalidArgument("prefix must be a string")
        start = self._p + prefix.encode()
        resp: RangeResponse = self._t.call(
            "KV", "Range", etcdrpc.RangeRequest(key=start, range_end=prefix_end(start))
        )
        n = len(self._p)
        return {kv.key[n:].decode(): bytes(kv.value) for kv in resp.kvs}

    def delete(self, key: str, *, expected: bytes | None = None) -> bool:
        """Delete ``key`` (only if its value equals ``expected`` when given)."""
        k = self._p + _check_key(key)
        if expected is None:
            removal: DeleteRangeResponse = self._t.call(
                "KV", "DeleteRange", etcdrpc.DeleteRangeRequest(key=k)
            )
            return bool(removal.deleted)
        req = etcdrpc.TxnRequest(
            compare=[
                etcdrpc.Compare(
                    result=etcdrpc.Compare.EQUAL,
                    target=etcdrpc.Compare.VALUE,
                    key=k,
                    value=_check_value(expected),
                )
            ],
            success=[etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=k))],
        )
        txn: TxnResponse = self._t.call("KV", "Txn", req)
        return bool(txn.succeeded and txn.responses[0].response_delete_range.deleted)
