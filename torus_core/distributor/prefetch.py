"""Read-ahead for the distributor: remote blocks fetched in the background before they are read.

Two sources of work:

* :meth:`Prefetcher.submit` -- the caller names refs it will read soon (a file reading
  sequentially knows its next blocks: ``Distributor.prefetch``).
* :meth:`Prefetcher.sequential_guess` -- without such hints, a run of remote misses on
  consecutive refs of one INode (``index``, ``index + 1``, ... -- the base layer mints refs of one
  write session that way, so sequentially written data reads back that way) makes the next
  refs of that run worth fetching. A guess may name a block that does not exist or is local;
  the fetch then costs one cheap answer, nothing else.

Fetches run on a small dedicated pool, at most ``max_inflight`` at once; a read of a ref whose
fetch is in flight waits for it (:meth:`Prefetcher.join`) instead of asking the peers again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from torus_core.errors import InvalidArgument
from torus_core.refs import BlockRef

log = logging.getLogger(__name__)

#: ``fetch(ref)``: read ``ref`` from the peers into the read cache (raises on failure).
Fetch = Callable[[BlockRef], object]


class Prefetcher:
    """Background fetches of blocks expected to be read soon (see the module docstring).

    :param fetch: loads one block into the cache.
    :param max_inflight: fetches running or queued at once; more requests are dropped.
    :param readahead: refs fetched ahead of a detected sequential run (0 disables guessing).
    :param workers: threads of the fetch pool.
    """

    def __init__(self, fetch: Fetch, *, max_inflight: int = 8, readahead: int = 4, workers: int = 4) -> None:
        if not isinstance(max_inflight, int) or max_inflight < 0:
            raise InvalidArgument(f"max_inflight must be a non-negative integer, got {max_inflight!r}")
        if not isinstance(readahead, int) or readahead < 0:
            raise InvalidArgument(f"readahead must be a non-negative integer, got {readahead!r}")
        self._fetch = fetch
        self.max_inflight = max_inflight
        self.readahead = readahead
        self._lock = threading.Lock()
        self._inflight: dict[BlockRef, Future[object]] = {}
        self._last_miss: BlockRef | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="torus-prefetch")
        self._closed = False
        #: Fetches started, and how many of them failed (a wrong guess counts as failed).
        self.started = 0
        self.failed = 0

    def submit(self, refs: Iterable[BlockRef], skip: Callable[[BlockRef], bool]) -> int:
        """Start fetching each of ``refs`` not in flight and for which ``skip(ref)`` is false
        (cached, queued or local); returns how many were started."""
        started = 0
        for ref in refs:
            with self._lock:
                if self._closed or len(self._inflight) >= self.max_inflight:
                    break
                if ref in self._inflight:
                    continue
            if skip(ref):
                continue
            with self._lock:
                if self._closed or ref in self._inflight:
                    continue
                fut: Future[object] = self._pool.submit(self._run, ref)
                self._inflight[ref] = fut
                self.started += 1
            started += 1
        return started

    def _run(self, ref: BlockRef) -> object:
        try:
            return self._fetch(ref)
        except Exception as exc:
            with self._lock:
                self.failed += 1
            log.debug("prefetch of %s failed: %s", ref, exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(ref, None)

    def join(self, ref: BlockRef, timeout: float) -> bool:
        """If a fetch of ``ref`` is in flight, wait for it (at most ``timeout`` s); True if it
        finished successfully (the block is then in the cache)."""
        with self._lock:
            fut = self._inflight.get(ref)
        if fut is None:
            return False
        try:
            fut.result(timeout=timeout)
        except (FutureTimeout, Exception):
            return False
        return True

    def sequential_guess(self, ref: BlockRef) -> list[BlockRef]:
        """Record a remote miss of ``ref``; the refs to fetch ahead if it continues a run of
        misses on the same INode (the previous miss was one of the few refs just before it)."""
        if not self.readahead:
            return []
        with self._lock:
            last, self._last_miss = self._last_miss, ref
        if (
            last is None
            or last.volume != ref.volume
            or last.inode != ref.inode
            or last.type != ref.type
            or not 0 < ref.index - last.index <= self.readahead
        ):
            return []
        return [
            BlockRef(ref.volume, ref.inode, ref.index + k, ref.type) for k in range(1, self.readahead + 1)
        ]

    def __len__(self) -> int:
        with self._lock:
            return len(self._inflight)

    def close(self) -> None:
        """Drop queued fetches and wait for running ones (each bounded by the read deadlines)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
