"""A bytes-bounded LRU cache of blocks keyed by ref.

Blocks are immutable, so entries are never invalidated by writes elsewhere; only a local
delete (GC) evicts one explicitly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from torus_core.errors import InvalidArgument
from torus_core.metrics import READ_CACHE_HITS, READ_CACHE_MISSES
from torus_core.refs import BlockRef


class BlockCache:
    """Thread-safe LRU of ``BlockRef -> bytes`` holding at most ``max_bytes`` of data.

    A capacity of 0 disables the cache. Blocks larger than the capacity are not cached.
    """

    def __init__(self, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise InvalidArgument(f"cache size must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._data: OrderedDict[BlockRef, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, ref: BlockRef) -> bytes | None:
        """The cached block, or None (counts a hit or a miss)."""
        with self._lock:
            data = self._data.get(ref)
            if data is None:
                self.misses += 1
                READ_CACHE_MISSES.inc()
                return None
            self._data.move_to_end(ref)
            self.hits += 1
            READ_CACHE_HITS.inc()
            return data

    def put(self, ref: BlockRef, data: bytes) -> None:
        """Insert or refresh ``ref``, evicting least-recently-used blocks to stay under the limit."""
        size = len(data)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(ref, None)
            if old is not None:
                self._bytes -= len(old)
            self._data[ref] = data
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= len(evicted)

    def discard(self, ref: BlockRef) -> None:
        """Forget ``ref`` if cached."""
        with self._lock:
            old = self._data.pop(ref, None)
            if old is not None:
                self._bytes -= len(old)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __contains__(self, ref: object) -> bool:
        with self._lock:
            return ref in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    @property
    def used_bytes(self) -> int:
        """Bytes currently cached."""
        with self._lock:
            return self._bytes
