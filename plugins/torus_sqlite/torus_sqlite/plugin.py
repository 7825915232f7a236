"""pluggy entry point of torus-sqlite: registers :class:`~torus_sqlite.backend.SQLiteBackend`."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import BackendDeclaration, Registry


@hookimpl
def torus_register_metadata_backends(registry: Registry) -> None:
    """Register the ``sqlite`` metadata backend (SQLAlchemy is imported only when used)."""
    from torus_sqlite.backend import SQLiteBackend

    registry.register(SQLiteBackend.name, SQLiteBackend)


@hookimpl
def torus_declare_backends() -> list[BackendDeclaration]:
    """``sqlite:///path.db`` selects the sqlite backend."""
    from torus_sqlite.backend import _OPTIONS

    return [
        BackendDeclaration(
            kind="metadata",
            name="sqlite",
            url_schemes=("sqlite",),
            config_keys=tuple(sorted(_OPTIONS)),
            install_hint="pip install torus-sqlite (brings SQLAlchemy 2)",
        )
    ]
