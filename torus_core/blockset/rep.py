"""The ``rep`` layer (kind 2, alias ``r``): extra copies of every block inside one volume.

Content: i32 LE ``rep``, then for each of the ``rep - 1`` extra copies an i32 LE count followed
by ``count`` 24-byte refs. Writes go to the inner layer and then to ``rep - 1`` extra copies
under fresh refs; a read that fails in the inner layer (missing or corrupt block) falls back to
the copies, each verified against the inner layers' integrity data (e.g. the CRC).

Fixes against the original: truncate/trim keep *every* copy list in step with the inner layer
(the original padded only the first for rep > 2), and unmarshal builds exactly ``rep - 1``
lists (the original allocated ``rep``); short lists in old data are padded with holes.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from pyroaring import BitMap

from torus_core.blockset.base import BaseLayer
from torus_core.blockset.layer import BlockData, Blockset
from torus_core.blockstore import BlockStore
from torus_core.errors import BlockNotExist, BlockUnavailable, CorruptBlock, InvalidArgument
from torus_core.refs import VOLUME_MAX, BlockRef, BlockType, INodeRef

_REF = struct.Struct("<QQQ")
_SIZE = _REF.size
_I32 = struct.Struct("<i")
#: Upper bound on copies, to reject absurd options and corrupt content early.
MAX_COPIES = 16


def _ref_at(raw: bytearray, i: int) -> BlockRef:
    word, inode, index = _REF.unpack_from(raw, i * _SIZE)
    return BlockRef(word & VOLUME_MAX, inode, index, BlockType(word >> 40))


class RepLayer(Blockset):
    """Intra-volume replication on top of ring replication (option: number of copies, default 2)."""

    name: ClassVar[str] = "rep"
    kind: ClassVar[int] = 2
    aliases: ClassVar[tuple[str, ...]] = ("r",)

    def __init__(self, store: BlockStore, sub: Blockset | None = None, option: str | None = None) -> None:
        if sub is None:
            raise InvalidArgument("the rep layer needs an inner layer (e.g. rep=2,crc,base)")
        super().__init__(store, sub)
        self._sub: Blockset = sub
        base = sub.layers()[-1]
        if not isinstance(base, BaseLayer):
            raise InvalidArgument("the rep layer needs a base layer at the bottom of the stack")
        self._base = base
        rep = 2
        if option not in (None, ""):
            try:
                rep = int(str(option))
            except ValueError:
                raise InvalidArgument(f"rep option must be an integer, got {option!r}") from None
        self._set_rep(rep)

    def _set_rep(self, rep: int) -> None:
        if not 1 <= rep <= MAX_COPIES:
            raise InvalidArgument(f"rep copies must be in [1, {MAX_COPIES}], got {rep}")
        self.rep = rep
        n = self._sub.length
        self._copies: list[bytearray] = [bytearray(n * _SIZE) for _ in range(rep - 1)]

    def content(self) -> bytes:
        """i32 rep, then per extra copy: i32 count + refs."""
        parts = [_I32.pack(self.rep)]
        for raw in self._copies:
            parts.append(_I32.pack(len(raw) // _SIZE))
            parts.append(bytes(raw))
        return b"".join(parts)

    def load_content(self, content: bytes) -> None:
        """Parse content; InvalidArgument if truncated or inconsistent."""
        if len(content) < 4:
            raise InvalidArgument("rep layer content too short")
        (rep,) = _I32.unpack_from(content, 0)
        if not 1 <= rep <= MAX_COPIES:
            raise InvalidArgument(f"rep layer content holds an invalid copy count {rep}")
        pos = 4
        n = self._sub.length
        copies: list[bytearray] = []
        for _ in range(rep - 1):
            if pos + 4 > len(content):
                raise InvalidArgument("rep layer content truncated (copy count)")
            (count,) = _I32.unpack_from(content, pos)
            pos += 4
            if count < 0 or pos + count * _SIZE > len(content):
                raise InvalidArgument(f"rep layer content truncated or bad count {count}")
            raw = bytearray(content[pos : pos + count * _SIZE])
            pos += count * _SIZE
            if len(raw) < n * _SIZE:  # lists left short by the original's truncate bug
                raw += bytes(n * _SIZE - len(raw))
            del raw[n * _SIZE :]
            copies.append(raw)
        if pos != len(content):
            raise InvalidArgument("rep layer content has trailing bytes")
        self.rep = rep
        self._copies = copies

    @property
    def length(self) -> int:
        """Number of slots (that of the inner layer)."""
        return self._sub.length

    def copy_refs(self, i: int) -> list[BlockRef]:
        """The extra copies' refs for slot ``i`` (zero refs for holes)."""
        self._check_index(i)
        return [_ref_at(raw, i) for raw in self._copies]

    def get_block(self, i: int) -> bytes:
        """Read from the inner layer; on a missing or corrupt block, use a verified copy."""
        self._check_index(i)
        try:
            return self._sub.get_block(i)
        except (BlockNotExist, BlockUnavailable) as exc:
            first = exc
        for ref in self.copy_refs(i):
            if ref.is_zero():
                continue
            try:
                data = self.store.get_block(ref)
            except (BlockNotExist, BlockUnavailable):
                continue
            if self._sub.check_block(i, data):
                return data
        if isinstance(first, BlockUnavailable):
            raise first
        raise CorruptBlock(f"block {i}: primary missing and no valid copy") from first

    def put_block(self, inode: INodeRef, i: int, data: BlockData) -> None:
        """Write through the inner layer, then ``rep - 1`` copies under fresh refs."""
        self._check_index(i, allow_append=True)
        data = self._padded(data)
        appending = i == self.length
        refs = []
        for _ in self._copies:
            ref = self._base.mint(inode)
            self.store.write_block(ref, data)
            refs.append(ref.to_bytes())
        self._sub.put_block(inode, i, data)
        replaced = [] if appending or not self._tracking() else self.copy_refs(i)
        for raw, ref_bytes in zip(self._copies, refs, strict=True):
            if appending:
                raw += ref_bytes
            else:
                raw[i * _SIZE : (i + 1) * _SIZE] = ref_bytes
        self._delete_reclaimable(replaced)

    def truncate(self, n_blocks: int) -> None:
        """Truncate the inner layer and every copy list."""
        self._check_count(n_blocks)
        gone = self._copy_refs_in(n_blocks, self.length)
        self._sub.truncate(n_blocks)
        want = n_blocks * _SIZE
        for raw in self._copies:
            if want <= len(raw):
                del raw[want:]
            else:
                raw += bytes(want - len(raw))
        self._delete_reclaimable(gone)

    def trim(self, start: int, end: int) -> None:
        """Trim the inner layer and every copy list."""
        self._sub.trim(start, end)
        start, end = max(0, start), min(end, self.length)
        if start < end:
            gone = self._copy_refs_in(start, end)
            for raw in self._copies:
                raw[start * _SIZE : end * _SIZE] = bytes((end - start) * _SIZE)
            self._delete_reclaimable(gone)

    def _copy_refs_in(self, start: int, end: int) -> list[BlockRef]:
        """Copies' refs in slots ``[start, end)`` while replaced refs are tracked (else none)."""
        if not self._tracking() or start >= end:
            return []
        n = len(self._copies[0]) // _SIZE if self._copies else 0
        return [_ref_at(raw, i) for raw in self._copies for i in range(start, min(end, n))]

    def get_live_inodes(self) -> BitMap:
        """INodes of the inner layer's refs and of every copy."""
        out = self._sub.get_live_inodes()
        for raw in self._copies:
            for word, inode, index in _REF.iter_unpack(raw):
                if (word & VOLUME_MAX) or inode or index:
                    out.add(inode & 0xFFFF_FFFF)
        return out

    def get_all_block_refs(self) -> list[BlockRef]:
        """The inner layer's refs followed by every non-hole copy ref."""
        out = self._sub.get_all_block_refs()
        for raw in self._copies:
            out.extend(
                BlockRef(word & VOLUME_MAX, inode, index, BlockType(word >> 40))
                for word, inode, index in _REF.iter_unpack(raw)
                if (word & VOLUME_MAX) or inode or index
            )
        return out
