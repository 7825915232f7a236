"""Group commit on SQLite: the shared GroupCommitContract, stalling writes with a held write lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from torus_sqlite.backend import SQLiteBackend

from torus_core.testing.eventlog import BackendFromUrl
from torus_core.testing.groupcommit import GroupCommitContract


class TestSQLiteGroupCommit(BackendFromUrl, GroupCommitContract):
    """GroupCommitContract on SQLite."""

    backend_class = SQLiteBackend
    wipe_after = False

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/meta.db?busy_timeout=30"

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


def test_a_closed_connection_cannot_append_through_another_open_one(tmp_path: Path) -> None:
    from torus_core.errors import Closed
    from torus_core.testing.eventlog import ev

    url = f"sqlite:///{tmp_path}/meta.db"
    with SQLiteBackend.from_url(url) as open_one:
        closed = SQLiteBackend.from_url(url)
        log = closed.log
        assert log.committer is open_one.log.committer  # one group committer per file
        closed.close()
        with pytest.raises(Closed):
            log.append([ev("s", 1)])
        assert open_one.log.head_position() == 0
        assert open_one.log.append([ev("s", 1)]) == [1]
