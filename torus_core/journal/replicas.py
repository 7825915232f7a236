"""Where a volume's journal records go: :class:`JournalReplicas`.

A single node keeps its journal in its own :class:`~torus_core.journal.store.JournalStore`
(:class:`LocalJournalReplicas`); a cluster appends every batch to R peers chosen by the ring
(:mod:`torus_core.journal.remote`). Writers and recovery only see this interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from torus_core.journal.record import JournalRecord
from torus_core.journal.store import JournalStore


class JournalReplicas(Protocol):
    """The replicas of volume journals, as a writer sees them."""

    def fence(self, volume_id: int, epoch: int) -> int:
        """Make every reachable replica refuse epochs older than ``epoch``; returns the highest
        sequence number any of them holds. StaleEpoch if a newer epoch was seen."""
        ...

    def append(self, volume_id: int, epoch: int, payloads: Sequence[bytes]) -> None:
        """Append encoded records; returns once they are durable on every required replica."""
        ...

    def read(self, volume_id: int, after_seq: int) -> list[JournalRecord]:
        """Records with ``seq > after_seq`` from every reachable replica (duplicates allowed)."""
        ...

    def trim(self, volume_id: int, epoch: int, through_seq: int) -> None:
        """Let replicas drop records ``<= through_seq`` (best effort)."""
        ...


class LocalJournalReplicas:
    """The single-node case: the journal lives in this node's own store."""

    def __init__(self, store: JournalStore) -> None:
        self.store = store

    def fence(self, volume_id: int, epoch: int) -> int:
        """See :meth:`JournalReplicas.fence`."""
        return self.store.fence(volume_id, epoch)

    def append(self, volume_id: int, epoch: int, payloads: Sequence[bytes]) -> None:
        """See :meth:`JournalReplicas.append`."""
        self.store.append(volume_id, epoch, payloads)

    def read(self, volume_id: int, after_seq: int) -> list[JournalRecord]:
        """See :meth:`JournalReplicas.read`."""
        return self.store.read(volume_id, after_seq)

    def trim(self, volume_id: int, epoch: int, through_seq: int) -> None:
        """See :meth:`JournalReplicas.trim`."""
        self.store.trim(volume_id, epoch, through_seq)


def select_replay(records: Iterable[JournalRecord], after_seq: int) -> list[JournalRecord]:
    """The records to replay over a checkpoint that covers ``seq <= after_seq``.

    ``records`` may come from several replicas, with duplicates and with records an older
    writer left behind. For each sequence number the record of the highest epoch wins; replay
    runs from ``after_seq + 1`` while the numbers are contiguous and epochs never go down (a
    record of an older epoch after a newer one is a stale writer's unacknowledged leftover).
    """
    best: dict[int, JournalRecord] = {}
    for r in records:
        if r.seq <= after_seq:
            continue
        have = best.get(r.seq)
        if have is None or r.epoch > have.epoch:
            best[r.seq] = r
    out: list[JournalRecord] = []
    seq, epoch = after_seq + 1, 0
    while True:
        nxt = best.get(seq)
        if nxt is None or nxt.epoch < epoch:
            return out
        out.append(nxt)
        epoch = nxt.epoch
        seq += 1
