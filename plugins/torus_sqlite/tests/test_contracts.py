"""The shipped event-log and lease-store conformance suites, run against SQLiteBackend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import settings
from torus_sqlite.backend import SQLiteBackend
from torus_sqlite.eventlog import SQLiteEventLog

from torus_core.eventlog import NewEvent
from torus_core.testing.eventlog import (
    MACHINE_SETTINGS,
    BackendFromUrl,
    EventLogContract,
    LeaseStoreContract,
    run_eventlog_machine,
)


class _SQLiteFixtures(BackendFromUrl):
    backend_class = SQLiteBackend
    wipe_after = False

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/meta.db"


class TestSQLiteEventLog(_SQLiteFixtures, EventLogContract):
    """EventLogContract on SQLite."""


class TestSQLiteLeaseStore(_SQLiteFixtures, LeaseStoreContract):
    """LeaseStoreContract on SQLite."""


class _LossyLog(SQLiteEventLog):
    """A deliberately broken log: silently drops every event after the first of a batch."""

    def append(self, events_: Sequence[NewEvent]) -> list[int]:
        batch = list(events_)
        if not batch:
            return []
        first = super().append(batch[:1])
        return list(range(first[0], first[0] + len(batch)))


def test_eventlog_machine_detects_a_log_that_loses_events(url: str) -> None:
    backend = SQLiteBackend.from_url(url)
    try:
        backend._log = _LossyLog(backend._db)
        with pytest.raises(AssertionError):
            run_eventlog_machine(
                lambda: backend,
                settings_=settings(MACHINE_SETTINGS, max_examples=200, report_multiple_bugs=False),
            )
    finally:
        backend.close()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/meta.db"
