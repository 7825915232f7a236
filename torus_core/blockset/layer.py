"""The blockset layer contract (Go: ``torus.Blockset``).

A blockset maps block indexes of one file to stored blocks. Layers stack outer → inner, e.g.
``rep=3 → crc → base``; only the innermost ``base`` layer holds BlockRefs, outer layers add
integrity checks (crc) or extra copies (rep). Each layer serialises its own content bytes;
:meth:`Blockset.marshal` gives the whole stack, outermost first, as ``(kind, content)`` pairs
exactly as the original stored them in ``INode.blocks``.

Blocksets are not thread-safe; their owner (a :class:`torus_core.file.File`) serialises access.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Self

from pyroaring import BitMap

from torus_core.blockstore import BlockStore
from torus_core.errors import BlockNotExist, InvalidArgument
from torus_core.refs import BlockRef, INodeRef

BlockData = bytes | bytearray | memoryview


class Blockset(ABC):
    """One layer of a blockset stack; ``sub`` is the next inner layer (None for ``base``)."""

    #: Registered name used in spec strings (``base``, ``crc``, ``rep``).
    name: ClassVar[str]
    #: Stable numeric kind stored in INodes (0 base, 1 crc, 2 rep).
    kind: ClassVar[int]
    #: Other names accepted in spec strings (``r`` for ``rep``).
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, store: BlockStore, sub: Blockset | None, option: str | None = None) -> None:
        self.store = store
        self.sub = sub
        self.block_size = store.block_size
        if sub is not None and sub.store is not store:
            raise InvalidArgument("all layers of a blockset must share one block store")

    @classmethod
    def from_content(cls, store: BlockStore, sub: Blockset | None, content: bytes) -> Self:
        """Rebuild a layer from its stored content bytes (the inverse of :meth:`content`)."""
        layer = cls(store, sub)
        layer.load_content(content)
        return layer

    # --- per-layer state ---------------------------------------------------------------------

    @abstractmethod
    def content(self) -> bytes:
        """This layer's serialised content (inventory §5.3)."""

    @abstractmethod
    def load_content(self, content: bytes) -> None:
        """Replace this layer's state by ``content``; raises InvalidArgument if malformed."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of block slots."""

    @abstractmethod
    def get_block(self, i: int) -> bytes:
        """Block ``i`` (exactly ``block_size`` bytes; a hole reads as zeros without I/O)."""

    @abstractmethod
    def put_block(self, inode: INodeRef, i: int, data: BlockData) -> None:
        """Store ``data`` as block ``i`` under new refs minted for ``inode``; ``i == length`` appends."""

    @abstractmethod
    def truncate(self, n_blocks: int) -> None:
        """Grow with holes or cut to ``n_blocks`` slots."""

    @abstractmethod
    def trim(self, start: int, end: int) -> None:
        """Turn the slots in ``[start, end)`` into holes (clamped to the length)."""

    # --- derived -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.length

    def is_hole(self, i: int) -> bool:
        """Whether block ``i`` is a hole (reads as zeros, holds no storage)."""
        if self.sub is None:
            raise NotImplementedError
        return self.sub.is_hole(i)

    #: Refs minted under this INode were never part of a written INode: blocks they name are
    #: deleted as soon as they are replaced, trimmed or cut (see :meth:`set_reclaim`).
    _reclaim: INodeRef | None = None

    def set_reclaim(self, inode: INodeRef | None) -> None:
        """Declare that no INode (committed or not) holds refs minted under ``inode`` yet, so a
        block of it that is overwritten, trimmed or cut can be deleted at once instead of being
        left for GC; ``None`` turns this off. Applies to this layer and every inner one."""
        for layer in self.layers():
            layer._reclaim = inode

    #: Where refs replaced, trimmed or cut (and not deletable at once) are reported, so the
    #: owner can free them once an INode that no longer names them is committed.
    _superseded: list[BlockRef] | None = None

    def set_superseded_sink(self, sink: list[BlockRef] | None) -> None:
        """Append every ref that this blockset stops naming (overwritten, trimmed or cut) to
        ``sink``, except refs deleted at once under :meth:`set_reclaim`; ``None`` turns this off.
        Applies to this layer and every inner one."""
        for layer in self.layers():
            layer._superseded = sink

    def _tracking(self) -> bool:
        """Whether replaced refs matter (deleted now or reported as superseded)."""
        return self._reclaim is not None or self._superseded is not None

    def _reclaimable(self, ref: BlockRef) -> bool:
        r = self._reclaim
        return r is not None and ref.inode == r.inode and ref.volume == r.volume and not ref.is_zero()

    def _delete_reclaimable(self, refs: Sequence[BlockRef]) -> None:
        """Delete the blocks of ``refs`` that :meth:`set_reclaim` allows to delete; report the
        other (non-zero) ones to the superseded sink, if any."""
        sink = self._superseded
        for ref in refs:
            if self._reclaimable(ref):
                try:
                    self.store.delete_block(ref)
                except BlockNotExist:
                    pass
            elif sink is not None and not ref.is_zero():
                sink.append(ref)

    def get_block_range(self, i: int, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of block ``i``, verified like :meth:`get_block`.

        The default reads the whole block; the ``crc`` layer reads only the pages needed and
        checks them against per-page CRCs verified against the block's CRC (see
        :mod:`torus_core.blockset.crc`).
        """
        self._check_range(start, length)
        return bytes(memoryview(self.get_block(i))[start : start + length])

    def read_range_unverified(self, i: int, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of block ``i`` for an outer layer that verifies
        them itself. The default is :meth:`get_block_range`; ``base`` reads just the range
        from the store (:meth:`BlockStore.read_block_range`)."""
        return self.get_block_range(i, start, length)

    def page_crcs_unverified(self, i: int, page_size: int) -> bytes | None:
        """The per-page CRC table of block ``i`` (see :meth:`BlockStore.page_crcs`) for an
        outer layer that checks it against its own CRC of the block; None where this stack
        cannot give one without reading the block (the outer layer then reads it). The default
        is None; ``base`` asks the store."""
        return None

    def check_block(self, i: int, data: BlockData) -> bool:
        """Whether ``data`` passes every integrity check the stack holds for slot ``i``."""
        return True if self.sub is None else self.sub.check_block(i, data)

    def get_live_inodes(self) -> BitMap:
        """The (uint32-truncated) INode numbers of every ref the stack holds."""
        return BitMap() if self.sub is None else self.sub.get_live_inodes()

    def get_all_block_refs(self) -> list[BlockRef]:
        """Every non-hole ref the stack holds (for GC marking)."""
        return [] if self.sub is None else self.sub.get_all_block_refs()

    def layers(self) -> list[Blockset]:
        """This layer and every inner one, outermost first."""
        out: list[Blockset] = []
        cur: Blockset | None = self
        while cur is not None:
            out.append(cur)
            cur = cur.sub
        return out

    def marshal(self) -> list[tuple[int, bytes]]:
        """``(kind, content)`` of every layer, outermost first (Go: MarshalBlocksetToProto)."""
        return [(layer.kind, layer.content()) for layer in self.layers()]

    def unmarshal(self, layers: Sequence[tuple[int, bytes]]) -> None:
        """Load ``(kind, content)`` pairs (outermost first) into this stack, innermost first."""
        mine = self.layers()
        if [k for k, _ in layers] != [layer.kind for layer in mine]:
            raise InvalidArgument(
                f"layer kinds {[k for k, _ in layers]} do not match this blockset "
                f"{[layer.kind for layer in mine]}"
            )
        for layer, (_kind, content) in zip(reversed(mine), reversed(list(layers)), strict=True):
            layer.load_content(bytes(content))

    def describe(self) -> str:
        """Spec-like description, e.g. ``crc,base``."""
        return ",".join(layer.name for layer in self.layers())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()} length={self.length}>"

    # --- helpers for implementations ---------------------------------------------------------

    def _check_index(self, i: int, *, allow_append: bool = False) -> None:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise InvalidArgument(f"block index must be a non-negative integer, got {i!r}")
        limit = self.length + (1 if allow_append else 0)
        if i >= limit:
            raise BlockNotExist(f"block index {i} beyond blockset length {self.length}")

    def _padded(self, data: BlockData) -> BlockData:
        n = len(data)
        if n == self.block_size:
            return data
        if n > self.block_size:
            raise InvalidArgument(f"block data of {n} bytes exceeds the block size {self.block_size}")
        return bytes(data) + bytes(self.block_size - n)

    def _check_range(self, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > self.block_size:
            raise InvalidArgument(f"range {start}+{length} is outside a {self.block_size}-byte block")

    def _check_count(self, n_blocks: int) -> None:
        if not isinstance(n_blocks, int) or isinstance(n_blocks, bool) or n_blocks < 0:
            raise InvalidArgument(f"block count must be a non-negative integer, got {n_blocks!r}")
