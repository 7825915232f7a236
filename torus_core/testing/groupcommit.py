"""Conformance suite for group-committed appends (:mod:`torus_core.groupcommit`).

A metadata plugin whose event log groups concurrent appends exposes the committer as
``backend.log.committer`` and proves, with this contract, that grouping keeps the
:mod:`torus_core.eventlog` rules: every batch in a group is atomic and accepted or refused on
its own (a stale batch fails alone), positions are gap-free and contiguous per batch.

The test forces a group deterministically with real components: the ``stall`` fixture (a
context manager) makes the store stop answering writes (SIGSTOP of the server, or another
connection holding SQLite's write lock) while one append is in flight; further appends queue
behind it and are committed together once the store answers again. Subclass and override
``backend`` (a fresh, empty store whose calls time out well after the stall ends) and
``stall``::

    class TestSQLiteGroupCommit(GroupCommitContract):
        @pytest.fixture
        def backend(self, tmp_path): ...
        @pytest.fixture
        def stall(self, tmp_path): return lambda: hold_write_lock(tmp_path / "meta.db")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import pytest

from torus_core.errors import CompareFailed
from torus_core.eventlog import MetadataBackend, NewEvent
from torus_core.testing.eventlog import ev

__all__ = ["GroupCommitContract"]

#: Upper bound on any wait in these tests (seconds).
WAIT = 20.0


def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


class _Appender(threading.Thread):
    """A thread doing one append and keeping its outcome."""

    def __init__(self, backend: MetadataBackend, batch: list[NewEvent]) -> None:
        super().__init__(daemon=True)
        self.backend = backend
        self.batch = batch
        self.outcome: list[int] | BaseException | None = None

    def run(self) -> None:
        try:
            self.outcome = self.backend.log.append(self.batch)
        except BaseException as exc:
            self.outcome = exc


class GroupCommitContract:
    """Behaviour of an event log that group-commits concurrent appends."""

    @pytest.fixture
    def backend(self) -> Iterator[MetadataBackend]:
        """Yield a fresh, empty backend (override)."""
        raise NotImplementedError("override the `backend` fixture")
        yield  # pragma: no cover

    @pytest.fixture
    def stall(self) -> Callable[[], AbstractContextManager[Any]]:
        """Return a context-manager factory that stalls the store's writes while entered (override)."""
        raise NotImplementedError("override the `stall` fixture")

    def _grouped(
        self,
        backend: MetadataBackend,
        stall: Callable[[], AbstractContextManager[Any]],
        first: list[NewEvent],
        queued: Sequence[list[NewEvent] | tuple[MetadataBackend, list[NewEvent]]],
    ) -> tuple[_Appender, list[_Appender], int]:
        """Append ``first`` (in flight while stalled), queue ``queued`` behind it, then release.

        A queued item is a batch, or ``(connection, batch)`` to append through another connection
        to the same store. Returns the appenders and how many commits the committer ran meanwhile.
        """
        committer = backend.log.committer  # type: ignore[attr-defined]
        commits_before = committer.commits
        threads: list[_Appender] = []
        with stall():
            lead = _Appender(backend, first)
            lead.start()
            _until(lambda: committer.busy and committer.queued == 0, "the first append is in flight")
            for n, item in enumerate(queued, start=1):
                conn, batch = item if isinstance(item, tuple) else (backend, item)
                t = _Appender(conn, batch)
                threads.append(t)
                t.start()
                _until(lambda n=n: committer.queued == n, f"{n} appends are queued")  # type: ignore[misc]
            assert lead.outcome is None, "the stall did not hold the first append"
        for t in [lead, *threads]:
            t.join(WAIT)
            assert not t.is_alive(), "an appender hung"
        return lead, threads, committer.commits - commits_before

    def test_a_stale_batch_grouped_with_good_ones_fails_alone(
        self, backend: MetadataBackend, stall: Callable[[], AbstractContextManager[Any]]
    ) -> None:
        assert backend.log.append([ev("stale", 1)]) == [1]
        lead, (stale, good_c, good_d), commits = self._grouped(
            backend,
            stall,
            [ev("a", 1)],
            [[ev("stale", 1, state=b"dup")], [ev("c", 1), ev("c", 2), ev("c", 3)], [ev("d", 1), ev("d", 2)]],
        )
        assert lead.outcome == [2]
        assert isinstance(stale.outcome, CompareFailed), stale.outcome
        assert good_c.outcome == [3, 4, 5]
        assert good_d.outcome == [6, 7]
        assert commits == 2, "the three queued batches were not committed as one group"
        stored = backend.log.read_all()
        assert [e.position for e in stored] == list(range(1, 8))
        assert [(e.stream_id, e.version) for e in stored] == [
            ("stale", 1), ("a", 1), ("c", 1), ("c", 2), ("c", 3), ("d", 1), ("d", 2)
        ]  # fmt: skip
        assert backend.log.read_stream("stale")[0].state != b"dup"
        assert backend.log.head_position() == 7

    def test_conflicting_batches_in_one_group_are_decided_in_queue_order(
        self, backend: MetadataBackend, stall: Callable[[], AbstractContextManager[Any]]
    ) -> None:
        lead, (first, rival, follow_up), _ = self._grouped(
            backend,
            stall,
            [ev("a", 1)],
            [[ev("x", 1), ev("y", 1)], [ev("x", 1, state=b"rival")], [ev("x", 2)]],
        )
        assert lead.outcome == [1]
        assert first.outcome == [2, 3]
        assert isinstance(rival.outcome, CompareFailed), rival.outcome
        assert follow_up.outcome == [4]
        assert [e.state for e in backend.log.read_stream("x")] == [b"{}", b"{}"]
        assert [e.position for e in backend.log.read_all()] == [1, 2, 3, 4]

    def test_many_concurrent_writers_get_contiguous_gap_free_positions(
        self, backend: MetadataBackend
    ) -> None:
        writers, rounds = 8, 12
        results: dict[int, list[list[int]]] = {i: [] for i in range(writers)}
        errors: list[BaseException] = []
        committer = backend.log.committer  # type: ignore[attr-defined]
        committed_before = committer.committed

        def work(i: int) -> None:
            version = 0
            try:
                for r in range(rounds):
                    size = 1 + (i + r) % 3
                    batch = [ev(f"w{i}", version + k + 1) for k in range(size)]
                    results[i].append(backend.log.append(batch))
                    version += size
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 3)
            assert not t.is_alive(), "writer hung"
        assert errors == []
        stored = backend.log.read_all()
        assert [e.position for e in stored] == list(range(1, len(stored) + 1))
        expected_sizes = {i: [1 + (i + r) % 3 for r in range(rounds)] for i in range(writers)}
        assert len(stored) == sum(sum(v) for v in expected_sizes.values())
        by_pos = {e.position: e for e in stored}
        for i, batches in results.items():
            assert [len(p) for p in batches] == expected_sizes[i]
            for positions in batches:
                assert positions == list(range(positions[0], positions[0] + len(positions)))
                assert {by_pos[p].stream_id for p in positions} == {f"w{i}"}
            versions = [e.version for e in backend.log.read_stream(f"w{i}")]
            assert versions == list(range(1, sum(expected_sizes[i]) + 1))
        assert committer.committed - committed_before == writers * rounds
