"""torus in-memory block store (tests, client write caches)."""

from torus_blockstore_mem.store import MemBlockStore

__all__ = ["MemBlockStore"]
