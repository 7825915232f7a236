"""Group commit of one volume's journal records: :class:`JournalWriter`.

Flushes number their records under the file's lock (:meth:`JournalWriter.submit`, so sequence
order is queue order) and then wait outside it (:meth:`JournalWriter.wait`). The first waiter
that finds no append running becomes the leader: it takes every queued record, appends them
with one :meth:`JournalReplicas.append` (one write + fdatasync per replica), marks them durable
and wakes the others. Concurrent flushes from many connections therefore share one round trip.

A failed append poisons the writer: queued and later records fail with the same error (their
sequence numbers could otherwise leave a gap that replay would stop at) until the owner made
everything durable another way (a checkpoint) and called :meth:`reset`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from torus_core.errors import TorusError
from torus_core.journal.record import Extent, encode_record
from torus_core.journal.replicas import JournalReplicas
from torus_core.metrics import JOURNAL_APPEND_SECONDS, JOURNAL_APPENDS, JOURNAL_BYTES, JOURNAL_RECORDS

#: Seconds a flush waits for its record to become durable before giving up.
DEFAULT_WAIT_TIMEOUT = 60.0


class JournalWriter:
    """Appends one volume's records for one lock epoch, in sequence order, group-committed."""

    def __init__(self, replicas: JournalReplicas, volume_id: int, epoch: int, next_seq: int) -> None:
        self.replicas = replicas
        self.volume_id = volume_id
        self.epoch = epoch
        self._cond = threading.Condition()
        self._queue: list[tuple[int, bytes]] = []
        self._next = next_seq
        self._durable = next_seq - 1
        self._leading = False
        self._error: BaseException | None = None
        #: record bytes appended since the last :meth:`note_checkpoint`
        self.bytes_since_checkpoint = 0
        self.records_since_checkpoint = 0
        self.appends = 0

    @property
    def last_assigned(self) -> int:
        """The newest sequence number handed out (its record may not be durable yet)."""
        with self._cond:
            return self._next - 1

    @property
    def last_durable(self) -> int:
        """Every record up to this sequence number is durable on the replicas."""
        with self._cond:
            return self._durable

    @property
    def failed(self) -> BaseException | None:
        """The append error that poisoned the writer, if any."""
        return self._error

    def submit(self, extents: Sequence[Extent]) -> int:
        """Number and queue a record of ``extents``; returns its sequence number. Raises the
        poisoning error if an earlier append failed."""
        with self._cond:
            if self._error is not None:
                raise self._error
            seq = self._next
            self._queue.append((seq, encode_record(self.volume_id, self.epoch, seq, extents)))
            self._next += 1
            return seq

    def wait(self, seq: int, timeout: float = DEFAULT_WAIT_TIMEOUT) -> None:
        """Return once record ``seq`` is durable (leading a group append if none is running)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._durable >= seq:
                    return
                if self._error is not None:
                    raise self._error
                if not self._leading and self._queue:
                    self._leading = True
                    batch, self._queue = self._queue, []
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TorusError(
                        f"volume {self.volume_id}: journal record {seq} not durable after {timeout} s"
                    )
                self._cond.wait(left)
        self._lead(batch)
        self.wait(seq, max(0.0, deadline - time.monotonic()))

    def _lead(self, batch: list[tuple[int, bytes]]) -> None:
        payloads = [p for _, p in batch]
        error: BaseException | None = None
        t0 = time.perf_counter()
        try:
            self.replicas.append(self.volume_id, self.epoch, payloads)
        except BaseException as exc:  # every waiter of the batch (and later ones) gets it
            error = exc
        else:
            JOURNAL_APPEND_SECONDS.observe(time.perf_counter() - t0)
            JOURNAL_APPENDS.inc()
            JOURNAL_RECORDS.inc(len(payloads))
            JOURNAL_BYTES.inc(sum(len(p) for p in payloads))
        with self._cond:
            self._leading = False
            if error is None:
                self._durable = max(self._durable, batch[-1][0])
                self.bytes_since_checkpoint += sum(len(p) for p in payloads)
                self.records_since_checkpoint += len(payloads)
                self.appends += 1
            else:
                self._error = error
                self._queue.clear()
            self._cond.notify_all()

    def note_checkpoint(self) -> None:
        """A checkpoint folded every record so far: restart the size accounting."""
        with self._cond:
            self.bytes_since_checkpoint = 0
            self.records_since_checkpoint = 0

    def reset(self) -> None:
        """After a checkpoint made everything durable: clear a poisoning error and continue
        numbering after every sequence number handed out (failed ones included)."""
        with self._cond:
            self._error = None
            self._queue.clear()
            self._durable = self._next - 1
            self._cond.notify_all()
