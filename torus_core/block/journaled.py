"""A block volume's write journal: FLUSH through the journal, checkpoints, crash recovery.

:class:`VolumeJournal` is what turns a FLUSH of a journaled :class:`~torus_core.file.File`
into one journal record instead of rewriting blocks (docs/durability.md):

* **Flush** (:meth:`VolumeJournal.flush`): the byte ranges written since the previous flush
  become one record (:meth:`File.take_journal`), numbered under the file's lock and
  group-committed to the journal replicas (:class:`~torus_core.journal.writer.JournalWriter`).
  The flush returns once the record is durable on every replica. No INode, no metadata append.
  While the journal holds more than ``journal_limit`` bytes not yet folded in, a flush first
  waits (bounded) for the running checkpoint: backpressure instead of unbounded growth. If the
  journal cannot take the record (a replica failed), the flush falls back to a checkpoint,
  the old durable path.
* **Checkpoint** (:meth:`VolumeJournal.checkpoint`, from a background thread every
  ``checkpoint_interval`` seconds with records pending, or once ``checkpoint_bytes`` were
  journaled, and on close): dirty blocks are written, a new INode records the journal sequence
  number it covers (INode attribute ``torus.journal_seq``) and is committed, then the journal
  is trimmed up to that number.
* **Recovery** (:meth:`VolumeJournal.recover`, when the volume is opened): the new lock epoch
  is made known to every replica first (a writer with an older epoch can no longer append),
  then every record past the checkpoint is read, merged across replicas
  (:func:`~torus_core.journal.replicas.select_replay`), applied in order, and folded in by a
  checkpoint. Replay stops at the first missing or damaged record: every acknowledged flush is
  there, and no record is ever half-applied.
"""

from __future__ import annotations

import logging
import threading
import time

from torus_core.blockstore import BlockStore
from torus_core.errors import Closed, Locked, TorusError
from torus_core.file import JOURNAL_SEQ_ATTR, File
from torus_core.journal.record import Extent, JournalRecord
from torus_core.journal.replicas import JournalReplicas, select_replay
from torus_core.journal.writer import JournalWriter
from torus_core.metrics import JOURNAL_CHECKPOINT_SECONDS, JOURNAL_FALLBACKS, JOURNAL_REPLAYED_RECORDS
from torus_core.refs import BlockRef, INodeRef

log = logging.getLogger(__name__)

#: Journal bytes after which a checkpoint starts.
DEFAULT_CHECKPOINT_BYTES = 64 * 1024 * 1024
#: Seconds after which pending records are folded in even if few.
DEFAULT_CHECKPOINT_INTERVAL = 30.0
#: Journal bytes not yet folded in at which flushes wait for the checkpoint (backpressure).
DEFAULT_JOURNAL_LIMIT = 256 * 1024 * 1024
#: Longest a flush waits under backpressure before going on anyway.
BACKPRESSURE_WAIT = 30.0
#: Bounds of the superseded space (blocks the file stopped naming since its last commit) at
#: which a checkpoint starts even without a FLUSH: a quarter of the volume, within these.
MIN_CHECKPOINT_SUPERSEDED = 8 * 1024 * 1024
MAX_CHECKPOINT_SUPERSEDED = 64 * 1024 * 1024
#: Writers wait (bounded) for a checkpoint once this many times the trigger is superseded.
SUPERSEDED_HARD_FACTOR = 2
#: Longest a write waits for a checkpoint to free superseded space before going on anyway.
SPACE_WAIT = 10.0


def default_checkpoint_superseded(volume_size: int) -> int:
    """The superseded bytes that start a checkpoint for a volume of ``volume_size`` bytes."""
    return max(MIN_CHECKPOINT_SUPERSEDED, min(MAX_CHECKPOINT_SUPERSEDED, volume_size // 4))


class VolumeJournal:
    """The journal side of one opened, writable volume (one lock epoch)."""

    def __init__(
        self,
        file: File,
        store: BlockStore,
        replicas: JournalReplicas,
        volume_id: int,
        epoch: int,
        *,
        name: str = "",
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        journal_limit: int = DEFAULT_JOURNAL_LIMIT,
        checkpoint_superseded: int | None = None,
    ) -> None:
        """``checkpoint_superseded``: bytes of superseded blocks (overwritten, trimmed) waiting
        for a commit at which a checkpoint starts, FLUSH or not (default
        :func:`default_checkpoint_superseded` of the volume size); writes wait (at most
        ``SPACE_WAIT`` s) for it once ``SUPERSEDED_HARD_FACTOR`` times as much is waiting."""
        self.file = file
        self.store = store
        self.replicas = replicas
        self.volume_id = volume_id
        self.epoch = epoch
        self.name = name or str(volume_id)
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_interval = checkpoint_interval
        self.journal_limit = max(journal_limit, checkpoint_bytes)
        if checkpoint_superseded is None:
            checkpoint_superseded = default_checkpoint_superseded(file.size)
        self.checkpoint_superseded = max(file.block_size, checkpoint_superseded)
        self._superseded_trigger = max(1, self.checkpoint_superseded // file.block_size)
        self._superseded_hard = SUPERSEDED_HARD_FACTOR * self._superseded_trigger
        self.writer: JournalWriter | None = None
        self.replayed = 0
        self.checkpoints = 0
        self.fallbacks = 0
        self._ckpt_lock = threading.Lock()
        #: a flush failed after its writes left the file's unjournaled ranges: the next flush
        #: must be a checkpoint
        self._failed = False
        self._ckpt_done = threading.Condition()
        self._last_checkpoint = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- recovery --------------------------------------------------------------------------

    def recover(self) -> int:
        """Fence older writers, replay the records past the checkpoint, fold them in, trim;
        returns the number of records replayed. Starts the writer (and must run before any
        write)."""
        last = self.replicas.fence(self.volume_id, self.epoch)
        covered = int(self.file.attrs.get(JOURNAL_SEQ_ATTR, "0"))
        records = select_replay(self.replicas.read(self.volume_id, covered), covered)
        for rec in records:
            self._apply(rec)
        top = max(last, covered, records[-1].seq if records else 0)
        self.writer = JournalWriter(self.replicas, self.volume_id, self.epoch, top + 1)
        if records:
            self.file.checkpoint(lambda: top)
            self.file.discard_unjournaled()
            log.info(
                "volume %r: replayed %d journal record(s) (seq %d..%d) and folded them in",
                self.name,
                len(records),
                records[0].seq,
                records[-1].seq,
            )
        if top > covered or records:
            try:
                self.replicas.trim(self.volume_id, self.epoch, top)
            except TorusError as exc:
                log.warning("volume %r: trimming the journal after recovery: %s", self.name, exc)
        self.replayed = len(records)
        JOURNAL_REPLAYED_RECORDS.inc(len(records))
        return len(records)

    def _apply(self, rec: JournalRecord) -> None:
        for ext in rec.extents:
            end = min(ext.offset + ext.length, self.file.size)
            if ext.offset >= end:
                continue
            if ext.is_ref:
                assert ext.data is not None
                data = self.store.get_block(BlockRef.from_bytes(ext.data))
                self.file.write_at(ext.offset, memoryview(data)[: end - ext.offset])
            elif ext.data is None:
                self.file.write_zeroes(ext.offset, end - ext.offset)
            else:
                self.file.write_at(ext.offset, memoryview(ext.data)[: end - ext.offset])

    # --- flushing --------------------------------------------------------------------------

    def start(self) -> VolumeJournal:
        """Start the background checkpointer (and its watch on the file's superseded space)."""
        self.file.watch_superseded(self.checkpoint_superseded, self._wake.set)
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-{self.name}", daemon=True)
        self._thread.start()
        return self

    def flush(self) -> None:
        """Make every write completed before this call durable (see the module docstring)."""
        writer = self.writer
        if writer is None:
            raise Closed(f"volume {self.name!r}: the journal is not open")
        if writer.bytes_since_checkpoint >= self.journal_limit:
            self._backpressure(writer)
        if self._failed:
            # an earlier flush failed after its writes left the file's unjournaled ranges (its
            # records were lost with the append): only a checkpoint makes them durable now
            self._flush_by_checkpoint(writer)
            return
        try:
            seq = self.file.take_journal(writer.submit)
            if seq is None:
                return
            writer.wait(seq)
        except Locked:
            raise
        except TorusError as exc:
            self.fallbacks += 1
            JOURNAL_FALLBACKS.inc()
            log.warning(
                "volume %r: journal append failed (%s); flushing through a checkpoint", self.name, exc
            )
            self._failed = True
            self._flush_by_checkpoint(writer)
            return
        if writer.bytes_since_checkpoint >= self.checkpoint_bytes:
            self._wake.set()

    def space_wait(self) -> None:
        """Called after a write (without the file's lock): while the superseded blocks waiting
        for a commit are over the hard limit, wake the checkpointer and wait for it, at most
        ``SPACE_WAIT`` seconds in all -- a writer far ahead of the checkpoints slows down instead
        of filling the store."""
        if self.file.superseded_since_commit() < self._superseded_hard or self._thread is None:
            return
        self._wake.set()
        deadline = time.monotonic() + SPACE_WAIT
        with self._ckpt_done:
            while self.file.superseded_since_commit() >= self._superseded_hard and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("volume %r: superseded blocks over their limit, no checkpoint", self.name)
                    return
                self._ckpt_done.wait(min(left, 0.5))

    def _flush_by_checkpoint(self, writer: JournalWriter) -> None:
        """Make everything durable by a checkpoint, then let the writer go on numbering."""
        self.checkpoint()
        writer.reset()
        self._failed = False

    def _backpressure(self, writer: JournalWriter) -> None:
        self._wake.set()
        deadline = time.monotonic() + BACKPRESSURE_WAIT
        with self._ckpt_done:
            while writer.bytes_since_checkpoint >= self.journal_limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("volume %r: journal over its limit and no checkpoint finished", self.name)
                    return
                self._ckpt_done.wait(min(left, 1.0))

    # --- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> INodeRef | None:
        """Fold everything journaled so far into blocks + INode + commit, then trim the journal."""
        writer = self.writer
        if writer is None:
            raise Closed(f"volume {self.name!r}: the journal is not open")
        with self._ckpt_lock, JOURNAL_CHECKPOINT_SECONDS.time():
            ref, seq = self.file.checkpoint(lambda: writer.last_assigned)
            writer.note_checkpoint()
            self._last_checkpoint = time.monotonic()
            self.checkpoints += 1
            with self._ckpt_done:
                self._ckpt_done.notify_all()
            try:
                self.replicas.trim(self.volume_id, self.epoch, seq)
            except Locked:
                raise
            except TorusError as exc:  # records stay a little longer; replay skips them
                log.warning("volume %r: trimming the journal through %d: %s", self.name, seq, exc)
            return ref

    def _due(self) -> bool:
        w = self.writer
        if w is None:
            return False
        if w.bytes_since_checkpoint >= self.checkpoint_bytes:
            return True
        if self.file.superseded_since_commit() >= self._superseded_trigger:
            return True  # overwrites pile up: a commit frees them, FLUSH or not
        return w.records_since_checkpoint > 0 and (
            time.monotonic() - self._last_checkpoint >= self.checkpoint_interval
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(min(1.0, self.checkpoint_interval))
            self._wake.clear()
            if self._stop.is_set() or not self._due():
                continue
            try:
                self.checkpoint()
            except Locked as exc:
                log.error("volume %r: checkpoint refused, the lock was lost: %s", self.name, exc)
                return
            except TorusError as exc:
                log.warning("volume %r: checkpoint failed (will retry): %s", self.name, exc)
                self._stop.wait(1.0)

    def close(self) -> None:
        """Stop the checkpointer (bounded wait); the owner runs the final :meth:`checkpoint`."""
        self.file.watch_superseded(0, None)
        self._stop.set()
        with self._ckpt_done:
            self._ckpt_done.notify_all()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(60.0)

    def describe(self) -> dict[str, int]:
        """Counters for diagnostics and metrics."""
        w = self.writer
        return {
            "replayed": self.replayed,
            "checkpoints": self.checkpoints,
            "fallbacks": self.fallbacks,
            "appends": w.appends if w is not None else 0,
            "bytes_since_checkpoint": w.bytes_since_checkpoint if w is not None else 0,
        }


__all__ = ["Extent", "VolumeJournal"]
