"""WriteBehind never waits without a bound: a queue full of blocks that cannot be placed makes
``submit`` raise the placement's error within ``submit_wait``, and blocks that fail only for a
while are retried by the waiting ``submit`` itself (issue 16)."""

from __future__ import annotations

import threading
import time

import pytest

from torus_core.distributor.levels import WriteLevel
from torus_core.distributor.writebehind import WriteBehind
from torus_core.errors import OutOfSpace, ReplicationFailed
from torus_core.refs import BlockRef

BLOCK = 64 * 1024


def ref(i: int) -> BlockRef:
    return BlockRef(1, 2, i)


def test_submit_to_a_queue_full_of_unplaceable_blocks_raises_out_of_space_in_bounded_time() -> None:
    def replicate(batch: list[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        raise OutOfSpace("every peer is full")

    wb = WriteBehind(replicate, max_bytes=4 * BLOCK, batch_bytes=BLOCK, workers=2, submit_wait=1.5)
    try:
        wb.submit([(ref(i), bytes(BLOCK)) for i in range(4)], WriteLevel.ALL)
        outcome: list[BaseException | None] = []

        def more() -> None:
            try:
                wb.submit([(ref(9), bytes(BLOCK))], WriteLevel.ALL)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        started = time.monotonic()
        t = threading.Thread(target=more, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "submit waited without a bound"
        assert 1.0 <= time.monotonic() - started < 5
        assert len(outcome) == 1 and isinstance(outcome[0], OutOfSpace), outcome
        assert wb.pending_bytes == 4 * BLOCK  # the failed blocks stay for the next flush
    finally:
        wb.close(5)


def test_a_waiting_submit_retries_failed_blocks_once_space_comes_back() -> None:
    full = threading.Event()
    full.set()
    placed: list[BlockRef] = []
    attempts = threading.Semaphore(0)

    def replicate(batch: list[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        attempts.release()
        if full.is_set():
            raise OutOfSpace("every peer is full")
        placed.extend(r for r, _ in batch)

    wb = WriteBehind(replicate, max_bytes=2 * BLOCK, batch_bytes=BLOCK, workers=1, submit_wait=8)
    try:
        wb.submit([(ref(0), bytes(BLOCK)), (ref(1), bytes(BLOCK))], WriteLevel.ALL)
        assert attempts.acquire(timeout=5) and attempts.acquire(timeout=5)  # both batches failed
        threading.Timer(1.0, full.clear).start()  # GC frees space a second later
        wb.submit([(ref(2), bytes(BLOCK))], WriteLevel.ALL)  # waits, retries, gets room
        assert {ref(0), ref(1)} <= set(placed)
    finally:
        wb.close(5)


def test_submit_wait_bounds_the_wait_for_a_slow_peer() -> None:
    wait = 0.5
    stop = threading.Event()

    def replicate(batch: list[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        stop.wait(5)  # a peer that takes its whole deadline

    wb = WriteBehind(replicate, max_bytes=BLOCK, batch_bytes=BLOCK, workers=1, submit_wait=wait)
    try:
        wb.submit([(ref(0), bytes(BLOCK))], WriteLevel.ALL)
        started = time.monotonic()
        with pytest.raises(ReplicationFailed, match="write-behind queue full"):
            wb.submit([(ref(1), bytes(BLOCK))], WriteLevel.ALL)
        assert time.monotonic() - started < wait + 1.5
    finally:
        stop.set()
        wb.close(5)


def test_after_one_submit_timed_out_the_next_ones_fail_at_once_until_a_batch_gets_through() -> None:
    def replicate(batch: list[tuple[BlockRef, bytes]], level: WriteLevel) -> None:
        raise OutOfSpace("every peer is full")

    wb = WriteBehind(replicate, max_bytes=2 * BLOCK, batch_bytes=BLOCK, workers=1, submit_wait=1.0)
    try:
        wb.submit([(ref(0), bytes(BLOCK)), (ref(1), bytes(BLOCK))], WriteLevel.ALL)
        with pytest.raises(OutOfSpace):
            wb.submit([(ref(2), bytes(BLOCK))], WriteLevel.ALL)
        started = time.monotonic()
        for i in range(16):  # sixteen NBD writers queued behind the first: not 16 x submit_wait
            with pytest.raises(OutOfSpace):
                wb.submit([(ref(3 + i), bytes(BLOCK))], WriteLevel.ALL)
        assert time.monotonic() - started < 1.0
    finally:
        wb.close(5)
