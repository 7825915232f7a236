"""Log hygiene for a server that strangers talk to: bounded and rate-limited log lines.

A client chooses export names (up to 64 KiB in NBD_OPT_EXPORT_NAME) and can open connections by
the thousand; logging either in full lets it fill the disk (1,000 connections added 62 MiB of
log in 1.5 s). :func:`shorten` bounds what goes into a line, and :class:`RateLimitFilter` lets
through at most ``burst`` records of one kind (logger + level + format string) per ``period``
seconds, then one note of how many it dropped.
"""

from __future__ import annotations

import logging
import threading
import time

#: Characters of a client-chosen string kept in a log line.
MAX_LOGGED = 200


def shorten(text: str, limit: int = MAX_LOGGED) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class RateLimitFilter(logging.Filter):
    """Drops records of a kind seen more than ``burst`` times in the current ``period``.

    The first record of a kind after a period with drops carries a note of how many similar
    records were suppressed. Thread-safe; state is one small entry per format string.
    """

    def __init__(self, burst: int = 20, period: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._lock = threading.Lock()
        # key -> [window start, records let through in it, records dropped]
        self._kinds: dict[tuple[str, int, str], list[float]] = {}

    @classmethod
    def install(cls, logger: logging.Logger, burst: int = 20, period: float = 10.0) -> RateLimitFilter:
        """Attach a filter to ``logger`` (once; the existing one is returned)."""
        for f in logger.filters:
            if isinstance(f, cls):
                return f
        flt = cls(burst, period)
        logger.addFilter(flt)
        return flt

    def filter(self, record: logging.LogRecord) -> bool:
        """Let the record through unless its kind is over the limit."""
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            state = self._kinds.get(key)
            if state is None or now - state[0] >= self.period:
                dropped = int(state[2]) if state is not None else 0
                self._kinds[key] = [now, 1, 0]
                if len(self._kinds) > 1000:  # many kinds (should not happen): forget old ones
                    for k in [k for k, v in self._kinds.items() if now - v[0] >= self.period]:
                        del self._kinds[k]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} similar messages suppressed]"
                return True
            if state[1] < self.burst:
                state[1] += 1
                return True
            state[2] += 1
            return False
