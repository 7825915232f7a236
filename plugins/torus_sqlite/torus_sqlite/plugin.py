"""pluggy entry point of torus-sqlite: registers :class:`~torus_sqlite.backend.SQLiteBackend`."""

from __future__ import annotations

from torus_core import hookimpl
from torus_core.registry import Registry


@hookimpl
def torus_register_metadata_backends(registry: Registry) -> None:
    """Register the ``sqlite`` metadata backend (SQLAlchemy is imported only when used)."""
    from torus_sqlite.backend import SQLiteBackend

    registry.register(SQLiteBackend.name, SQLiteBackend)
