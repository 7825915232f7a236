"""The shipped event-log and lease-store conformance suites, run against SQLiteBackend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torus_sqlite.backend import SQLiteBackend

from torus_core.eventlog import MetadataBackend
from torus_core.testing.eventlog import EventLogContract, LeaseStoreContract


class _SQLiteFixtures:
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/meta.db"

    @pytest.fixture
    def backend(self, url: str) -> Iterator[MetadataBackend]:
        b = SQLiteBackend.from_url(url)
        yield b
        b.close()

    @pytest.fixture
    def backend_factory(self, url: str) -> Callable[[], MetadataBackend]:
        return lambda: SQLiteBackend.from_url(url)


class TestSQLiteEventLog(_SQLiteFixtures, EventLogContract):
    """EventLogContract on SQLite."""


class TestSQLiteLeaseStore(_SQLiteFixtures, LeaseStoreContract):
    """LeaseStoreContract on SQLite."""
