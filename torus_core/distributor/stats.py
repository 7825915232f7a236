"""Counters of the distributor: where reads were served from, what repair and flushes did."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class DistributorStats:
    """Counters of where reads were served from and what repair did (thread-safe increments)."""

    local_reads: int = 0
    remote_reads: int = 0
    ranged_reads: int = 0
    #: page CRC tables read from a peer instead of the block (the crc layer's partial reads)
    page_crc_reads: int = 0
    #: bytes of block data (whole blocks, ranges, page CRC tables) received from peers
    remote_read_bytes: int = 0
    would_block: int = 0
    remote_failures: int = 0
    repairs: int = 0
    repair_failures: int = 0
    repairs_skipped: int = 0
    flush_rewrites: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def inc(self, name: str, by: int = 1) -> None:
        """Add ``by`` to counter ``name``."""
        with self._lock:
            setattr(self, name, getattr(self, name) + by)
