"""The ``crc`` layer (kind 1): a CRC32-IEEE per block, verified on every read.

Partial reads (:meth:`CRCLayer.get_block_range`) do not read and checksum the whole block each
time. The first one of a block gets a CRC per 4 KiB page of it: the store's table
(:meth:`~torus_core.blockstore.BlockStore.page_crcs`, for a remote block 512 B from a peer
instead of the 512 KiB block), accepted only if the page CRCs combine
(:func:`~torus_core.crc32.combined_page_crcs`) to the block's CRC held here, else computed from
a verified full read of the block. The table is kept in memory (a bounded LRU of such tables,
512 B per 512 KiB block); every partial read then reads only the pages it needs from the store
and checks each against it. Every byte returned is therefore checked against a CRC that was
itself verified against the INode.
"""

from __future__ import annotations

import contextlib
import sys
from array import array
from collections import OrderedDict
from typing import ClassVar

from torus_core.blockset.base import BaseLayer
from torus_core.blockset.layer import BlockData, Blockset
from torus_core.blockstore import BlockStore
from torus_core.crc32 import combined_page_crcs, crc32
from torus_core.errors import BlockUnavailable, CorruptBlock, InvalidArgument, WouldBlock
from torus_core.refs import INodeRef


def _u32_array(content: bytes = b"") -> array[int]:
    arr: array[int] = array("I")
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte unsigned int
        arr = array("L")
    arr.frombytes(content)
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr


#: Granularity of partial-read verification.
PAGE_SIZE = 4096
#: Most per-page CRC tables kept (16384 tables of a 512 KiB block = 8 GiB of data, ~9 MiB).
MAX_PAGE_TABLES = 16384


class CRCLayer(Blockset):
    """Content: u32 LE CRC per slot; holes and trimmed slots hold the CRC of a zero block.

    A mismatch raises :class:`~torus_core.errors.CorruptBlock` (a ``BlockUnavailable``).
    """

    name: ClassVar[str] = "crc"
    kind: ClassVar[int] = 1

    def __init__(self, store: BlockStore, sub: Blockset | None = None, option: str | None = None) -> None:
        if sub is None:
            raise InvalidArgument("the crc layer needs an inner layer (e.g. crc,base)")
        if option:
            raise InvalidArgument(f"the crc layer takes no option, got {option!r}")
        super().__init__(store, sub)
        self._sub: Blockset = sub
        self._zero_crc = crc32(bytes(self.block_size))
        self._crcs = _u32_array()
        self._crcs.extend([self._zero_crc] * sub.length)
        self._pages: OrderedDict[int, array[int]] = OrderedDict()

    def content(self) -> bytes:
        """Concatenated little-endian u32 CRCs."""
        if sys.byteorder != "little":  # pragma: no cover
            swapped = array(self._crcs.typecode, self._crcs)
            swapped.byteswap()
            return swapped.tobytes()
        return self._crcs.tobytes()

    def load_content(self, content: bytes) -> None:
        """Load CRCs; their count must match the inner layer's length."""
        if len(content) % 4:
            raise InvalidArgument(f"crc layer content length {len(content)} is not a multiple of 4")
        if len(content) // 4 != self._sub.length:
            raise InvalidArgument(
                f"crc layer holds {len(content) // 4} CRCs but the inner layer has {self._sub.length} blocks"
            )
        self._crcs = _u32_array(content)
        self._pages.clear()

    @property
    def length(self) -> int:
        """Number of slots."""
        return len(self._crcs)

    def get_block(self, i: int) -> bytes:
        """Read from the inner layer and verify the CRC."""
        self._check_index(i)
        # One CRC check, ours: the inner layers read without checking (for the file store: a
        # plain pread instead of a read that verifies its own, identical, CRC-32 first).
        data = self._sub.read_range_unverified(i, 0, self.block_size)
        if crc32(data) != self._crcs[i]:
            return self._verified_retry(i)
        return data

    def _verified_retry(self, i: int) -> bytes:
        """Block ``i`` read again through the store's verified ``get_block`` path, after an
        unverified read failed our CRC (in a cluster that path falls back to another replica
        and repairs the bad copy); CorruptBlock if that copy does not match either."""
        data = self._sub.get_block(i)
        if crc32(data) != self._crcs[i]:
            raise CorruptBlock(f"block {i}: CRC mismatch (expected {self._crcs[i]:#010x})")
        return data

    def get_block_range(self, i: int, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of block ``i``, checked page by page (see module)."""
        self._check_index(i)
        self._check_range(start, length)
        bs = self.block_size
        if length == bs:
            return self.get_block(i)
        table = self._pages.get(i)
        if table is None:
            table = self._verified_page_table(i)
        if table is None:
            data = self.get_block(i)
            self._remember_pages(i, data)
            return bytes(memoryview(data)[start : start + length])
        with contextlib.suppress(KeyError):  # evicted meanwhile by a concurrent reader
            self._pages.move_to_end(i)
        a = start - start % PAGE_SIZE
        b = min(bs, -(-(start + length) // PAGE_SIZE) * PAGE_SIZE)
        raw = self._sub.read_range_unverified(i, a, b - a)
        if len(raw) != b - a:
            return bytes(memoryview(self._verified_retry(i))[start : start + length])
        mv = memoryview(raw)
        page = a // PAGE_SIZE
        for off in range(0, b - a, PAGE_SIZE):
            if crc32(mv[off : off + PAGE_SIZE]) != table[page]:
                # one retry of the whole block through the verified path (another replica)
                return bytes(memoryview(self._verified_retry(i))[start : start + length])
            page += 1
        if a == start and b - a == length:
            return raw
        return bytes(mv[start - a : start - a + length])

    def _verified_page_table(self, i: int) -> array[int] | None:
        """The inner stack's page CRC table of block ``i`` if its CRCs combine to ours (it is
        then remembered), else None: no table, or a wrong one (a bad copy: the caller's full
        read goes the verified way, which in a cluster finds a good copy and repairs)."""
        try:
            raw = self._sub.page_crcs_unverified(i, PAGE_SIZE)
        except WouldBlock:
            raise
        except BlockUnavailable:
            return None
        if raw is None or combined_page_crcs(raw, PAGE_SIZE, self.block_size) != self._crcs[i]:
            return None
        table = _u32_array(raw)
        self._pages[i] = table
        if len(self._pages) > MAX_PAGE_TABLES:
            self._pages.popitem(last=False)
        return table

    def _remember_pages(self, i: int, data: BlockData) -> None:
        mv = memoryview(data)
        table = _u32_array()
        table.extend([crc32(mv[off : off + PAGE_SIZE]) for off in range(0, len(mv), PAGE_SIZE)])
        self._pages[i] = table
        if len(self._pages) > MAX_PAGE_TABLES:
            self._pages.popitem(last=False)

    def _forget_pages(self, start: int, end: int) -> None:
        if not self._pages:
            return
        if end - start < len(self._pages):
            for i in range(start, end):
                self._pages.pop(i, None)
        else:
            for i in [i for i in list(self._pages) if start <= i < end]:  # list(): atomic copy
                del self._pages[i]

    def check_block(self, i: int, data: BlockData) -> bool:
        """Whether ``data`` matches the stored CRC (and every inner check)."""
        self._check_index(i)
        return crc32(data) == self._crcs[i] and self._sub.check_block(i, data)

    def put_block(self, inode: INodeRef, i: int, data: BlockData) -> None:
        """Record the CRC and delegate the write."""
        self._check_index(i, allow_append=True)
        data = self._padded(data)
        crc = crc32(data)
        if isinstance(self._sub, BaseLayer):
            self._sub.put_block_crc32(inode, i, data, crc)  # the store need not CRC it again
        else:
            self._sub.put_block(inode, i, data)
        self._pages.pop(i, None)
        if i == len(self._crcs):
            self._crcs.append(crc)
        else:
            self._crcs[i] = crc

    def truncate(self, n_blocks: int) -> None:
        """Truncate the inner layer; new slots get the zero-block CRC."""
        self._check_count(n_blocks)
        self._sub.truncate(n_blocks)
        self._forget_pages(n_blocks, max(n_blocks, len(self._crcs)))
        have = len(self._crcs)
        if n_blocks <= have:
            del self._crcs[n_blocks:]
        else:
            self._crcs.extend([self._zero_crc] * (n_blocks - have))

    def trim(self, start: int, end: int) -> None:
        """Trim the inner layer; trimmed slots get the zero-block CRC."""
        self._sub.trim(start, end)
        start, end = max(0, start), min(end, len(self._crcs))
        self._forget_pages(start, end)
        if start < end:
            self._crcs[start:end] = array(self._crcs.typecode, [self._zero_crc]) * (end - start)
