"""The rebalancer: push-based and lazy like the original (inventory §7.7), made safe.

Each storage peer walks its local blocks in batches. For every block it asks each ring owner
other than itself whether it holds the block (``RebalanceCheck``), streams the missing ones to
it (``PutBlockStream``), and asks again. It deletes its local copy only when

* it is not an owner of the block under the current ring,
* **every** owner confirmed holding the block after the push (so the last copy is never
  deleted: a block whose owners are all unreachable is simply kept),
* the ring has not changed during the pass and has been in force for ``settle`` seconds
  (two peers acting on different ring versions could otherwise each think the other is the
  owner and both drop their copy; ring changes reach every peer within a second, so a settle
  time of a few seconds rules that out).

Garbage is left alone: blocks that GC's last live set (:class:`~torus_core.gc.LiveSet`)
calls dead are neither checked, pushed, deleted nor counted as under-replicated -- GC deletes
them on every holder. Pushing them would undo the GC of the other holders and the two would
move the same dead blocks back and forth forever (issue 11: an idle cluster deleting and
re-pushing tens of GiB). Without a live set (none built yet, GC unable to read the metadata)
every block is treated as live, which is safe (nothing is dropped) but may count garbage, so
the published under-replicated count is then ``-1`` (unknown).

Re-replication after a peer removal falls out of this (surviving holders push to the new
owners), and so does draining a removed peer. A peer that comes back after a short outage keeps
its blocks; they are still valid. Pushes are rate-limited (bytes/s) and the progress is exposed
as :class:`~torus_core.cluster.peerinfo.RebalanceInfo` (published by the heartbeat).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from torus_core import metrics
from torus_core.blockstore import BlockStore
from torus_core.cluster.peerinfo import RebalanceInfo
from torus_core.distributor.peercalls import PeerCalls
from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import BlockNotExist, InvalidArgument, TorusError
from torus_core.gc import LiveSet
from torus_core.refs import BlockRef
from torus_core.ring.base import Ring
from torus_core.rpc.client import PeerClient, PeerClientPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceOptions:
    """Tuning of the rebalancer.

    :param batch: local refs examined per step.
    :param rate_bytes: push rate limit in bytes/s (0 = unlimited).
    :param settle: seconds a ring must have been in force before local copies are deleted.
    :param check_timeout: deadline of one RebalanceCheck.
    :param push_timeout: deadline of one PutBlockStream.
    :param idle_max: after a clean pass (every live block on its owners, nothing pushed,
        deleted or unconfirmed) the next pass waits, doubling from 0.5 s up to ``idle_max``
        seconds; :meth:`Rebalancer.poke` (a ring change, a peer joining, leaving or restarting,
        blocks arriving that this peer does not own) ends the wait. 0 = a pass every round.
    """

    batch: int = 64
    rate_bytes: float = 0.0
    settle: float = 3.0
    check_timeout: float = 5.0
    push_timeout: float = 30.0
    idle_max: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.batch, int) or not 1 <= self.batch <= 10_000:
            raise InvalidArgument(f"rebalance batch must be in [1, 10000], got {self.batch!r}")
        if not isinstance(self.rate_bytes, int | float) or self.rate_bytes < 0:
            raise InvalidArgument(f"rebalance rate must be >= 0 bytes/s, got {self.rate_bytes!r}")
        if not isinstance(self.settle, int | float) or self.settle < 0:
            raise InvalidArgument(f"settle time must be >= 0, got {self.settle!r}")
        if not isinstance(self.idle_max, int | float) or self.idle_max < 0:
            raise InvalidArgument(f"idle pass interval must be >= 0, got {self.idle_max!r}")


class RateLimiter:
    """Paces a byte stream to ``rate`` bytes/s (0 = unlimited); sleeps are interruptible."""

    def __init__(self, rate: float, stop: threading.Event | None = None) -> None:
        self.rate = float(rate)
        self.stop = stop or threading.Event()
        self._start = time.monotonic()
        self._sent = 0

    def consume(self, n: int) -> None:
        """Account for ``n`` bytes, sleeping first if we are ahead of the rate."""
        self._sent += n
        if self.rate <= 0:
            return
        due = self._start + self._sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            self.stop.wait(min(delay, 60.0))


@dataclass
class PassResult:
    """What one pass did."""

    ring_version: int
    complete: bool = False
    examined: int = 0
    pushed_blocks: int = 0
    pushed_bytes: int = 0
    deleted: int = 0
    under_replicated: int = 0
    unconfirmed: int = 0
    #: blocks left alone because the live set calls them garbage
    dead_skipped: int = 0
    #: live copies this peer does not own that it kept (ring not settled, owners unconfirmed)
    kept: int = 0
    #: whether the pass had a live set (otherwise under_replicated may count garbage)
    live_known: bool = False
    started: float = field(default_factory=time.time)
    finished: float = 0.0

    @property
    def clean(self) -> bool:
        """A complete pass that found every live block on its owners, moved nothing and kept no
        copy it does not own."""
        return (
            self.complete
            and self.live_known
            and not (
                self.pushed_blocks or self.deleted or self.under_replicated or self.unconfirmed or self.kept
            )
        )


class Rebalancer:
    """Moves this peer's blocks to their owners and drops copies it no longer owns.

    :param self_uuid: this peer's UUID.
    :param store: the local block store.
    :param ring_fn: returns the ring currently in force.
    :param directory: peer addresses (down peers have no address).
    :param pool: RPC channels.
    :param options: tuning.
    :param live_fn: returns GC's latest complete live set, or None when none is known (then
        every block is treated as live). Called at the start of a pass and before every batch,
        so a long pass follows the metadata (the node's function refreshes a live set older
        than a few seconds, cheaply while the log has not moved).
    """

    def __init__(
        self,
        self_uuid: str,
        store: BlockStore,
        ring_fn: Callable[[], Ring],
        directory: PeerDirectory,
        pool: PeerClientPool,
        options: RebalanceOptions | None = None,
        live_fn: Callable[[], LiveSet | None] | None = None,
    ) -> None:
        self.self_uuid = self_uuid
        self.live_fn = live_fn
        self.store = store
        self.ring_fn = ring_fn
        self.directory = directory
        self.pool = pool
        self.options = options or RebalanceOptions()
        self.calls = PeerCalls(directory, pool, suspect_seconds=self.options.check_timeout)
        self._info = RebalanceInfo()
        self._info_lock = threading.Lock()
        self._ring_version = -1
        self._ring_since = time.monotonic()
        self.last_result: PassResult | None = None
        # counters of the passes that ended (a running pass adds its PassResult on top)
        self._pushed_blocks_total = 0
        self._pushed_bytes_total = 0
        self._deleted_total = 0
        # idle back-off: seconds the next pass waits after clean passes, and when it is due
        self._idle = 0.0
        self._next_at = 0.0
        self._poked = threading.Event()

    # --- ring bookkeeping ----------------------------------------------------------------------

    def ring_changed(self, version: int) -> None:
        """Tell the rebalancer a new ring is in force (restarts the settle clock, and the next
        pass runs without waiting)."""
        if version != self._ring_version:
            self._ring_version = version
            self._ring_since = time.monotonic()
            self.poke()

    # --- idle back-off -------------------------------------------------------------------------

    def poke(self) -> None:
        """Something may have moved blocks out of place: run the next pass without waiting."""
        self._poked.set()

    @property
    def idle(self) -> bool:
        """Whether the last pass was clean and the next one waits (backs off)."""
        return self._idle > 0 and not self._poked.is_set()

    def due(self) -> bool:
        """Whether a pass should run now (poked, not clean last time, or the wait is over)."""
        return self._poked.is_set() or time.monotonic() >= self._next_at

    def _schedule_next(self, result: PassResult) -> None:
        if result.clean and self.options.idle_max > 0:
            self._idle = min(self.options.idle_max, max(0.5, self._idle * 2))
        else:
            self._idle = 0.0
        self._next_at = time.monotonic() + self._idle

    def _current_ring(self) -> Ring:
        ring = self.ring_fn()
        self.ring_changed(ring.version)
        return ring

    def settled(self) -> bool:
        """Whether the ring in force has been stable for ``settle`` seconds."""
        return time.monotonic() - self._ring_since >= self.options.settle

    # --- progress ------------------------------------------------------------------------------

    def info(self) -> RebalanceInfo:
        """A copy of the published progress."""
        with self._info_lock:
            return replace(self._info)

    def _totals(self, running: PassResult) -> dict[str, int]:
        """The since-start counters, including what the running pass did so far."""
        return {
            "pushed_blocks_total": self._pushed_blocks_total + running.pushed_blocks,
            "pushed_bytes_total": self._pushed_bytes_total + running.pushed_bytes,
            "deleted_total": self._deleted_total + running.deleted,
        }

    def _update_info(self, **changes: object) -> None:
        with self._info_lock:
            self._info = replace(self._info, **changes)  # type: ignore[arg-type]

    # --- the pass ------------------------------------------------------------------------------

    def _batches(self) -> Iterator[list[BlockRef]]:
        batch: list[BlockRef] = []
        for ref in list(self.store.iter_refs()):
            batch.append(ref)
            if len(batch) >= self.options.batch:
                yield batch
                batch = []
        if batch:
            yield batch

    def maybe_run_pass(self, stop: threading.Event | None = None) -> PassResult | None:
        """Run a pass if one is :meth:`due` (what the maintenance loop calls)."""
        if not self.due():
            return None
        return self.run_pass(stop)

    def run_pass(self, stop: threading.Event | None = None) -> PassResult:
        """Walk every local block once. A ring change or ``stop`` ends the pass early
        (``complete=False``); nothing is deleted after a ring change was noticed."""
        stop = stop or threading.Event()
        ring = self._current_ring()
        self._poked.clear()  # this pass covers what happened so far; a later poke asks for another
        result = PassResult(ring.version)
        live = self.live_fn() if self.live_fn is not None else None
        result.live_known = live is not None
        limiter = RateLimiter(self.options.rate_bytes, stop)
        # "rebalancing" = moving data: a pass after one that had work to do, or one that pushes or
        # deletes. A pass that only confirms that everything is in place is not rebalancing, so an
        # idle cluster reads as balanced although its peers keep checking.
        previous = self.last_result
        self._update_info(rebalancing=previous is None or not previous.clean)
        t0 = time.monotonic()
        try:
            for batch in self._batches():
                if stop.is_set():
                    return result
                if self._current_ring().version != ring.version:
                    log.info("ring changed during the rebalance pass; restarting")
                    return result
                if self.live_fn is not None:
                    live = self.live_fn() or live
                self._step(ring, batch, result, limiter, live)
                elapsed = max(time.monotonic() - t0, 1e-6)
                moving = {"rebalancing": True} if result.pushed_blocks or result.deleted else {}
                self._update_info(rate=result.pushed_bytes / elapsed, **self._totals(result), **moving)
            result.complete = True
            metrics.REBALANCE_PASSES.inc()
        finally:
            result.finished = time.time()
            elapsed = max(time.monotonic() - t0, 1e-6)
            changes: dict[str, object] = {
                "rebalancing": False,
                "rate": result.pushed_bytes / elapsed,
                **self._totals(result),
            }
            self._pushed_blocks_total += result.pushed_blocks
            self._pushed_bytes_total += result.pushed_bytes
            self._deleted_total += result.deleted
            if result.complete:
                info = self.info()
                changes.update(
                    last_finish=result.finished,
                    last_blocks=result.pushed_blocks,
                    under_replicated=result.under_replicated if result.live_known else -1,
                    unconfirmed=result.unconfirmed,
                    dead_skipped=result.dead_skipped,
                    ring_version=result.ring_version,
                    passes=info.passes + 1,
                )
            self._update_info(**changes)
            self.last_result = result
            self._schedule_next(result)
        return result

    def _step(
        self,
        ring: Ring,
        refs: list[BlockRef],
        result: PassResult,
        limiter: RateLimiter,
        live: LiveSet | None = None,
    ) -> None:
        result.examined += len(refs)
        if live is not None:
            alive = [ref for ref in refs if not live.is_dead(ref)]
            result.dead_skipped += len(refs) - len(alive)
            refs = alive
        owners_of = {ref: ring.get_peers(ref).owners for ref in refs}
        by_owner: dict[str, list[BlockRef]] = {}
        for ref, owners in owners_of.items():
            for uuid in owners:
                if uuid != self.self_uuid:
                    by_owner.setdefault(uuid, []).append(ref)
        confirmed: dict[BlockRef, set[str]] = {ref: set() for ref in refs}
        missing_any: set[BlockRef] = set()
        failed: set[BlockRef] = set()
        for uuid, orefs in by_owner.items():
            self._sync_owner(uuid, orefs, confirmed, missing_any, failed, result, limiter)
        result.under_replicated += len(missing_any)
        result.unconfirmed += len(failed)
        misplaced = sum(1 for owners in owners_of.values() if owners and self.self_uuid not in owners)
        if not self.settled() or self._current_ring().version != ring.version:
            result.kept += misplaced  # dropped by a later pass, which must not wait
            return
        deleted = 0
        for ref, owners in owners_of.items():
            if not owners or self.self_uuid in owners:
                continue
            if all(o in confirmed[ref] for o in owners):
                try:
                    self.store.delete_block(ref)
                    deleted += 1
                except BlockNotExist:
                    pass
        result.kept += misplaced - deleted
        if deleted:
            self.store.flush()
            result.deleted += deleted
            metrics.REBALANCE_DELETED_BLOCKS.inc(deleted)

    def _sync_owner(
        self,
        uuid: str,
        refs: list[BlockRef],
        confirmed: dict[BlockRef, set[str]],
        missing_any: set[BlockRef],
        failed: set[BlockRef],
        result: PassResult,
        limiter: RateLimiter,
    ) -> None:
        if not self.calls.dialable(uuid):
            failed.update(refs)
            return

        def sync(client: PeerClient) -> None:
            has = client.rebalance_check(refs, timeout=self.options.check_timeout)
            missing: list[BlockRef] = []
            for ref, held in zip(refs, has, strict=True):
                if held:
                    confirmed[ref].add(uuid)
                else:
                    missing.append(ref)
            if not missing:
                return
            missing_any.update(missing)
            items: list[tuple[BlockRef, bytes]] = []
            for ref in missing:
                try:
                    items.append((ref, self.store.get_block(ref)))
                except TorusError as exc:  # gone (GC) or corrupt here: someone else must supply it
                    log.debug("cannot push %s to %s: %s", ref, uuid, exc)
                    failed.add(ref)
            if not items:
                return
            for _ref, data in items:
                limiter.consume(len(data))
            client.put_block_stream(items, timeout=self.options.push_timeout)
            result.pushed_blocks += len(items)
            result.pushed_bytes += sum(len(d) for _, d in items)
            metrics.REBALANCE_PUSHED_BLOCKS.inc(len(items))
            metrics.REBALANCE_PUSHED_BYTES.inc(sum(len(d) for _, d in items))
            pushed = [r for r, _ in items]
            again = client.rebalance_check(pushed, timeout=self.options.check_timeout)
            for ref, held in zip(pushed, again, strict=True):
                if held:
                    confirmed[ref].add(uuid)
                else:
                    failed.add(ref)

        try:
            self.calls.call(uuid, sync)
        except TorusError as exc:
            log.info("rebalance to %s failed (blocks kept): %s", uuid, exc)
            failed.update(r for r in refs if uuid not in confirmed[r])
