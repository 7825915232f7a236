"""Give freed heap memory back to the OS now and then (glibc ``malloc_trim``).

A storage peer receives replication batches of several MiB. Once glibc has seen such a buffer
freed, it raises its mmap threshold and serves later ones from the heap; freed heap memory is
kept by the process, so under a stream of writes a peer's resident size creeps up by hundreds
of MiB it no longer uses. :class:`HeapTrimmer` calls ``malloc_trim(0)`` -- which returns every
free page of the heap, not only its top -- at most once per interval, after stored replication
batches (``ClusterNode``). Where there is no glibc it does nothing.

Measured (3 peers, R=3, 64 MiB volume, nbdcopy write + fio 4k randwrite/randread QD32): peak
RSS of each receiving peer ~310 -> ~120 MiB; the three processes 1027 -> 573 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` at most once per ``interval`` seconds (thread-safe).

    :param interval: minimum seconds between two trims.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._trim = _load_malloc_trim()
        self._lock = threading.Lock()
        self._last = float("-inf")
        #: Trims done, and how many of them released memory.
        self.trims = 0
        self.released = 0

    @property
    def available(self) -> bool:
        """Whether this platform has ``malloc_trim``."""
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim if the interval has passed since the last trim; whether a trim ran."""
        if self._trim is None:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                return False
            self._last = now
        released = self._trim(0)
        with self._lock:
            self.trims += 1
            self.released += 1 if released else 0
        return True
