"""torus_core.groupcommit: grouping, per-request outcomes, bounded waits, leadership hand-off."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torus_core.errors import MetadataError, MetadataUnavailable
from torus_core.groupcommit import GroupCommitter

WAIT = 10.0


def _until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


class _Gate:
    """A commit function that records its groups and blocks while the gate is closed."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.groups: list[list[int]] = []

    def commit(self, requests: Sequence[int]) -> list[int | BaseException]:
        assert self.open.wait(WAIT)
        self.groups.append(list(requests))
        return [ValueError(f"odd {r}") if r % 2 else r * 10 for r in requests]


def _submit_in_thread(
    gc: GroupCommitter[int, int], value: int, out: dict[int, object], **kw: float
) -> threading.Thread:
    def run() -> None:
        try:
            out[value] = gc.submit(value, wait_timeout=kw.get("wait_timeout", WAIT))
        except BaseException as exc:
            out[value] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_requests_queued_behind_a_running_commit_are_committed_as_one_group() -> None:
    gate = _Gate()
    gc: GroupCommitter[int, int] = GroupCommitter(gate.commit, backend="test")
    out: dict[int, object] = {}
    gate.open.clear()
    threads = [_submit_in_thread(gc, 0, out)]
    _until(lambda: gc.busy and gc.queued == 0)
    for n, v in enumerate((2, 3, 4), start=1):
        threads.append(_submit_in_thread(gc, v, out))
        _until(lambda n=n: gc.queued == n)  # type: ignore[misc]
    gate.open.set()
    for t in threads:
        t.join(WAIT)
    assert gate.groups == [[0], [2, 3, 4]]
    assert out[0] == 0 and out[2] == 20 and out[4] == 40
    assert isinstance(out[3], ValueError)  # one request's failure is its own
    assert (gc.commits, gc.committed, gc.busy) == (2, 4, False)


def test_fits_and_max_group_bound_each_group() -> None:
    gate = _Gate()
    gc: GroupCommitter[int, int] = GroupCommitter(
        gate.commit, backend="test", max_group=3, fits=lambda group, r: sum(group) + r <= 20
    )
    out: dict[int, object] = {}
    gate.open.clear()
    threads = [_submit_in_thread(gc, 0, out)]
    _until(lambda: gc.busy and gc.queued == 0)
    for n, v in enumerate((2, 4, 6, 8, 10, 12), start=1):
        threads.append(_submit_in_thread(gc, v, out))
        _until(lambda n=n: gc.queued == n)  # type: ignore[misc]
    gate.open.set()
    for t in threads:
        t.join(WAIT)
    assert gate.groups == [[0], [2, 4, 6], [8, 10], [12]]
    assert all(out[v] == v * 10 for v in (0, 2, 4, 6, 8, 10, 12))


def test_a_raising_commit_fails_its_group_and_the_next_caller_still_commits() -> None:
    calls: list[list[int]] = []

    def commit(requests: Sequence[int]) -> list[int | BaseException]:
        calls.append(list(requests))
        if len(calls) == 1:
            raise MetadataUnavailable("server gone", backend="test")
        return list(requests)

    gc: GroupCommitter[int, int] = GroupCommitter(commit, backend="test")
    with pytest.raises(MetadataUnavailable):
        gc.submit(1, wait_timeout=WAIT)
    assert gc.submit(2, wait_timeout=WAIT) == 2
    assert not gc.busy


def test_a_commit_returning_the_wrong_number_of_outcomes_is_an_error() -> None:
    gc: GroupCommitter[int, int] = GroupCommitter(lambda rs: [], backend="test")
    with pytest.raises(MetadataError, match="0 outcomes for 1"):
        gc.submit(1, wait_timeout=WAIT)


def test_a_queued_request_that_waits_too_long_is_withdrawn_unsent() -> None:
    gate = _Gate()
    gc: GroupCommitter[int, int] = GroupCommitter(gate.commit, backend="test")
    out: dict[int, object] = {}
    gate.open.clear()
    lead = _submit_in_thread(gc, 0, out)
    _until(lambda: gc.busy and gc.queued == 0)
    t0 = time.monotonic()
    with pytest.raises(MetadataUnavailable, match="nothing was sent") as info:
        gc.submit(2, wait_timeout=0.2)
    assert info.value.backend == "test"
    assert time.monotonic() - t0 < 5
    assert gc.queued == 0
    gate.open.set()
    lead.join(WAIT)
    assert gate.groups == [[0]]  # the withdrawn request was never committed
    assert gc.submit(4, wait_timeout=WAIT) == 40


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=24), st.integers(1, 8))
def test_every_request_gets_exactly_its_own_outcome_under_concurrency(
    sizes: list[int], max_group: int
) -> None:
    """Concurrent 'appends' of ``size`` positions get contiguous, gap-free ranges from a counter."""
    head = [0]
    lock = threading.Lock()

    def commit(requests: Sequence[int]) -> list[list[int] | BaseException]:
        with lock:
            outcomes: list[list[int] | BaseException] = []
            for n in requests:
                outcomes.append(list(range(head[0] + 1, head[0] + 1 + n)))
                head[0] += n
            return outcomes

    gc: GroupCommitter[int, list[int]] = GroupCommitter(commit, backend="test", max_group=max_group)
    results: list[tuple[int, list[int]]] = []
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            got = gc.submit(n, wait_timeout=WAIT)
            with lock:
                results.append((n, got))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == []
    assert sorted(n for n, _ in results) == sorted(sizes)
    for n, got in results:
        assert got == list(range(got[0], got[0] + n))
    assert sorted(p for _, got in results for p in got) == list(range(1, sum(sizes) + 1))
    assert gc.committed == len(sizes) and not gc.busy
