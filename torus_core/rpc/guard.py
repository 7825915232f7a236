"""What a replica checks against the metadata log before it stores a peer's request.

A cluster member is trusted to be honest, not to be bug-free (nor to keep its key to itself):
:class:`ReplicaGuard` refuses, with :class:`~torus_core.errors.ReplicaRefused`, what no honest
writer sends, so that neither a buggy peer nor a stolen key can make a volume unopenable:

* a fence epoch that is not the volume's current lock epoch in the metadata log (an older one is
  :class:`~torus_core.errors.StaleEpoch`, what an honest writer that lost its lock gets);
* a journal append, fence or trim for a volume that does not exist;
* a block for a volume id that was never allocated (blocks of a deleted volume are still
  accepted: a rebalance or read repair in flight may carry them, and GC deletes them);
* a journal record larger than ``max_record_bytes``;
* (with ``inodes``, the cluster's block store) a trim past the sequence number the volume's last
  committed checkpoint records (INode attribute ``torus.journal_seq``): the records a crash
  would need again are never dropped.

The volume set is cached and refreshed from the log (``MetadataService.state()``) at a fence
(a writer fences right after it took the lock, so the fence sees the new epoch) and on a miss
(at most every ``refresh`` seconds), so the common append costs a set lookup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence

from torus_core.blockstore import BlockStore
from torus_core.errors import ReplicaRefused, StaleEpoch, TorusError
from torus_core.events import VOLUME_IDS_STREAM
from torus_core.file import JOURNAL_SEQ_ATTR
from torus_core.inode import VIRTUAL_INODE, INodeStore
from torus_core.journal.record import MAX_BODY
from torus_core.metadata import MetadataService
from torus_core.projection import ClusterState
from torus_core.refs import INodeRef

#: Seconds between two metadata catch-ups caused by unknown volume ids.
DEFAULT_REFRESH = 0.05


class ReplicaGuard:
    """Checks peer requests against the metadata log (see the module docstring). Thread-safe.

    :param md: the metadata service (not closed by the guard).
    :param max_record_bytes: largest encoded journal record accepted.
    :param refresh: least seconds between catch-ups caused by a miss.
    :param inodes: where the volumes' INodes are read (a storage peer's distributor); without
        it trims are not checked against the checkpoint.
    """

    def __init__(
        self,
        md: MetadataService,
        *,
        max_record_bytes: int = MAX_BODY + 4096,
        refresh: float = DEFAULT_REFRESH,
        inodes: BlockStore | None = None,
    ) -> None:
        self.md = md
        self.inodes = inodes
        self._current: dict[int, INodeRef] = {}
        self._covered: dict[INodeRef, int] = {}
        self.max_record_bytes = max_record_bytes
        self.refresh = refresh
        self._lock = threading.Lock()
        self._live: frozenset[int] = frozenset()
        self._highest = 0
        self._epochs: dict[int, int] = {}
        self._at = float("-inf")

    def _load(self, state: ClusterState) -> None:
        with self._lock:
            self._live = frozenset(state.volumes)
            self._epochs = {vid: v.lock_epoch for vid, v in state.volumes.items()}
            self._current = {vid: v.inode for vid, v in state.volumes.items()}
            self._highest = state.stream_version(VOLUME_IDS_STREAM)
            self._at = time.monotonic()

    def _catch_up(self, *, force: bool = False) -> None:
        if force or time.monotonic() - self._at >= self.refresh:
            self._load(self.md.state())

    def _live_volume(self, volume_id: int, what: str) -> None:
        if volume_id in self._live:
            return
        self._catch_up()
        if volume_id not in self._live:
            raise ReplicaRefused(f"{what} for volume {volume_id}, which does not exist")

    def check_block_volumes(self, volume_ids: Iterable[int]) -> None:
        """Refuse blocks of a volume id that was never allocated."""
        top = max(volume_ids, default=0)
        if top <= self._highest:
            return
        self._catch_up()
        if top > self._highest:
            raise ReplicaRefused(f"blocks for volume {top}, which does not exist")

    def check_fence(self, volume_id: int, epoch: int) -> None:
        """Refuse a fence of a volume that does not exist, or at an epoch that is not its lock's."""
        self._catch_up(force=True)
        self._live_volume(volume_id, "journal fence")
        current = self._epochs.get(volume_id, 0)
        if epoch < current:
            raise StaleEpoch(
                f"journal fence of volume {volume_id} at epoch {epoch}: its lock is at epoch {current}"
            )
        if epoch != current:
            raise ReplicaRefused(
                f"journal fence of volume {volume_id} at epoch {epoch}: its lock is at epoch {current}"
            )

    def check_append(self, volume_id: int, records: Sequence[bytes | memoryview]) -> None:
        """Refuse records of a volume that does not exist, or larger than the maximum."""
        self._live_volume(volume_id, "journal append")
        for r in records:
            if len(r) > self.max_record_bytes:
                raise ReplicaRefused(
                    f"journal record of {len(r)} bytes for volume {volume_id} exceeds the "
                    f"maximum of {self.max_record_bytes}"
                )

    def check_volume(self, volume_id: int, what: str) -> None:
        """Refuse a journal ``what`` (read, trim) of a volume that does not exist."""
        self._live_volume(volume_id, what)

    def _checkpoint_seq(self, volume_id: int) -> int:
        ref = self._current.get(volume_id)
        if ref is None or ref.inode == VIRTUAL_INODE or self.inodes is None:
            return 0
        seq = self._covered.get(ref)
        if seq is None:
            try:
                attrs = INodeStore(self.inodes).get_inode(ref).attrs
                seq = int(attrs.get(JOURNAL_SEQ_ATTR, "0"))
            except (TorusError, ValueError) as exc:
                raise ReplicaRefused(
                    f"journal trim of volume {volume_id}: cannot read its checkpoint {ref}: {exc}"
                ) from None
            with self._lock:
                if len(self._covered) > 4096:
                    self._covered.clear()
                self._covered[ref] = seq
        return seq

    def check_trim(self, volume_id: int, through_seq: int) -> None:
        """Refuse a trim of a volume that does not exist, or past its last committed checkpoint."""
        self._live_volume(volume_id, "journal trim")
        if self.inodes is None or through_seq <= self._checkpoint_seq(volume_id):
            return
        self._catch_up(force=True)  # the writer committed the checkpoint just before it trims
        covered = self._checkpoint_seq(volume_id)
        if through_seq > covered:
            raise ReplicaRefused(
                f"journal trim of volume {volume_id} through {through_seq}: its last committed "
                f"checkpoint covers sequence numbers up to {covered}"
            )
