"""The Redis connection: timeouts, error translation in one place, and data-loss detection.

Every server call goes through :meth:`RedisClient.call`. It maps redis-py errors with
:data:`ERRORS` (outages become :class:`MetadataUnavailable` within the socket timeout), retries
once when a pooled connection turns out to be dead (a restarted server), and, whenever a new
connection was opened, first re-checks the cluster identity:

* ``<prefix>cluster-id`` is written by the first append; a client that knows the id (learned
  from the server, or passed as the ``cluster_id`` option by ``torusd``/``torusctl``) and then
  finds the key missing or different raises :class:`DataLossDetected`;
* the head position may never go backwards within one process (checked on every head read and
  inside the append script).

:meth:`RedisBackend.wipe` is the one deliberate reset; it clears what the client remembers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from torus_core.errors import (
    ConfigError,
    DataLossDetected,
    MetadataError,
    MetadataUnavailable,
    TorusError,
)
from torus_redis._config import RedisConfig

BACKEND = "redis"
T = TypeVar("T")

#: redis-py exception -> torus exception, most specific first (one table, used by ``translate``).
ERRORS: list[tuple[type[Exception], Callable[[str], TorusError]]] = [
    (redis.exceptions.AuthenticationError, lambda m: ConfigError(f"redis authentication failed: {m}")),
    (redis.exceptions.AuthorizationError, lambda m: ConfigError(f"redis permission denied: {m}")),
    (redis.exceptions.NoPermissionError, lambda m: ConfigError(f"redis permission denied (ACL): {m}")),
    (
        redis.exceptions.TimeoutError,
        lambda m: MetadataUnavailable(f"redis did not answer in time: {m}", backend=BACKEND),
    ),
    (
        redis.exceptions.BusyLoadingError,
        lambda m: MetadataUnavailable(f"redis is loading: {m}", backend=BACKEND),
    ),
    (
        redis.exceptions.ConnectionError,
        lambda m: MetadataUnavailable(f"redis unavailable: {m}", backend=BACKEND),
    ),
    (
        redis.exceptions.ReadOnlyError,
        lambda m: MetadataUnavailable(f"redis is read-only: {m}", backend=BACKEND),
    ),
    (redis.exceptions.ResponseError, lambda m: MetadataError(f"redis error: {m}")),
    (redis.exceptions.RedisError, lambda m: MetadataError(f"redis error: {m}")),
]


#: Added to connection errors of a ``rediss://`` client: a refused handshake looks like an outage.
TLS_HINT = (
    "over TLS; if the server is up, the TLS handshake was refused: check ca_file (the CA that signed "
    "the server), and cert_file/key_file (a client certificate the server's CA trusts)"
)


def translate(exc: Exception, *, tls: bool = False) -> TorusError:
    """Map a redis-py exception to the torus exception it means (``tls``: a ``rediss://`` client)."""
    message = str(exc) or type(exc).__name__
    if (
        tls
        and isinstance(exc, redis.exceptions.ConnectionError)
        and not isinstance(exc, (redis.exceptions.TimeoutError, redis.exceptions.AuthenticationError))
    ):
        message = f"{message} ({TLS_HINT})"
    for cls, factory in ERRORS:
        if isinstance(exc, cls):
            return factory(message)
    return MetadataError(f"redis error: {exc!r}")


def _pooled_connection_died(exc: Exception) -> bool:
    """Whether ``exc`` means a pooled connection died (worth one retry on a new connection).

    Connection errors are; timeouts and failed authentication are not.
    """
    return (
        isinstance(exc, redis.exceptions.ConnectionError)
        and not isinstance(exc, redis.exceptions.TimeoutError)
        and not isinstance(exc, redis.exceptions.AuthenticationError)
    )


class RedisClient:
    """A redis-py client plus the identity this process has seen (cluster id, head)."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        p = config.prefix
        self.head_key = f"{p}head"
        self.cluster_key = f"{p}cluster-id"
        self.known_cluster_id: str | None = config.cluster_id
        self.seen_head = 0
        self._lock = threading.Lock()
        self._reconnected = True  # check identity before the first call
        self.tls = config.url.startswith("rediss:")
        try:
            # Typed Any: responses are bytes (decode_responses=False); redis-py's stubs say bytes | str.
            self.redis: Any = redis.Redis.from_url(
                config.url,
                socket_timeout=config.timeout,
                socket_connect_timeout=config.timeout,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
                redis_connect_func=self._on_connect,
                **config.client_kwargs,
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad redis URL or options: {exc}") from exc

    def _on_connect(self, connection: Any) -> None:
        connection.on_connect()
        self._reconnected = True

    def call(self, fn: Callable[[], T], *, check_identity: bool = True) -> T:
        """Run ``fn`` (redis commands) with error translation, one dead-connection retry and
        the identity check after any (re)connection."""
        for attempt in (0, 1):
            try:
                if check_identity and self._reconnected:
                    self.verify_identity()
                result = fn()
                if check_identity and self._reconnected:
                    self.verify_identity()  # fn opened a new connection: the server may be a new one
                return result
            except redis.exceptions.RedisError as exc:
                if attempt == 0 and _pooled_connection_died(exc):
                    continue  # the server restarted: reconnect once
                raise translate(exc, tls=self.tls) from exc
        raise AssertionError("unreachable")

    def evalsha(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a registered ``script`` on a pooled connection directly (the append hot path).

        The same outcome as ``script(keys=keys, args=args)`` through :meth:`call` without the
        identity check, minus redis-py's per-command wrappers (retry object, observability
        hooks), which cost about a third of a loopback round trip: errors are translated the
        same way, a dead pooled connection is replaced and the call re-sent once, a script the
        server does not know (``NOSCRIPT``, e.g. after a restart) is loaded and re-run.
        """
        pool = self.redis.connection_pool
        for attempt in (0, 1):
            conn = None
            try:
                conn = pool.get_connection()
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                try:
                    return conn.read_response()
                except redis.exceptions.NoScriptError:
                    conn.send_command("SCRIPT", "LOAD", script.script)
                    sha = conn.read_response()
                    script.sha = sha.decode() if isinstance(sha, bytes) else sha
                    conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    return conn.read_response()
            except redis.exceptions.RedisError as exc:
                if attempt == 0 and _pooled_connection_died(exc):
                    continue  # the server restarted: reconnect once
                raise translate(exc, tls=self.tls) from exc
            finally:
                if conn is not None:
                    if getattr(conn, "should_reconnect", lambda: False)():
                        conn.disconnect()
                    pool.release(conn)
        raise AssertionError("unreachable")

    def verify_identity(self) -> None:
        """Compare the server's cluster id and head with what this process knows."""
        self._reconnected = False
        baseline = self.seen_head
        try:
            cid_raw, head_raw = self.redis.mget([self.cluster_key, self.head_key])
        except Exception:
            self._reconnected = True
            raise
        cid = cid_raw.decode() if cid_raw is not None else None
        head = int(head_raw) if head_raw is not None else 0
        self.observe(cid, head, baseline)

    def observe(self, cid: str | None, head: int, baseline: int) -> None:
        """Record a (cluster id, head) read from the server; raise if data was lost.

        ``baseline`` is :attr:`seen_head` as it was *before* the request was sent: a head seen
        earlier must not be larger than the one the server reports now (concurrent threads of
        one client may have seen newer heads meanwhile, which is fine).
        """
        with self._lock:
            known = self.known_cluster_id
            if known is not None and cid is None:
                self._reconnected = True
                raise DataLossDetected(
                    f"redis {self.config.url} holds no torus data (key {self.cluster_key!r} is missing), "
                    f"but this client knows cluster {known} at head position {self.seen_head}: the server "
                    "lost its data (restart without persistence?). Refusing to start an empty history; "
                    "restore the data, migrate from a backup, or wipe deliberately."
                )
            if known is not None and cid != known:
                self._reconnected = True
                raise DataLossDetected(
                    f"redis {self.config.url} holds cluster {cid}, expected cluster {known}: wrong server "
                    "or the data was replaced."
                )
            if head < baseline:
                self._reconnected = True
                raise DataLossDetected(
                    f"redis {self.config.url}: head position went backwards from {baseline} to "
                    f"{head}: events were lost."
                )
            self.seen_head = max(self.seen_head, head)
            if cid is not None:
                self.known_cluster_id = cid

    def forget(self) -> None:
        """Forget the identity (after a deliberate wipe)."""
        with self._lock:
            self.known_cluster_id = None
            self.seen_head = 0

    def close(self) -> None:
        """Close the connection pool."""
        self.redis.close()
