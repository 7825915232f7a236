"""A per-connection pool of write-payload buffers.

Allocating (and zero-filling, and page-faulting) a fresh ``bytearray`` for every large write
costs as much as copying the data; reusing buffers of the sizes a client keeps sending avoids it.
Idle buffers are charged to the server's :class:`~torus_core.nbd.budget.ByteBudget` (a buffer is
only kept while the budget is less than half used) and given back by :meth:`BufferPool.clear`
when the connection ends. Used from the event loop thread only.
"""

from __future__ import annotations

from torus_core.nbd.budget import ByteBudget

#: Payloads smaller than this are allocated fresh (cheap) and never pooled.
MIN_POOLED = 64 * 1024


class BufferPool:
    """Free lists of buffers by exact size, holding at most ``max_bytes`` idle bytes."""

    def __init__(self, max_bytes: int = 8 * 1024 * 1024, budget: ByteBudget | None = None) -> None:
        self.max_bytes = max_bytes
        self.budget = budget
        self._free: dict[int, list[bytearray]] = {}
        self._idle = 0

    def get(self, n: int) -> bytearray:
        """A buffer of exactly ``n`` bytes (contents unspecified)."""
        if n >= MIN_POOLED:
            free = self._free.get(n)
            if free:
                self._idle -= n
                if self.budget is not None:
                    self.budget.release(n)
                return free.pop()
        return bytearray(n)

    def put(self, buf: bytearray) -> None:
        """Return a buffer nobody references any more."""
        n = len(buf)
        if n >= MIN_POOLED and self._idle + n <= self.max_bytes:
            budget = self.budget
            if budget is not None:
                if budget.used + n > budget.limit // 2:
                    return  # memory is scarce: let it go
                budget.charge(n)
            self._free.setdefault(n, []).append(buf)
            self._idle += n

    def clear(self) -> None:
        """Drop every idle buffer (the connection ends)."""
        if self.budget is not None and self._idle:
            self.budget.release(self._idle)
        self._free.clear()
        self._idle = 0

    @property
    def idle_bytes(self) -> int:
        """Bytes held by idle pooled buffers."""
        return self._idle
