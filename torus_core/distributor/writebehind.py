"""Write-behind: blocks accepted by ``write_blocks`` and replicated by background workers.

With write-behind the caller (a volume flushing its dirty blocks one at a time, under its own
lock) does not wait for the network: blocks are queued, and worker threads take everything
queued (up to ``batch_bytes``, one write level at a time) and replicate it as **one batch per
peer**, all peers in parallel. While a batch is on the wire the next one accumulates, so the
batch size adapts to the load. ``flush`` drains the queue first, then makes the writes durable,
so an NBD FLUSH still means every acknowledged byte is durable on R peers; replication errors
surface there (like a page cache's write-back errors at fsync).

Queued and in-flight blocks stay readable through :meth:`WriteBehind.get`. The queue holds at
most ``max_bytes``; ``submit`` waits while it is full, at most ``submit_wait`` seconds in all.
Blocks whose replication failed count as pending until a flush retried them; a ``submit``
that finds the queue full of such blocks and nothing else to wait for puts them back in the
queue (at most once a second) so that the workers try again -- space freed by GC meanwhile is
used -- and raises the last failure (:class:`~torus_core.errors.OutOfSpace` for a full
cluster: the client gets ENOSPC) once ``submit_wait`` is over, instead of waiting forever.
Until a batch gets through again, later ``submit`` calls that find no room raise at once.

A worker that finds less than a batch queued lingers ``linger`` seconds (3 ms) before taking
it: a write followed at once by a flush (a volume sync, an NBD FLUSH after a small write) then
leaves the block queued, and the flush writes it durably itself -- one round trip -- instead of
waiting for a deferred put and then flushing the peers (two). Streams of writes fill a batch
long before that and are not delayed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from torus_core.distributor.levels import WriteLevel
from torus_core.errors import Closed, ReplicationFailed, TorusError
from torus_core.refs import BlockRef

log = logging.getLogger(__name__)

#: ``replicate(batch, level)``: replicate and record one batch; raises on failure.
Replicate = Callable[[list[tuple[BlockRef, bytes]], WriteLevel], None]
#: A queued block.
Item = tuple[BlockRef, bytes, WriteLevel]
#: Longest ``submit`` waits for room in the queue before raising.
SUBMIT_WAIT = 10.0
#: Least pause between two re-queues of failed blocks by a waiting ``submit``.
REQUEUE_INTERVAL = 1.0


class WriteBehind:
    """Background replication queue (see the module docstring).

    :param replicate: called by the workers with each batch.
    :param max_bytes: queued + in-flight bytes beyond which ``submit`` waits.
    :param batch_bytes: largest batch a worker takes at once.
    :param workers: worker threads (batches in flight at once).
    :param linger: seconds a worker waits for a batch to fill (or a flush to take it).
    :param submit_wait: longest ``submit`` waits for room before raising.
    """

    def __init__(
        self,
        replicate: Replicate,
        *,
        max_bytes: int = 32 * 1024 * 1024,
        batch_bytes: int = 4 * 1024 * 1024,
        workers: int = 4,
        linger: float = 0.003,
        submit_wait: float = SUBMIT_WAIT,
    ) -> None:
        self._replicate = replicate
        self.submit_wait = submit_wait
        self._last_requeue = 0.0
        #: the newest replication failure (what a ``submit`` that found no room raises)
        self._last_error: TorusError | None = None
        #: a ``submit`` ran out of ``submit_wait`` and no batch got through since
        self._stuck = False
        self.max_bytes = max_bytes
        self.batch_bytes = batch_bytes
        self.linger = linger
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._queue: deque[Item] = deque()
        self._pending: dict[BlockRef, bytes] = {}
        self._pending_bytes = 0
        self._busy = 0
        self._failed: list[tuple[Item, BaseException]] = []
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"torus-writebehind-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, batch: Sequence[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        """Queue ``batch``; waits while the queue is over ``max_bytes``, at most ``submit_wait``
        seconds (every replication round is bounded by the write deadlines). Raises the last
        replication failure (or :class:`ReplicationFailed`) if no room was made by then."""
        with self._cond:
            deadline = time.monotonic() + self.submit_wait
            while self._pending_bytes >= self.max_bytes and not self._closed:
                self._requeue_failed()
                left = deadline - time.monotonic()
                if left <= 0 or self._stuck:
                    # the writers queued behind this one (on the volume's lock) fail at once
                    # until a batch gets through again: one bound, not one per writer
                    self._stuck = True
                    raise self._full_error()
                self._cond.wait(min(left, 0.5))
            self._stuck = False
            if self._closed:
                raise Closed("write-behind queue is closed")
            for ref, data in batch:
                old = self._pending.get(ref)
                if old is not None:
                    self._pending_bytes -= len(old)
                self._pending[ref] = data
                self._pending_bytes += len(data)
                self._queue.append((ref, data, level))
                self._queued_bytes += len(data)
            self._cond.notify_all()

    def _requeue_failed(self) -> None:
        """(Lock held.) With nothing queued or in flight and failed blocks filling the queue,
        hand them to the workers again (at most every ``REQUEUE_INTERVAL`` s)."""
        now = time.monotonic()
        if self._queue or self._busy or not self._failed or now - self._last_requeue < REQUEUE_INTERVAL:
            return
        self._last_requeue = now
        failed, self._failed = self._failed, []
        for item, _ in failed:
            if self._pending.get(item[0]) is item[1]:  # not superseded by a newer copy meanwhile
                self._queue.append(item)
                self._queued_bytes += len(item[1])
        self._cond.notify_all()

    def _full_error(self) -> TorusError:
        """(Lock held.) What a ``submit`` that found no room raises."""
        if self._last_error is not None:
            return self._last_error
        return ReplicationFailed(
            f"write-behind queue full for {self.submit_wait:g}s ({self._pending_bytes} bytes pending, "
            f"{len(self._queue)} queued, {self._busy} batch(es) in flight, {len(self._failed)} failed)"
        )

    def get(self, ref: BlockRef) -> bytes | None:
        """The bytes of a queued, in-flight or failed block, else None."""
        with self._cond:
            return self._pending.get(ref)

    def __contains__(self, ref: object) -> bool:
        with self._cond:
            return ref in self._pending

    @property
    def pending_bytes(self) -> int:
        """Bytes queued, in flight or failed."""
        with self._cond:
            return self._pending_bytes

    def _take(self) -> list[Item]:
        first = self._queue.popleft()
        items = [first]
        size = len(first[1])
        self._queued_bytes -= size
        while (
            self._queue
            and self._queue[0][2] is first[2]
            and size + len(self._queue[0][1]) <= self.batch_bytes
        ):
            item = self._queue.popleft()
            items.append(item)
            size += len(item[1])
            self._queued_bytes -= len(item[1])
        return items

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait(1.0)
                if not self._queue:
                    return  # closed and drained
                if not self._linger():
                    continue  # a flush took the queue meanwhile
                items = self._take()
                self._busy += 1
            error: BaseException | None = None
            try:
                self._replicate([(r, d) for r, d, _ in items], items[0][2])
            except BaseException as exc:  # kept for flush; the worker must survive
                error = exc
                log.warning("background replication of %d block(s) failed: %s", len(items), exc)
            with self._cond:
                self._busy -= 1
                if error is None:
                    self._last_error = None
                    self._stuck = False
                    for ref, data, _ in items:
                        if self._pending.get(ref) is data:
                            del self._pending[ref]
                            self._pending_bytes -= len(data)
                else:
                    self._failed.extend((item, error) for item in items)
                    if isinstance(error, TorusError):
                        self._last_error = error
                self._cond.notify_all()

    def _linger(self) -> bool:
        """(Lock held.) Wait up to ``linger`` for a full batch; whether anything is left to take."""
        deadline = time.monotonic() + self.linger
        while self._queue and self._queued_bytes < self.batch_bytes and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        return bool(self._queue)

    def steal(self) -> list[Item]:
        """Remove and return every queued (not yet in-flight) item; they stay readable until
        :meth:`settle` is called for them. A flush uses this to write the tail itself."""
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            return items

    def drain(self, timeout: float) -> list[tuple[Item, BaseException]]:
        """Wait until nothing is queued or in flight; return (and forget) the failed items.

        Raises :class:`ReplicationFailed` if the queue did not drain within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ReplicationFailed(
                        f"background replication did not drain in {timeout:g}s "
                        f"({len(self._queue)} queued, {self._busy} batch(es) in flight)"
                    )
                self._cond.wait(min(remaining, 1.0))
            failed, self._failed = self._failed, []
            return failed

    def settle(self, items: Sequence[Item], ok: bool, error: BaseException | None = None) -> None:
        """After a retry of failed items: forget them (``ok``) or keep them failed with ``error``."""
        with self._cond:
            if ok:
                self._stuck = False
                for ref, data, _ in items:
                    if self._pending.get(ref) is data:
                        del self._pending[ref]
                        self._pending_bytes -= len(data)
            else:
                assert error is not None
                self._failed.extend((item, error) for item in items)
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers after the queue drained (bounded by ``timeout``). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
