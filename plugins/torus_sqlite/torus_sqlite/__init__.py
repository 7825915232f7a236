"""torus metadata backend on SQLite (SQLAlchemy 2, WAL): the embedded default."""

from __future__ import annotations

__all__ = ["SQLiteBackend"]


def __getattr__(name: str) -> object:
    if name == "SQLiteBackend":
        from torus_sqlite.backend import SQLiteBackend

        return SQLiteBackend
    raise AttributeError(name)
