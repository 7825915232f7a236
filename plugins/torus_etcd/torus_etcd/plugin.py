"""pluggy entry point of torus-etcd: registers :class:`~torus_etcd.backend.EtcdBackend` as ``etcd``."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import Registry


@hookimpl
def torus_register_metadata_backends(registry: Registry) -> None:
    """Register the etcd metadata backend (the client library is imported lazily)."""
    from torus_etcd.backend import EtcdBackend

    registry.register(EtcdBackend.name, EtcdBackend)
