"""The ``base`` layer (kind 0): one 24-byte BlockRef per block; the zero ref marks a hole."""

from __future__ import annotations

import struct
from typing import ClassVar

from pyroaring import BitMap

from torus_core.blockset.layer import BlockData, Blockset
from torus_core.blockstore import BlockStore
from torus_core.crc32 import page_crcs as page_crc_table
from torus_core.errors import InvalidArgument
from torus_core.refs import VOLUME_MAX, BlockRef, BlockType, INodeRef

_REF = struct.Struct("<QQQ")
_SIZE = _REF.size
#: Bound of the decoded-ref cache of a base layer (entries; ~150 B each).
_MAX_CACHED_REFS = 65536
_ZERO = bytes(_SIZE)


class BaseLayer(Blockset):
    """Holds the refs; mints ``BlockRef(volume, inode, n)`` with a per-blockset counter.

    The refs are kept as one ``bytearray`` in the stored format, so marshalling is a copy.
    """

    name: ClassVar[str] = "base"
    kind: ClassVar[int] = 0

    def __init__(self, store: BlockStore, sub: Blockset | None = None, option: str | None = None) -> None:
        if sub is not None:
            raise InvalidArgument("the base layer must be the innermost layer")
        if option:
            raise InvalidArgument(f"the base layer takes no option, got {option!r}")
        super().__init__(store, None)
        self._raw = bytearray()
        #: decoded refs by slot (BlockRef construction validates its fields: not free)
        self._refs: dict[int, BlockRef] = {}
        self._counter = 0
        self._zero_block = bytes(self.block_size)

    def content(self) -> bytes:
        """Concatenated 24-byte refs."""
        return bytes(self._raw)

    def load_content(self, content: bytes) -> None:
        """Load concatenated refs; InvalidArgument unless a multiple of 24 bytes of valid refs."""
        if len(content) % _SIZE:
            raise InvalidArgument(f"base layer content length {len(content)} is not a multiple of 24")
        for word, _inode, _index in _REF.iter_unpack(content):
            if word >> 40 not in (BlockType.DATA, BlockType.INODE):
                raise InvalidArgument(f"base layer holds a ref of unknown block type {word >> 40}")
        self._raw = bytearray(content)
        self._refs.clear()

    @property
    def length(self) -> int:
        """Number of slots."""
        return len(self._raw) // _SIZE

    def ref_at(self, i: int) -> BlockRef:
        """The ref in slot ``i`` (the zero ref for a hole)."""
        ref = self._refs.get(i)
        if ref is not None:
            return ref
        self._check_index(i)
        word, inode, index = _REF.unpack_from(self._raw, i * _SIZE)
        ref = BlockRef(word & VOLUME_MAX, inode, index, BlockType(word >> 40))
        if len(self._refs) >= _MAX_CACHED_REFS:
            self._refs.clear()
        self._refs[i] = ref
        return ref

    def is_hole(self, i: int) -> bool:
        """Whether slot ``i`` holds the zero ref."""
        self._check_index(i)
        word: int
        inode: int
        index: int
        word, inode, index = _REF.unpack_from(self._raw, i * _SIZE)
        return (word & VOLUME_MAX) == 0 and inode == 0 and index == 0

    def get_block(self, i: int) -> bytes:
        """Read the block from the store; a hole returns zeros without I/O."""
        ref = self.ref_at(i)
        if ref.is_zero():
            return self._zero_block
        return self.store.get_block(ref)

    def read_range_unverified(self, i: int, start: int, length: int) -> bytes:
        """Read just the range from the store (no integrity check); a hole gives zeros."""
        self._check_range(start, length)
        ref = self.ref_at(i)
        if ref.is_zero():
            return self._zero_block if length == self.block_size else bytes(length)
        return self.store.read_block_range(ref, start, length)

    def page_crcs_unverified(self, i: int, page_size: int) -> bytes | None:
        """The store's per-page CRC table of block ``i`` (:meth:`BlockStore.page_crcs`) if the
        store serves one cheaply (``serves_page_crcs``: the distributor), else None (reading
        the block is as cheap); a hole gives the table of a zero block without I/O."""
        if not self.store.serves_page_crcs:
            return None
        ref = self.ref_at(i)
        if ref.is_zero():
            return page_crc_table(self._zero_block, page_size)
        return self.store.page_crcs(ref, page_size)

    def mint(self, inode: INodeRef) -> BlockRef:
        """A fresh data ref for ``inode`` (n = 1, 2, 3, … per blockset instance)."""
        self._counter += 1
        return BlockRef(inode.volume, inode.inode, self._counter)

    def put_block(self, inode: INodeRef, i: int, data: BlockData) -> None:
        """Write ``data`` under a new ref and point slot ``i`` at it."""
        self.put_block_crc32(inode, i, data, None)

    def put_block_crc32(self, inode: INodeRef, i: int, data: BlockData, crc32: int | None) -> None:
        """:meth:`put_block`, handing the store the padded block's CRC-32 if known (the crc
        layer computed it; :meth:`BlockStore.write_block_crc32`)."""
        self._check_index(i, allow_append=True)
        data = self._padded(data)
        ref = self.mint(inode)
        if crc32 is None:
            self.store.write_block(ref, data)
        else:
            self.store.write_block_crc32(ref, data, crc32)
        raw = ref.to_bytes()
        if i == self.length:
            self._raw += raw
        else:
            old = self.ref_at(i) if self._tracking() else None
            self._raw[i * _SIZE : (i + 1) * _SIZE] = raw
            self._refs[i] = ref
            if old is not None:
                self._delete_reclaimable([old])

    def truncate(self, n_blocks: int) -> None:
        """Append holes or cut."""
        self._check_count(n_blocks)
        want = n_blocks * _SIZE
        if want <= len(self._raw):
            gone = self._refs_in(n_blocks, self.length)
            del self._raw[want:]
            self._refs.clear()
            self._delete_reclaimable(gone)
        else:
            self._raw += bytes(want - len(self._raw))

    def trim(self, start: int, end: int) -> None:
        """Zero the refs in ``[start, end)``."""
        start, end = max(0, start), min(end, self.length)
        if start < end:
            gone = self._refs_in(start, end)
            self._raw[start * _SIZE : end * _SIZE] = bytes((end - start) * _SIZE)
            self._refs.clear()
            self._delete_reclaimable(gone)

    def _refs_in(self, start: int, end: int) -> list[BlockRef]:
        """Non-zero refs in slots ``[start, end)`` (none while neither reclaiming nor reporting
        superseded refs)."""
        if not self._tracking() or start >= end:
            return []
        raw = memoryview(self._raw)[start * _SIZE : end * _SIZE]
        return [
            BlockRef(word & VOLUME_MAX, inode, index, BlockType(word >> 40))
            for word, inode, index in _REF.iter_unpack(raw)
            if index
        ]

    def check_block(self, i: int, data: BlockData) -> bool:
        """The base layer has no integrity data."""
        return True

    def get_live_inodes(self) -> BitMap:
        """uint32-truncated INode numbers of the non-hole refs."""
        out = BitMap()
        for word, inode, index in _REF.iter_unpack(self._raw):
            if (word & VOLUME_MAX) or inode or index:
                out.add(inode & 0xFFFF_FFFF)
        return out

    def get_all_block_refs(self) -> list[BlockRef]:
        """Every non-hole ref, in slot order."""
        return [
            BlockRef(word & VOLUME_MAX, inode, index, BlockType(word >> 40))
            for word, inode, index in _REF.iter_unpack(self._raw)
            if (word & VOLUME_MAX) or inode or index
        ]
