"""``RedisBackend``: the ``redis`` metadata backend (URL ``redis://[:password@]host:port/db``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torus_core.backend_kit import LogLeaseBackend
from torus_redis._config import RedisConfig, parse_url


class RedisBackend(LogLeaseBackend):
    """Event log and lease store on one Redis server.

    ``cluster_id`` is the identity marker written by the first append; ``torusd``/``torusctl``
    may record it and pass it back as the ``cluster_id`` option so that a server that lost its
    data is detected even across process restarts (:class:`~torus_core.errors.DataLossDetected`).
    """

    name: ClassVar[str] = "redis"

    def __init__(self, config: RedisConfig) -> None:
        # The client library is imported here, not at plugin registration (hookspecs rule).
        from torus_redis._client import RedisClient
        from torus_redis.eventlog import RedisEventLog
        from torus_redis.leases import RedisLeaseStore

        self.config = config
        self._client = RedisClient(config)
        self._log = RedisEventLog(self._client)
        self._leases = RedisLeaseStore(self._client)
        self._closed = False

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any] | None = None) -> RedisBackend:
        """Create a backend for ``url`` (connections are opened on first use)."""
        return cls(parse_url(url, options))

    @property
    def cluster_id(self) -> str | None:
        """The cluster id stored on the server (``None`` before the first append)."""
        self._check_open()
        self._client.call(self._client.verify_identity, check_identity=False)
        return self._client.known_cluster_id

    def wipe(self) -> None:
        """Delete every key under the prefix and forget the remembered identity."""
        self._check_open()
        c = self._client
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in self.config.prefix) + "*"

        def run() -> None:
            batch: list[bytes] = []
            for k in c.redis.scan_iter(match=pattern, count=1000):
                batch.append(k)
                if len(batch) >= 500:
                    c.redis.unlink(*batch)
                    batch.clear()
            if batch:
                c.redis.unlink(*batch)

        c.call(run, check_identity=False)
        c.forget()

    def close(self) -> None:
        """Close the connection pool. Idempotent."""
        if not self._closed:
            self._closed = True
            self._client.close()
