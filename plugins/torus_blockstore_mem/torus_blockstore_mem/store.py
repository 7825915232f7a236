"""An in-memory :class:`~torus_core.blockstore.BlockStore` (Go: the ``temp`` store)."""

from __future__ import annotations

import threading
from typing import ClassVar

from torus_core.blockstore import BlockStoreConfig, RefTableBlockStore
from torus_core.errors import (
    BlockExists,
    BlockNotExist,
    Closed,
    InvalidArgument,
    OutOfSpace,
)
from torus_core.refs import BlockRef


class MemBlockStore(RefTableBlockStore):
    """Blocks held in a dict ``BlockRef -> bytes``; nothing survives the process.

    The data is copied on write (callers may reuse their buffers) and every method is safe to
    call from several threads. Capacity is ``capacity_bytes // block_size`` blocks.
    """

    name: ClassVar[str] = "mem"
    persistent: ClassVar[bool] = False

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise InvalidArgument(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(capacity_blocks, int) or capacity_blocks < 0:
            raise InvalidArgument(f"capacity must be a non-negative integer, got {capacity_blocks!r}")
        self._block_size = block_size
        self._capacity = capacity_blocks
        self._blocks: dict[BlockRef, bytes] = {}
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, config: BlockStoreConfig) -> MemBlockStore:
        """Create an empty store sized by ``config`` (``path`` and ``options`` are ignored)."""
        if not isinstance(config.block_size, int) or config.block_size <= 0:
            raise InvalidArgument(f"block_size must be a positive integer, got {config.block_size!r}")
        if not isinstance(config.capacity_bytes, int) or config.capacity_bytes < 0:
            raise InvalidArgument(f"capacity_bytes must be >= 0, got {config.capacity_bytes!r}")
        return cls(config.block_size, config.capacity_blocks)

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("mem block store is closed")

    def _ref_table(self) -> dict[BlockRef, bytes]:
        return self._blocks

    def __enter__(self) -> MemBlockStore:
        return self

    @property
    def block_size(self) -> int:
        """Size of every block in bytes."""
        return self._block_size

    def get_block(self, ref: BlockRef) -> bytes:
        """Return the stored bytes (always ``block_size`` long)."""
        with self._lock:
            self._check_open()
            try:
                return self._blocks[ref]
            except KeyError:
                raise BlockNotExist(f"block {ref} not found") from None

    def write_block(self, ref: BlockRef, data: bytes | bytearray | memoryview) -> None:
        """Store a zero-padded copy of ``data`` under ``ref``."""
        size = memoryview(data).nbytes
        if size > self._block_size:
            raise InvalidArgument(f"block data is {size} bytes, block size is {self._block_size}")
        block = bytes(data)
        if size < self._block_size:
            block += bytes(self._block_size - size)
        with self._lock:
            self._check_open()
            existing = self._blocks.get(ref)
            if existing is not None:
                if existing != block:
                    raise BlockExists(f"block {ref} already stored with different content")
                return
            if len(self._blocks) >= self._capacity:
                raise OutOfSpace(f"mem block store full ({self._capacity} blocks)")
            self._blocks[ref] = block

    def delete_block(self, ref: BlockRef) -> None:
        """Remove ``ref``; raises :class:`BlockNotExist` if absent."""
        with self._lock:
            self._check_open()
            try:
                del self._blocks[ref]
            except KeyError:
                raise BlockNotExist(f"block {ref} not found") from None

    def flush(self) -> None:
        """Nothing to make durable; only checks the store is open."""
        with self._lock:
            self._check_open()

    def close(self) -> None:
        """Drop every block. Idempotent."""
        with self._lock:
            self._closed = True
            self._blocks = {}
