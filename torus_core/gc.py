"""Safe garbage collection of a storage peer's local blocks (inventory §7.8, made safe).

A cycle first builds a :class:`LiveSet` from the metadata projection: for every volume, the
current INode and every snapshot INode are read (through the distributor, so from whichever
peer holds them) and every ref of every blockset layer is marked live. Liveness is computed over
refs, not volume ids, so a clone whose INode points at its source's blocks keeps them alive even
after the source volume is deleted.

Safety rules (fixes of the original's §12.2 #2):

* If reading the metadata or **any** INode fails, the whole cycle is skipped — nothing is
  deleted on partial knowledge.
* In-flight writes are kept: a block whose INode number is at least the volume's highest
  allocated INode index at cycle start is alive, and so is every block of a volume id handed out
  after the cycle started (a volume created mid-cycle).
* Grace period: a block is deleted only if it was found dead in an earlier cycle at least
  ``grace`` seconds ago and is still dead now (so a block must stay unreferenced for a while).

Dead: superseded data blocks, old INode blocks, blocks of deleted volumes (not referenced by a
clone), blocks freed by TRIM.

The last complete live set is kept (:attr:`GarbageCollector.live`) for the rebalancer, which
must neither push nor count garbage: otherwise one owner's GC deletes a dead copy and the other
owner's rebalancer, seeing the copy missing, pushes it back -- forever (issue 11). Deadness is
monotonic (refs are immutable and new INodes only reference live blocks or blocks written
after the live set was built, which it keeps alive), so an older live set never calls a live
block dead; it only may still call some garbage alive.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from torus_core import metrics
from torus_core.blockset.spec import unmarshal_blockset
from torus_core.blockstore import BlockStore
from torus_core.errors import BlockNotExist, InvalidArgument, TorusError
from torus_core.events import VOLUME_IDS_STREAM
from torus_core.inode import VIRTUAL_INODE, INodeStore
from torus_core.metadata import MetadataService
from torus_core.refs import BlockRef, BlockType, INodeRef
from torus_core.registry import Registry

log = logging.getLogger(__name__)


class GCSkipped(TorusError):
    """A GC cycle was skipped because the live set could not be built completely."""


@dataclass
class LiveSet:
    """What a GC cycle considers alive, as of ``started`` (wall clock)."""

    started: float
    #: data refs referenced by some current or snapshot INode
    refs: set[BlockRef] = field(default_factory=set)
    #: INodes that are current or saved in a snapshot
    inodes: set[INodeRef] = field(default_factory=set)
    #: volume id -> the INode number below which unreferenced blocks are dead: the highest
    #: allocated index for a volume released cleanly, its committed INode number while a writer
    #: holds it or died holding it (that writer's journal may name blocks of its last committed
    #: session or later ones until the next commit folds it in; docs/durability.md)
    highwater: dict[int, int] = field(default_factory=dict)
    #: highest volume id handed out at cycle start
    max_volume_id: int = 0
    #: metadata log position the set was built from (-1: unknown)
    position: int = -1

    def is_dead(self, ref: BlockRef) -> bool:
        """Whether ``ref`` is garbage under this live set."""
        if ref.volume > self.max_volume_id:
            return False  # a volume created after the cycle started
        if ref.type == BlockType.INODE:
            if ref.inode_ref in self.inodes:
                return False
        elif ref in self.refs:
            return False
        high = self.highwater.get(ref.volume)
        if high is None:
            return True  # deleted volume, not referenced by a clone
        return ref.inode < high


@dataclass
class GCResult:
    """Outcome of one cycle."""

    skipped: bool = False
    reason: str = ""
    examined: int = 0
    dead: int = 0
    deleted: int = 0


class GarbageCollector:
    """Deletes dead blocks from a peer's local store, one cycle at a time.

    :param md: metadata service.
    :param reader: a block store to read INodes through (the distributor).
    :param local: the local store to collect.
    :param grace: seconds a block must have been dead across cycles before it is deleted.
    :param layer_registry: blockset layers, to decode the INodes of the volumes.
    :param delete: delete dead blocks; False only builds the live set each cycle (a peer run
        with ``--no-gc`` still tells its rebalancer what is garbage).
    :param idle_max: :meth:`maybe_run_cycle` backs off while cycles find nothing dead and the
        metadata log does not move: the walk of the local store then runs at most every
        0.5 s, doubling up to ``idle_max`` seconds (0 = every call).
    """

    def __init__(
        self,
        md: MetadataService,
        reader: BlockStore,
        local: BlockStore,
        *,
        grace: float = 30.0,
        layer_registry: Registry,
        delete: bool = True,
        idle_max: float = 0.0,
    ) -> None:
        if not isinstance(grace, int | float) or grace < 0:
            raise InvalidArgument(f"GC grace must be >= 0 seconds, got {grace!r}")
        if not isinstance(idle_max, int | float) or idle_max < 0:
            raise InvalidArgument(f"GC idle interval must be >= 0 seconds, got {idle_max!r}")
        self.md = md
        self.reader = reader
        self.local = local
        self.grace = float(grace)
        self.layer_registry = layer_registry
        self.delete = delete
        #: the last live set built completely (None before the first one)
        self.live: LiveSet | None = None
        #: ref -> time it was first found dead (cleared when found alive)
        self.candidates: dict[BlockRef, float] = {}
        self.total_deleted = 0
        self.skipped_cycles = 0
        #: the last cycle that was not skipped
        self.last_result: GCResult | None = None
        self.idle_max = float(idle_max)
        self._idle = 0.0
        self._next_walk = 0.0
        self._live_at = 0.0  # time.monotonic() when self.live was built or confirmed

    def live_set(self) -> LiveSet:
        """Build the live set; raises :class:`GCSkipped` if anything could not be read.

        The live set is a function of the metadata state alone (INodes are immutable), so while
        the log has not moved since the last complete one, that one is reused with a fresh
        ``started`` instead of reading every INode again: an idle cluster's GC cycles cost a walk
        of the local refs, not a read of every volume's index.
        """
        started = time.time()
        try:
            state = self.md.state()
        except TorusError as exc:
            raise GCSkipped(f"metadata unreadable: {exc}") from exc
        last = self.live
        if last is not None and last.position >= 0 and last.position == state.position:
            return replace(last, started=started)
        live = LiveSet(
            started, max_volume_id=state.stream_version(VOLUME_IDS_STREAM), position=state.position
        )
        istore = INodeStore(self.reader)
        for vol in state.volumes.values():
            # A volume whose writer released it cleanly folded and trimmed its journal at close:
            # only blocks of sessions after the last allocated index can be in flight. One that
            # is held, or whose writer died holding it, may have journal records naming blocks
            # of its last committed session or later ones (docs/durability.md).
            live.highwater[vol.id] = vol.last_inode_index if not vol.lock_owner else vol.inode.inode
            wanted = {vol.inode} | {s.inode_ref for s in vol.snapshots.values()}
            for iref in wanted:
                if iref.inode == VIRTUAL_INODE:
                    continue
                live.inodes.add(iref)
                try:
                    inode = istore.get_inode(iref)
                    if inode.blocks:
                        blockset = unmarshal_blockset(inode.blocks, self.reader, self.layer_registry)
                        live.refs.update(blockset.get_all_block_refs())
                except TorusError as exc:
                    raise GCSkipped(f"INode {iref} unreadable: {exc}") from exc
        return live

    def refresh_live(self, max_age: float = 5.0) -> LiveSet | None:
        """The last live set, first rebuilt if it is older than ``max_age`` seconds (cheap
        while the metadata log has not moved, see :meth:`live_set`); a failed rebuild keeps the
        old one. What the rebalancer consults during a long pass."""
        if self.live is not None and time.monotonic() - self._live_at < max_age:
            return self.live
        try:
            self._set_live(self.live_set())
        except GCSkipped as exc:
            log.debug("live set not refreshed: %s", exc)
        return self.live

    def _set_live(self, live: LiveSet) -> None:
        self.live = live
        self._live_at = time.monotonic()

    def maybe_run_cycle(self) -> GCResult | None:
        """Run a cycle unless the cluster is idle (what the maintenance loop calls).

        Idle: the last cycle found nothing dead, the metadata log has not moved since its live
        set, and the back-off wait (see ``idle_max``) is not over. Any metadata event (a commit,
        a deleted volume or snapshot) ends the wait, so new garbage is seen at the next round;
        dead blocks that arrive without one (pushed by a peer whose live set was older) are
        found within ``idle_max``.
        """
        last, live = self.last_result, self.live
        if last is not None and live is not None and last.dead == 0 and time.monotonic() < self._next_walk:
            try:
                position = self.md.state().position
            except TorusError:
                position = -1  # let run_cycle skip and count it
            if position == live.position:
                return None
        result = self.run_cycle()
        if not result.skipped and result.dead == 0 and self.idle_max > 0:
            self._idle = min(self.idle_max, max(0.5, self._idle * 2))
        else:
            self._idle = 0.0
        self._next_walk = time.monotonic() + self._idle
        return result

    def run_cycle(self, now: float | None = None) -> GCResult:
        """One cycle: build the live set (or skip), then delete blocks dead for ``grace`` seconds."""
        try:
            live = self.live_set()
        except GCSkipped as exc:
            self.skipped_cycles += 1
            metrics.GC_SKIPPED_CYCLES.inc()
            log.warning("GC cycle skipped, nothing deleted: %s", exc)
            return GCResult(skipped=True, reason=str(exc))
        self._set_live(live)
        now = time.time() if now is None else now
        result = GCResult()
        seen_dead: dict[BlockRef, float] = {}
        doomed: list[BlockRef] = []
        for ref in list(self.local.iter_refs()):
            result.examined += 1
            if not live.is_dead(ref):
                continue
            result.dead += 1
            first = self.candidates.get(ref, now)
            seen_dead[ref] = first
            if self.delete and now - first >= self.grace and first < live.started:
                doomed.append(ref)
        self.candidates = seen_dead
        for ref in doomed:
            try:
                self.local.delete_block(ref)
                result.deleted += 1
            except BlockNotExist:
                pass
            self.candidates.pop(ref, None)
        metrics.GC_CYCLES.inc()
        metrics.GC_DEAD_BLOCKS.set(result.dead)
        if result.deleted:
            self.local.flush()
            self.total_deleted += result.deleted
            metrics.GC_DELETED_BLOCKS.inc(result.deleted)
            log.info("GC deleted %d dead block(s)", result.deleted)
        self.last_result = result
        return result
