"""Group commit on SQLite: the shared GroupCommitContract, stalling writes with a held write lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from torus_sqlite.backend import SQLiteBackend

from torus_core.eventlog import MetadataBackend
from torus_core.testing.groupcommit import GroupCommitContract


class TestSQLiteGroupCommit(GroupCommitContract):
    """GroupCommitContract on SQLite."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[MetadataBackend]:
        b = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/meta.db?busy_timeout=30")
        yield b
        b.close()

    @pytest.fixture
    def stall(self, tmp_path: Path) -> Callable[[], AbstractContextManager[Any]]:
        @contextmanager
        def hold_write_lock() -> Iterator[None]:
            holder = sqlite3.connect(tmp_path / "meta.db", isolation_level=None)
            try:
                holder.execute("BEGIN IMMEDIATE")
                yield
                holder.execute("ROLLBACK")
            finally:
                holder.close()

        return hold_write_lock
