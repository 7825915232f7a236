"""The lease store on Redis: TTL keys whose attached keys expire with them.

A lease is ``P lease:<id>`` holding its TTL in ms, with ``PEXPIRE``. A key attached to a lease
is stored as ``P kv:<key>`` = ``b"<lease id>|" + value`` with the lease's *remaining* TTL, and
listed in the set ``P lease-keys:<id>``; ``keepalive`` (a Lua script) re-arms the lease, the set
and every key still owned by the lease to the full TTL in one atomic step. So when the holder
stops renewing, the lease and its keys expire together on the server — no client needs to be
alive to clean up. Unattached keys are stored as ``b"0|" + value`` without expiry.
"""

from __future__ import annotations

import secrets

from torus_core.errors import InvalidArgument, LeaseNotFound
from torus_core.eventlog import Lease, LeaseStore
from torus_redis import _scripts
from torus_redis._client import RedisClient


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidArgument("lease-store keys are non-empty strings")
    return key


def _check_value(value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgument("lease-store values are bytes")
    return bytes(value)


def _strip(raw: bytes) -> bytes:
    return raw[raw.index(b"|") + 1 :]


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


class RedisLeaseStore(LeaseStore):
    """:class:`LeaseStore` on Redis TTL keys and Lua scripts."""

    def __init__(self, client: RedisClient) -> None:
        self._c = client
        p = client.config.prefix
        self._kv = f"{p}kv:"
        self._lease = f"{p}lease:"
        self._set = f"{p}lease-keys:"
        r = client.redis
        self._put = r.register_script(_scripts.PUT)
        self._keepalive = r.register_script(_scripts.KEEPALIVE)
        self._revoke = r.register_script(_scripts.REVOKE)
        self._delete = r.register_script(_scripts.DELETE)

    def grant(self, ttl: float) -> Lease:
        """Create a lease of ``ttl`` seconds (millisecond resolution)."""
        if not ttl > 0:
            raise InvalidArgument("lease ttl must be > 0")
        ms = max(1, int(ttl * 1000))
        for _ in range(8):
            lease_id = secrets.randbits(62) + 1
            if self._c.call(lambda i=lease_id: self._c.redis.set(f"{self._lease}{i}", ms, px=ms, nx=True)):  # type: ignore[misc]
                return Lease(id=lease_id, ttl=float(ttl))
        raise AssertionError("could not pick a free lease id")  # 8 collisions in 2**62: impossible

    def keepalive(self, lease: Lease) -> None:
        """Re-arm the lease and its keys to the full TTL; LeaseNotFound if it is gone."""
        keys = [f"{self._lease}{lease.id}", f"{self._set}{lease.id}"]
        if not self._c.call(lambda: self._keepalive(keys=keys, args=[lease.id])):
            raise LeaseNotFound(f"lease {lease.id:x} expired or was revoked")

    def revoke(self, lease: Lease) -> None:
        """Delete the lease and the keys it still owns; a missing lease is a no-op."""
        keys = [f"{self._lease}{lease.id}", f"{self._set}{lease.id}"]
        self._c.call(lambda: self._revoke(keys=keys, args=[lease.id]))

    def _put_script(self, key: str, value: bytes, lease: Lease | None, nx: bool) -> int:
        lid = lease.id if lease is not None else 0
        keys = [self._kv + _check_key(key), f"{self._lease}{lid}", f"{self._set}{lid}"]
        args: list[bytes | int | str] = [lid, _check_value(value), "1" if nx else "0"]
        res = int(self._c.call(lambda: self._put(keys=keys, args=args)))
        if res == -1:
            raise LeaseNotFound(f"lease {lid:x} expired or was revoked")
        return res

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> None:
        """Set ``key``, attached to ``lease`` if given."""
        self._put_script(key, value, lease, nx=False)

    def put_if_absent(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        """Set ``key`` only if absent (or expired); return whether it was set."""
        return self._put_script(key, value, lease, nx=True) == 1

    def get(self, key: str) -> bytes | None:
        """Value of a live key or ``None``."""
        raw = self._c.call(lambda: self._c.redis.get(self._kv + _check_key(key)))
        return None if raw is None else _strip(raw)

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """All live keys starting with ``prefix`` (SCAN + MGET)."""
        if not isinstance(prefix, str):
            raise InvalidArgument("prefix must be a string")
        pattern = _glob_escape(self._kv + prefix) + "*"

        def scan() -> dict[str, bytes]:
            names = sorted(set(self._c.redis.scan_iter(match=pattern, count=1000)))
            if not names:
                return {}
            values = self._c.redis.mget(names)
            n = len(self._kv)
            return {k[n:].decode(): _strip(v) for k, v in zip(names, values, strict=True) if v is not None}

        return self._c.call(scan)

    def delete(self, key: str, *, expected: bytes | None = None) -> bool:
        """Delete ``key`` (only if its value equals ``expected`` when given)."""
        arg = b"0" if expected is None else b"1" + _check_value(expected)
        return bool(self._c.call(lambda: self._delete(keys=[self._kv + _check_key(key)], args=[arg])))
