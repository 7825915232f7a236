"""Placement of a write: which peers get each block, and handoff when an owner fails.

Round 1 sends every block to its ring owners that are not marked down, one PutBlocks per peer,
all peers in parallel. Each later round sends the blocks still short of acknowledgements to the
next untried peers of their permutations (hinted handoff; the rebalancer later moves such copies
to the owners), until the write level is met or the permutations are exhausted. Peers that just
failed are used only as a last resort (:class:`~torus_core.distributor.peercalls.PeerCalls`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Any

from torus_core.distributor.levels import WriteLevel
from torus_core.distributor.local import LocalReplica
from torus_core.distributor.peercalls import BlockCalls, PeerCalls
from torus_core.distributor.timeouts import DistributorTimeouts
from torus_core.errors import (
    BlockExists,
    InvalidArgument,
    NoPeer,
    OutOfSpace,
    PeerUnavailable,
    ReplicationFailed,
)
from torus_core.refs import BlockRef
from torus_core.ring.base import PeerPermutation, Ring

log = logging.getLogger(__name__)

#: First pause (s) before a write short of space is tried again (doubling up to the max).
SPACE_RETRY_PAUSE = 0.1
SPACE_RETRY_PAUSE_MAX = 1.0

#: Per block, ``peer UUID -> boot id`` of the peers that acknowledged it (``""`` for this one).
Acks = dict[str, str]


class WritePlacement:
    """Writes blocks to enough distinct peers for a write level.

    :param self_uuid: this peer's UUID (its copies go to ``local``).
    :param local: this peer's store as a replica.
    :param ring: returns the ring in use.
    :param calls: remote calls to the other peers.
    :param executor: runs the per-peer writes of one round in parallel.
    :param timeouts: the ``write`` deadline of one PutBlocks.
    :param block_size: size of every block (a peer message holds at least one).
    """

    def __init__(
        self,
        *,
        self_uuid: str,
        local: LocalReplica,
        ring: Callable[[], Ring],
        calls: PeerCalls,
        executor: Executor,
        timeouts: DistributorTimeouts,
        block_size: int,
    ) -> None:
        self.self_uuid = self_uuid
        self.local = local
        self.ring = ring
        self.calls = calls
        self.executor = executor
        self.timeouts = timeouts
        self.block_size = block_size
        # Set when a write waited the whole space_wait and still found no room: later writes try
        # once and answer OutOfSpace at once instead of each waiting again (a writer with many
        # writes in flight would otherwise take space_wait per write to see ENOSPC). Cleared by
        # the first write that fits.
        self._found_full = False

    def replicate(
        self,
        batch: list[tuple[BlockRef, bytes]],
        level: WriteLevel,
        *,
        durable: bool,
        seed: Sequence[Acks] | None = None,
        exclude: Sequence[set[str]] | None = None,
    ) -> list[Acks]:
        """Write ``batch`` until each block has enough acknowledgements from distinct peers.

        ``durable``: each peer makes the blocks durable before it acknowledges them (else they
        are durable only after a Flush). ``seed`` gives acknowledgements already held per block
        and ``exclude`` peers not to use. Returns, per block, ``peer -> boot id`` of the acks.

        Raises :class:`BlockExists` / :class:`InvalidArgument` as a peer answered them,
        :class:`OutOfSpace` when no reachable peer had room for ``timeouts.space_wait``
        seconds (the write is tried again meanwhile: GC frees superseded blocks) -- or, once
        a write has waited that long in vain, after a single attempt, until a write fits -- else
        :class:`ReplicationFailed` (retryable; blocks are immutable, so a retry is safe).
        """
        ring = self.ring()
        n = len(batch)
        perms: list[PeerPermutation] = []
        for ref, _ in batch:
            perm = ring.get_peers(ref)
            if not perm.owners:
                raise NoPeer(f"ring v{ring.version} has no owners for {ref}")
            perms.append(perm)
        acks: list[Acks] = [dict(seed[i]) if seed is not None else {} for i in range(n)]
        excluded = [exclude[i] if exclude is not None else set() for i in range(n)]
        want = [len(p.owners) if level is WriteLevel.ALL else 1 for p in perms]
        found_full = self._found_full
        space_deadline = time.monotonic() + (0.0 if found_full else self.timeouts.space_wait)
        pause = SPACE_RETRY_PAUSE
        while True:
            failed = self._place(batch, perms, acks, excluded, want, level, durable)
            short = [i for i in range(n) if len(acks[i]) < want[i]]
            if not short:
                self._found_full = False
                return acks
            if not _short_of_space(failed):
                break
            left = space_deadline - time.monotonic()
            if left <= 0:
                self._found_full = True
                waited = (
                    "the cluster was already found full (no wait until a write fits)"
                    if found_full
                    else f"after waiting {self.timeouts.space_wait:g} s for space"
                )
                raise OutOfSpace(
                    f"no room for {len(short)} of {n} block(s) {waited}: "
                    + "; ".join(f"{u}: {e}" for u, e in failed.items())
                )
            # A full store frees space through GC (superseded blocks, deleted volumes): wait for
            # it, bounded, instead of failing a write that fits once the garbage is gone.
            log.info("%d block(s) wait for space (full peers: %s)", len(short), _full_peers(failed))
            time.sleep(min(pause, left))
            pause = min(pause * 2, SPACE_RETRY_PAUSE_MAX)
        i = short[0]
        acked = sorted(acks[i])
        raise ReplicationFailed(
            f"write level {level.value}: {len(short)} of {n} block(s) short of replicas; "
            f"{batch[i][0]} acknowledged by {len(acked)}/{want[i]} distinct peer(s) {acked}; "
            + "; ".join(f"{u}: {e}" for u, e in failed.items()),
            acked=acked,
            failed=failed,
        )

    def _place(
        self,
        batch: list[tuple[BlockRef, bytes]],
        perms: list[PeerPermutation],
        acks: list[Acks],
        excluded: list[set[str]],
        want: list[int],
        level: WriteLevel,
        durable: bool,
    ) -> dict[str, BaseException]:
        """One placement attempt: rounds over the permutations until every block has ``want``
        acknowledgements (recorded in ``acks``) or no untried peer is left; returns the failures."""
        n = len(batch)
        tried = [set(acks[i]) | excluded[i] for i in range(n)]
        failed: dict[str, BaseException] = {}
        first = True
        while True:
            plans: dict[str, list[int]] = {}
            for i in range(n):
                k = (len(perms[i].owners) if first else want[i]) - len(acks[i])
                if k <= 0:
                    continue
                for uuid in self._pick(perms[i], tried[i], k, failed):
                    plans.setdefault(uuid, []).append(i)
            first = False
            if not plans:
                return failed
            self._write_round(batch, plans, acks, want, failed, level, durable)
            if all(len(acks[i]) >= want[i] for i in range(n)):
                return failed

    def _write_round(
        self,
        batch: list[tuple[BlockRef, bytes]],
        plans: dict[str, list[int]],
        acks: list[Acks],
        want: list[int],
        failed: dict[str, BaseException],
        level: WriteLevel,
        durable: bool,
    ) -> None:
        futures: dict[Future[str], str] = {}
        for uuid, indexes in plans.items():
            fut = self.executor.submit(self.put_to, uuid, [batch[i] for i in indexes], durable)
            fut.add_done_callback(_log_failure(uuid))
            futures[fut] = uuid
        most = max(len(ix) for ix in plans.values())
        bound = time.monotonic() + self.timeouts.write * (1 + most // 64) + 1.0
        pending = set(futures)
        while pending:
            done, pending = wait(
                pending, timeout=max(0.0, bound - time.monotonic()), return_when=FIRST_COMPLETED
            )
            if not done:
                break
            for fut in done:
                uuid = futures[fut]
                exc = fut.exception()
                if exc is None:
                    boot = fut.result()
                    for i in plans[uuid]:
                        acks[i][uuid] = boot
                    continue
                if isinstance(exc, BlockExists | InvalidArgument):
                    raise exc
                failed[uuid] = exc
            if level is WriteLevel.ONE and all(len(acks[i]) >= want[i] for i in range(len(batch))):
                return  # the other owners' writes finish in the background
        for fut in pending:
            uuid = futures[fut]
            failed[uuid] = PeerUnavailable(f"write to {uuid} did not finish in time")
            self.calls.suspect(uuid)

    def _pick(
        self, perm: PeerPermutation, tried: set[str], k: int, failed: dict[str, BaseException]
    ) -> list[str]:
        """The next ``k`` untried peers of ``perm`` in permutation order; peers marked down are
        skipped (and recorded as failed), recently failed ones are used only as a last resort."""
        picked: list[str] = []
        later: list[str] = []
        for uuid in perm.peers:
            if len(picked) >= k:
                break
            if uuid in tried:
                continue
            if uuid == self.self_uuid:
                if not self.local.present:
                    tried.add(uuid)
                    continue
            elif not self.calls.dialable(uuid):
                tried.add(uuid)
                failed.setdefault(uuid, PeerUnavailable(f"peer {uuid} is down or has no known address"))
                continue
            if self.calls.is_suspect(uuid):
                later.append(uuid)
                continue
            picked.append(uuid)
        for uuid in later:
            if len(picked) >= k:
                break
            picked.append(uuid)
        tried.update(picked)
        return picked

    def put_to(self, uuid: str, batch: list[tuple[BlockRef, bytes]], durable: bool = True) -> str:
        """Store ``batch`` on one peer; returns the boot id it reported (``""`` for this one)."""
        if uuid == self.self_uuid:
            if not self.local.present:
                raise NoPeer(f"peer {uuid} is this process, which has no local store")
            self.local.write(batch)
            if durable:  # in parallel with the other peers' durable puts
                self.local.flush()
            return ""
        return self.calls.data(uuid, lambda client: self._put_remote(uuid, client, batch, durable))

    def _put_remote(
        self, uuid: str, client: BlockCalls, batch: list[tuple[BlockRef, bytes]], durable: bool
    ) -> str:
        """PutBlocks in messages of at most half the channel's limit; the peer must not restart
        between them."""
        limit = max(self.block_size, client.max_message_bytes // 2)
        start = 0
        boot = ""
        while start < len(batch):
            end, size = start, 0
            while end < len(batch) and (end == start or size + len(batch[end][1]) <= limit):
                size += len(batch[end][1])
                end += 1
            chunk = batch[start:end]
            _, b = client.put_blocks_deferred(
                [r for r, _ in chunk],
                [d for _, d in chunk],
                defer_flush=not durable,
                timeout=self.timeouts.write,
                trim=True,  # padded to the block size by the distributor: the peer pads it back
            )
            if boot and b != boot:
                raise PeerUnavailable(f"peer {uuid} restarted during a write")
            boot = b
            start = end
        return boot


def _log_failure(uuid: str) -> Callable[[Future[Any]], None]:
    def callback(fut: Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.warning("replica write to %s failed: %s", uuid, exc)

    return callback


def _short_of_space(failed: dict[str, BaseException]) -> bool:
    """Whether a write fell short for lack of space: some peer was full and every other failure
    was a peer that could not be reached (so no reachable peer had room)."""
    full = [e for e in failed.values() if isinstance(e, OutOfSpace)]
    return bool(full) and all(isinstance(e, OutOfSpace | PeerUnavailable) for e in failed.values())


def _full_peers(failed: dict[str, BaseException]) -> str:
    return ", ".join(u for u, e in failed.items() if isinstance(e, OutOfSpace))
