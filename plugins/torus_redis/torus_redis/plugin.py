"""pluggy entry point of torus-redis: registers :class:`~torus_redis.backend.RedisBackend` as ``redis``."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import BackendDeclaration, Registry


@hookimpl
def torus_register_metadata_backends(registry: Registry) -> None:
    """Register the redis metadata backend (the client library is imported lazily)."""
    from torus_redis.backend import RedisBackend

    registry.register(RedisBackend.name, RedisBackend)


@hookimpl
def torus_declare_backends() -> list[BackendDeclaration]:
    """``redis://`` and ``rediss://`` (TLS) select the redis backend."""
    from torus_redis._config import OPTION_NAMES

    return [
        BackendDeclaration(
            kind="metadata",
            name="redis",
            url_schemes=("redis", "rediss"),
            config_keys=tuple(OPTION_NAMES),
            install_hint="pip install torus-redis (brings redis-py)",
        )
    ]
