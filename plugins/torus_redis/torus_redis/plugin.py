"""pluggy entry point of torus-redis: registers :class:`~torus_redis.backend.RedisBackend` as ``redis``."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import Registry


@hookimpl
def torus_register_metadata_backends(registry: Registry) -> None:
    """Register the redis metadata backend (the client library is imported lazily)."""
    from torus_redis.backend import RedisBackend

    registry.register(RedisBackend.name, RedisBackend)
