"""This peer's own store as one of the replicas: writes, repairs, and flushes only when due."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from torus_core.blockstore import BlockStore
from torus_core.errors import OutOfSpace
from torus_core.refs import BlockRef
from torus_core.rpc.server import write_replacing_corrupt

log = logging.getLogger(__name__)


class LocalReplica:
    """The local store (None for a client without one) seen as a replica of the ring.

    It counts writes and the writes a finished :meth:`flush` covered, so a distributor flush
    with nothing new locally skips the local ``fsync``.
    """

    def __init__(self, store: BlockStore | None) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._written = 0
        self._flushed = 0

    @property
    def present(self) -> bool:
        """Whether there is a local store."""
        return self.store is not None

    def write(self, batch: Sequence[tuple[BlockRef, bytes]]) -> None:
        """Store ``batch`` (not yet durable: see :meth:`flush`)."""
        assert self.store is not None
        for ref, data in batch:
            self.store.write_block(ref, data)
        self._note_write()

    def write_until_full(self, batch: list[tuple[BlockRef, bytes]]) -> list[tuple[BlockRef, bytes]]:
        """Store ``batch`` in order until the store is full; returns what did not fit."""
        assert self.store is not None
        for i, (ref, data) in enumerate(batch):
            try:
                self.store.write_block(ref, data)
            except OutOfSpace:
                log.info("local write cache full; writing %d block(s) to owners", len(batch) - i)
                return batch[i:]
            self._note_write()
        return []

    def repair(self, ref: BlockRef, data: bytes) -> None:
        """Write the good copy of ``ref`` over a missing or corrupt local one."""
        assert self.store is not None
        write_replacing_corrupt(self.store, ref, data)
        self._note_write()

    def flush(self) -> None:
        """Flush the store; covers every write made before the call."""
        if self.store is None:
            return
        with self._lock:
            upto = self._written
        self.store.flush()
        with self._lock:
            self._flushed = max(self._flushed, upto)

    @property
    def dirty(self) -> bool:
        """Whether some write is not covered by a finished :meth:`flush`."""
        with self._lock:
            return self._written != self._flushed

    def _note_write(self) -> None:
        with self._lock:
            self._written += 1
