"""The ``crc`` layer (kind 1): a CRC32-IEEE per block, verified on every read."""

from __future__ import annotations

import sys
import zlib
from array import array
from typing import ClassVar

from torus_core.blockset.layer import BlockData, Blockset
from torus_core.blockstore import BlockStore
from torus_core.errors import CorruptBlock, InvalidArgument
from torus_core.refs import INodeRef


def _u32_array(content: bytes = b"") -> array:
    arr = array("I")
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte unsigned int
        arr = array("L")
    arr.frombytes(content)
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr


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
        self._zero_crc = zlib.crc32(bytes(self.block_size))
        self._crcs = _u32_array()
        self._crcs.extend([self._zero_crc] * sub.length)

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

    @property
    def length(self) -> int:
        """Number of slots."""
        return len(self._crcs)

    def get_block(self, i: int) -> bytes:
        """Read from the inner layer and verify the CRC."""
        self._check_index(i)
        data = self._sub.get_block(i)
        if zlib.crc32(data) != self._crcs[i]:
            raise CorruptBlock(f"block {i}: CRC mismatch (expected {self._crcs[i]:#010x})")
        return data

    def check_block(self, i: int, data: BlockData) -> bool:
        """Whether ``data`` matches the stored CRC (and every inner check)."""
        self._check_index(i)
        return zlib.crc32(data) == self._crcs[i] and self._sub.check_block(i, data)

    def put_block(self, inode: INodeRef, i: int, data: BlockData) -> None:
        """Record the CRC and delegate the write."""
        self._check_index(i, allow_append=True)
        data = self._padded(data)
        crc = zlib.crc32(data)
        self._sub.put_block(inode, i, data)
        if i == len(self._crcs):
            self._crcs.append(crc)
        else:
            self._crcs[i] = crc

    def truncate(self, n_blocks: int) -> None:
        """Truncate the inner layer; new slots get the zero-block CRC."""
        self._check_count(n_blocks)
        self._sub.truncate(n_blocks)
        have = len(self._crcs)
        if n_blocks <= have:
            del self._crcs[n_blocks:]
        else:
            self._crcs.extend([self._zero_crc] * (n_blocks - have))

    def trim(self, start: int, end: int) -> None:
        """Trim the inner layer; trimmed slots get the zero-block CRC."""
        self._sub.trim(start, end)
        start, end = max(0, start), min(end, len(self._crcs))
        if start < end:
            self._crcs[start:end] = array(self._crcs.typecode, [self._zero_crc]) * (end - start)
