"""A server-wide bound on the bytes NBD connections hold, and the heap release after closes.

Every connection charges a :class:`ByteBudget` for what it holds on behalf of its client:
payloads of READ/WRITE requests being processed, reply bytes queued for a client that is slow
to read them, and idle pooled buffers. A connection whose next request does not fit stops
reading from its socket (the kernel's window then throttles the client) and is woken when
another connection releases bytes. So that clients which never read their replies cannot starve
everyone else, a connection holding nothing may always take one request of up to
:data:`RESERVE` bytes: the total is bounded by ``limit + connections * RESERVE``.

:func:`release_free_memory` hands free heap pages back to the kernel (glibc ``malloc_trim``);
the server calls it, at most once a second, after connections close, so the resident size falls
back once abusive or merely numerous clients leave.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Bytes a connection that holds nothing may take even when the budget is used up.
RESERVE = 1024 * 1024


class ByteBudget:
    """Bytes held by all connections of one server, against ``limit`` (event loop thread only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiters: list[Callable[[], None]] = []
        self._wake_scheduled = False

    def fits(self, own: int, n: int) -> bool:
        """Whether a connection already holding ``own`` bytes may take ``n`` more."""
        return self.used + n <= self.limit or (own == 0 and n <= RESERVE)

    def charge(self, n: int) -> None:
        """Account ``n`` more bytes held."""
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def release(self, n: int) -> None:
        """Account ``n`` bytes given up; wake waiting connections (soon, not re-entrantly)."""
        self.used -= n
        if self._waiters and not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def wait(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once) after the next release."""
        self._waiters.append(callback)

    def _wake(self) -> None:
        self._wake_scheduled = False
        waiters, self._waiters = self._waiters, []
        for cb in waiters:
            try:
                cb()
            except Exception:  # one connection's bug must not strand the others
                log.exception("NBD budget waiter failed")


_trim: Callable[[int], int] | None = None
_trim_looked_up = False


def release_free_memory() -> bool:
    """Return free heap memory to the kernel (glibc ``malloc_trim(0)``); False where there is
    no such call (other C libraries) or nothing was released."""
    global _trim, _trim_looked_up
    if not _trim_looked_up:
        _trim_looked_up = True
        name = ctypes.util.find_library("c")
        try:
            fn = ctypes.CDLL(name).malloc_trim if name else None
        except (OSError, AttributeError):
            fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _trim = fn
    return bool(_trim(0)) if _trim is not None else False
