"""Writes that peers acknowledged without flushing, kept until a flush makes them durable.

The distributor sends ``PutBlocks`` with ``defer_flush`` (no fsync per call) and records here,
per block, its bytes, its write level and which peers took it (with each peer's ``boot_id``).
:meth:`Distributor.flush` then flushes exactly those peers; a block whose copy on some peer
cannot be confirmed durable is written again from the bytes kept here. Entries are dropped
only once the flush succeeded, so a failed flush can be retried without losing anything.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from torus_core.distributor.levels import WriteLevel
from torus_core.refs import BlockRef


@dataclass
class UnflushedBlock:
    """One block acknowledged without a flush.

    :param data: the block's bytes (padded to the block size).
    :param level: the write level it was written with.
    :param acks: peer UUID -> the ``boot_id`` that peer reported when it took the block
        (``""`` for this process's own store).
    """

    data: bytes
    level: WriteLevel
    acks: dict[str, str] = field(default_factory=dict)


class UnflushedWrites:
    """Thread-safe ``ref -> UnflushedBlock`` map with a byte count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[BlockRef, UnflushedBlock] = {}
        self._nbytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes of block data held."""
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(
        self,
        batch: Sequence[tuple[BlockRef, bytes]],
        acks: Sequence[dict[str, str]],
        level: WriteLevel,
    ) -> None:
        """Record a replicated batch (``acks[i]`` belongs to ``batch[i]``)."""
        with self._lock:
            for (ref, data), peers in zip(batch, acks, strict=True):
                entry = self._entries.get(ref)
                if entry is None:
                    self._entries[ref] = UnflushedBlock(data, level, dict(peers))
                    self._nbytes += len(data)
                else:  # the same ref again (a retried write): same bytes, more copies
                    entry.acks.update(peers)

    def take(self) -> dict[BlockRef, UnflushedBlock]:
        """Remove and return every entry (a flush works on this snapshot)."""
        with self._lock:
            entries, self._entries, self._nbytes = self._entries, {}, 0
            return entries

    def restore(self, entries: dict[BlockRef, UnflushedBlock]) -> None:
        """Put back entries of a flush that failed (merged with writes recorded meanwhile)."""
        with self._lock:
            for ref, entry in entries.items():
                current = self._entries.get(ref)
                if current is None:
                    self._entries[ref] = entry
                    self._nbytes += len(entry.data)
                else:
                    current.acks.update(entry.acks)
