"""Group commit: concurrent callers in one process share one write to the metadata server.

A metadata backend's ``append`` hands its prepared request to a :class:`GroupCommitter` and
blocks for its own outcome. A caller arriving while no commit is running commits its request
at once, alone. Callers arriving while a commit runs queue up; when the running commit is done,
the oldest queued caller becomes the *leader*: it takes the queued requests (FIFO, as many as
``fits`` admits, at least one) and runs the backend's ``commit`` function once for the whole
group, which returns one outcome per request (a result or an exception). So N concurrent writers
cost about one round trip (one fsync, one consensus write) per group instead of one each. When
its own request is done, a leader hands leadership to the oldest queued caller, so no thread
keeps working for others indefinitely.

There is no background thread: nothing to start or stop, nothing left running after close.

Waiting is bounded: a caller whose request is still *queued* after ``wait_timeout`` seconds
removes it (nothing was sent) and raises :class:`~torus_core.errors.MetadataUnavailable`; a
request already *taken* into a commit waits for that commit (bounded by the backend's own call
timeout) up to another ``wait_timeout``, then raises ``MetadataUnavailable`` with an unknown
outcome, exactly like a timed-out call.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from torus_core.errors import MetadataError, MetadataUnavailable

Req = TypeVar("Req")
Res = TypeVar("Res")


class _Pending(Generic[Req, Res]):
    """One caller's request and, once committed, its outcome."""

    __slots__ = ("cond", "done", "leader", "outcome", "request", "taken")

    def __init__(self, request: Req) -> None:
        self.request = request
        self.outcome: Res | BaseException | None = None
        self.done = False
        self.taken = False
        self.leader = False
        #: Created (with the committer's lock) only when the caller has to wait.
        self.cond: threading.Condition | None = None

    def wake(self) -> None:
        """Wake the waiting caller, if any (lock held)."""
        if self.cond is not None:
            self.cond.notify()


class GroupCommitter(Generic[Req, Res]):
    """Gathers concurrent requests into groups and commits each group with one ``commit`` call.

    ``commit`` must return exactly one outcome per request, in order; an exception it raises
    becomes every request's outcome. ``max_group`` bounds the group size; ``fits`` can bound
    it further (e.g. by a server's per-transaction operation limit). ``backend`` names the
    backend in :class:`MetadataUnavailable` errors.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[Req]], Sequence[Res | BaseException]],
        *,
        backend: str,
        max_group: int = 64,
        fits: Callable[[Sequence[Req], Req], bool] | None = None,
    ) -> None:
        if max_group < 1:
            raise ValueError("max_group must be >= 1")
        self._commit = commit
        self._fits = fits
        self._backend = backend
        self.max_group = max_group
        self._lock = threading.Lock()
        self._queue: deque[_Pending[Req, Res]] = deque()
        self._leading = False
        #: Number of commits run and requests committed (for tests and benchmarks).
        self.commits = 0
        self.committed = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a group (not yet taken into a commit)."""
        with self._lock:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether a leader is committing (or about to)."""
        with self._lock:
            return self._leading

    def submit(self, request: Req, *, wait_timeout: float) -> Res:
        """Commit ``request`` (alone or grouped with concurrent ones); return its result or raise."""
        p: _Pending[Req, Res] | None
        with self._lock:
            if not self._leading:  # no commit running (so nothing queued): commit right away
                self._leading = True
                p = None
            else:
                p = _Pending(request)
                self._queue.append(p)
                self._wait_as_follower(p, wait_timeout)
        if p is None:
            return self._solo(request)
        if not p.done:  # promoted: this caller leads
            self._lead(p)
        outcome = p.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[return-value]

    def _solo(self, request: Req) -> Res:
        """Commit ``request`` alone (the uncontended path), then hand leadership on."""
        outcome: Res | BaseException
        try:
            outcomes = self._commit([request])
            if len(outcomes) != 1:
                raise MetadataError(f"group commit returned {len(outcomes)} outcomes for 1")
            outcome = outcomes[0]
        except Exception as exc:
            outcome = exc
        finally:
            with self._lock:
                self.commits += 1
                self.committed += 1
                self._hand_off()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _wait_as_follower(self, p: _Pending[Req, Res], wait_timeout: float) -> None:
        """Wait (lock held) until ``p`` is done or promoted to leader; bounded by ``wait_timeout``."""
        deadline = time.monotonic() + wait_timeout
        extended = False
        p.cond = cond = threading.Condition(self._lock)
        while not p.done and not p.leader:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not p.taken:
                    self._queue.remove(p)
                    p.outcome = MetadataUnavailable(
                        f"append waited {wait_timeout:.1f}s in the group-commit queue; nothing was sent",
                        backend=self._backend,
                    )
                    p.done = True
                    return
                if extended:
                    p.outcome = MetadataUnavailable(
                        "the group commit carrying this append did not finish in time; outcome unknown",
                        backend=self._backend,
                    )
                    p.done = True
                    return
                extended = True
                deadline = time.monotonic() + wait_timeout
                continue
            cond.wait(remaining)

    def _take_group(self) -> list[_Pending[Req, Res]]:
        """Pop the next group off the queue (lock held); at least one request."""
        group = [self._queue.popleft()]
        requests = [group[0].request]
        while self._queue and len(group) < self.max_group:
            nxt = self._queue[0]
            try:
                if self._fits is not None and not self._fits(requests, nxt.request):
                    break
            except Exception:  # a faulty predicate only ends the group; the request commits later
                break
            self._queue.popleft()
            group.append(nxt)
            requests.append(nxt.request)
        for g in group:
            g.taken = True
        return group

    def _lead(self, me: _Pending[Req, Res]) -> None:
        """Commit groups until ``me`` is done, then hand leadership to the oldest queued caller."""
        try:
            while True:
                with self._lock:
                    if me.done or not self._queue:
                        break
                    group = self._take_group()
                self._run(group)
        finally:
            with self._lock:
                if not me.done:  # the loop was left by an exception; never leave the caller hanging
                    me.outcome = MetadataError("group commit ended without an outcome")
                    me.done = True
                self._hand_off()

    def _hand_off(self) -> None:
        """Make the oldest queued caller the leader, or end leadership (lock held)."""
        successor = next((q for q in self._queue if not q.done), None)
        if successor is None:
            self._leading = False
        else:
            successor.leader = True
            successor.wake()

    def _run(self, group: list[_Pending[Req, Res]]) -> None:
        """Run ``commit`` for ``group`` and deliver every outcome."""
        outcomes: Sequence[Res | BaseException]
        try:
            outcomes = self._commit([g.request for g in group])
            if len(outcomes) != len(group):
                raise MetadataError(f"group commit returned {len(outcomes)} outcomes for {len(group)}")
        except Exception as exc:
            outcomes = [exc] * len(group)
        with self._lock:
            self.commits += 1
            self.committed += len(group)
            for g, outcome in zip(group, outcomes, strict=True):
                if not g.done:  # a follower that gave up keeps its MetadataUnavailable
                    g.outcome = outcome
                    g.done = True
                g.wake()
