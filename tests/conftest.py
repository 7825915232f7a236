"""Fixtures shared by the core tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torus_sqlite.backend import SQLiteBackend

from torus_core.testing.closing import closing_all


@pytest.fixture
def open_backend(tmp_path: Path) -> Iterator[Callable[[], SQLiteBackend]]:
    """Open (another) SQLite backend on ``tmp_path/meta.db``; all are closed after the test."""
    with closing_all(lambda: SQLiteBackend.from_url(f"sqlite:///{tmp_path}/meta.db")) as open_:
        yield open_
