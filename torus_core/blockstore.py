"""The block-store contract (Go: ``torus.BlockStore``).

A block store keeps fixed-size immutable blocks keyed by :class:`~torus_core.refs.BlockRef`.
Implementations are registered by name through the ``torus_register_block_stores`` hook and
opened with :meth:`BlockStore.open`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torus_core.crc32 import page_crcs as page_crc_table
from torus_core.errors import BlockNotExist, InvalidArgument
from torus_core.refs import BlockRef

_nonblocking = threading.local()


@contextmanager
def nonblocking_reads() -> Iterator[None]:
    """Within this block (on this thread), a store whose read would wait for the network
    raises :class:`~torus_core.errors.WouldBlock` instead, having done nothing.

    For code on an event loop that offers a read to a fast path and falls back to a worker
    thread (``File.read_nowait``): local and cached reads still run, remote ones are left to
    the worker. Stores without network I/O ignore it. Nests.
    """
    depth = getattr(_nonblocking, "depth", 0)
    _nonblocking.depth = depth + 1
    try:
        yield
    finally:
        _nonblocking.depth = depth


def reads_may_block() -> bool:
    """False inside :func:`nonblocking_reads` on this thread (a networked store then raises
    :class:`~torus_core.errors.WouldBlock` rather than wait)."""
    return not getattr(_nonblocking, "depth", 0)


@dataclass(frozen=True)
class BlockStoreConfig:
    """Arguments every block store receives when opened.

    :param path: directory for persistent stores (ignored by in-memory ones).
    :param capacity_bytes: storage size; capacity in blocks is ``capacity_bytes // block_size``.
    :param block_size: size of every block in bytes.
    :param options: store-specific options from the ``[blockstore.<name>]`` config section.
    """

    block_size: int
    capacity_bytes: int
    path: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def capacity_blocks(self) -> int:
        """Number of blocks that fit in ``capacity_bytes``."""
        return self.capacity_bytes // self.block_size


class BlockStore(ABC):
    """Fixed-size immutable blocks keyed by BlockRef.

    Semantics every implementation must honour (checked by
    :class:`torus_core.testing.blockstore.BlockStoreContract`):

    * ``write_block`` stores ``data`` (shorter data is zero-padded to ``block_size``; longer
      data raises :class:`~torus_core.errors.InvalidArgument`). Writing the same ref again with
      identical content is a no-op; with different content it raises
      :class:`~torus_core.errors.BlockExists`. A full store raises
      :class:`~torus_core.errors.OutOfSpace`.
    * ``get_block`` returns exactly ``block_size`` bytes, raises
      :class:`~torus_core.errors.BlockNotExist` for a missing ref and
      :class:`~torus_core.errors.CorruptBlock` if the stored bytes fail an integrity check.
    * ``delete_block`` of a missing ref raises :class:`~torus_core.errors.BlockNotExist`.
    * ``flush`` makes every completed write durable (persistent stores fsync).
    * After ``close`` every method raises :class:`~torus_core.errors.Closed`.
    """

    #: Registered name, e.g. ``"file"``.
    name: ClassVar[str]
    #: True if blocks survive a process restart.
    persistent: ClassVar[bool] = False
    #: True if :meth:`prefetch` fetches anything (blocks that live elsewhere, e.g. on peers);
    #: callers skip working out which blocks will be read next when it is False.
    prefetches: ClassVar[bool] = False
    #: True if :meth:`page_crcs` is cheaper than reading the block (it lives elsewhere); the
    #: ``crc`` layer asks for the table instead of reading the block on a first partial read.
    serves_page_crcs: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def open(cls, config: BlockStoreConfig) -> BlockStore:
        """Create or reopen a store described by ``config``."""

    @property
    @abstractmethod
    def block_size(self) -> int:
        """Size of every block in bytes."""

    @abstractmethod
    def has_block(self, ref: BlockRef) -> bool:
        """Whether ``ref`` is stored."""

    @abstractmethod
    def get_block(self, ref: BlockRef) -> bytes:
        """Return the block's ``block_size`` bytes."""

    def read_block_range(self, ref: BlockRef, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of block ``ref``, possibly **without** the store's
        own integrity check: the caller verifies them (the ``crc`` blockset layer checks each
        4 KiB page against CRCs taken from a verified full read, or from :meth:`page_crcs`
        checked against the block's CRC). Missing ref: BlockNotExist.

        The default slices :meth:`get_block` (which verifies); stores that can read a part of a
        block cheaply (the file store: one ``pread``) override it.
        """
        return bytes(memoryview(self.get_block(ref))[start : start + length])

    def page_crcs(self, ref: BlockRef, page_size: int) -> bytes:
        """The CRC-32 of each ``page_size`` page of block ``ref`` (little-endian u32s, see
        :func:`torus_core.crc32.page_crcs`), taken from a read that passed the store's own
        check: what the ``crc`` layer checks ranged reads against, once the table's combined
        CRC matches the INode's CRC of the block. Missing ref: BlockNotExist; a copy that fails
        its check: CorruptBlock.

        The default reads the block with :meth:`get_block`; a remote store (the distributor)
        asks a peer for the table, which is 0.1% of the block's size at 4 KiB pages.
        """
        if type(page_size) is not int or not 0 < page_size <= self.block_size:
            raise InvalidArgument(f"page size {page_size!r} is not in 1..{self.block_size}")
        return page_crc_table(self.get_block(ref), page_size)

    def write_block_crc32(self, ref: BlockRef, data: bytes | bytearray | memoryview, crc32: int) -> None:
        """:meth:`write_block`, given ``crc32``: the CRC-32 (IEEE, ``zlib.crc32``) of the
        zero-padded block, which the caller (the ``crc`` layer) has just computed. A store that
        checksums blocks with that same CRC may record it instead of computing it again (a
        wrong value makes later reads fail their check, it cannot pass bad data). The default
        ignores it."""
        self.write_block(ref, data)

    @abstractmethod
    def write_block(self, ref: BlockRef, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``ref``."""

    @abstractmethod
    def delete_block(self, ref: BlockRef) -> None:
        """Remove ``ref`` and free its space."""

    def prefetch(self, refs: Iterable[BlockRef]) -> int:
        """Start fetching ``refs`` (blocks read soon) in the background; returns how many
        fetches started. A store whose blocks are all local has nothing to fetch: 0."""
        return 0

    def discard_blocks(self, refs: Iterable[BlockRef]) -> int:
        """Free blocks that no INode will name again (a writer's superseded blocks, right after
        the INode that replaced them was committed); returns how many were deleted.

        Best effort: refs already gone are skipped. Stores whose blocks live elsewhere too (a
        cluster's distributor) may leave them to the garbage collectors instead.
        """
        n = 0
        for ref in refs:
            try:
                self.delete_block(ref)
                n += 1
            except BlockNotExist:
                pass
        return n

    @abstractmethod
    def num_blocks(self) -> int:
        """Capacity in blocks."""

    @abstractmethod
    def used_blocks(self) -> int:
        """Number of blocks stored."""

    @abstractmethod
    def iter_refs(self) -> Iterator[BlockRef]:
        """Iterate over a snapshot of the stored refs (safe against concurrent writes)."""

    @abstractmethod
    def flush(self) -> None:
        """Make all completed writes durable."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources. Idempotent."""

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RefTableBlockStore(BlockStore):
    """A :class:`BlockStore` whose stored refs are the keys of one dict guarded by one lock.

    Implements :meth:`has_block`, :meth:`num_blocks`, :meth:`used_blocks` and :meth:`iter_refs`
    from that table. A subclass sets ``_lock`` and ``_capacity`` (in blocks), returns its table
    from :meth:`_ref_table` and raises :class:`~torus_core.errors.Closed` from
    :meth:`_check_open` once closed.
    """

    _lock: threading.Lock
    _capacity: int

    @abstractmethod
    def _ref_table(self) -> Mapping[BlockRef, object]:
        """The dict whose keys are the stored refs (read under ``_lock``)."""

    @abstractmethod
    def _check_open(self) -> None:
        """Raise :class:`~torus_core.errors.Closed` if the store is closed."""

    def has_block(self, ref: BlockRef) -> bool:
        """Whether ``ref`` is stored."""
        with self._lock:
            self._check_open()
            return ref in self._ref_table()

    def num_blocks(self) -> int:
        """Capacity in blocks."""
        with self._lock:
            self._check_open()
            return self._capacity

    def used_blocks(self) -> int:
        """Number of blocks stored."""
        with self._lock:
            self._check_open()
            return len(self._ref_table())

    def iter_refs(self) -> Iterator[BlockRef]:
        """Iterate over a snapshot of the stored refs."""
        with self._lock:
            self._check_open()
            snapshot = list(self._ref_table())
        return iter(snapshot)
