"""pluggy entry point of torus-etcd: registers :class:`~torus_etcd.backend.EtcdBackend` as ``etcd``."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import BackendDeclaration, Registry


@hookimpl
def torus_register_metadata_backends(registry: Registry) -> None:
    """Register the etcd metadata backend (the client library is imported lazily)."""
    from torus_etcd.backend import EtcdBackend

    registry.register(EtcdBackend.name, EtcdBackend)


@hookimpl
def torus_declare_backends() -> list[BackendDeclaration]:
    """``etcd://`` and ``etcds://`` (TLS with the system roots) select the etcd backend."""
    from torus_etcd.backend import OPTION_NAMES

    return [
        BackendDeclaration(
            kind="metadata",
            name="etcd",
            url_schemes=("etcd", "etcds"),
            config_keys=OPTION_NAMES,
            install_hint="pip install torus-etcd (brings cslab-etcd3, grpcio and protobuf)",
        )
    ]
