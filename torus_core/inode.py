"""INodes and the INode store (inventory §5.2).

An :class:`INode` is one version of a volume's index: its size, attributes and the marshalled
blockset layers. Its binary encoding is the Go original's protobuf ``models.INode``::

    message INode {
      uint64 volume = 1;
      uint64 inode = 2;
      uint64 filesize = 4;
      map<string, string> attrs = 7;
      repeated BlockLayer blocks = 8;   // BlockLayer { uint32 type = 1; bytes content = 2; }
    }

encoded by a small hand-rolled proto3 codec (:mod:`torus_core.protowire`; zero scalars omitted,
map entries in key order), so INodes written by either implementation decode in the other.

The :class:`INodeStore` keeps an encoded INode as full-size blocks of the block store under
``BlockRef(volume, inode, 1..k, type=INODE)``; block 1 starts with the u32 LE payload length.

INode number 1 is virtual: a fresh volume points at ``(vid, 1)`` and nothing is stored until the
first sync. :func:`virtual_inode` builds that empty INode (no layers: the file layer creates a
blockset from the cluster's default spec, sized to the volume).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from torus_core import protowire as wire
from torus_core.blockstore import BlockStore
from torus_core.errors import BlockNotExist, CorruptBlock, InvalidArgument
from torus_core.refs import BlockRef, BlockType, INodeRef

#: The INode number every new volume starts at; never stored.
VIRTUAL_INODE = 1
_U32 = struct.Struct("<I")


@dataclass
class INode:
    """One version of a volume's index."""

    volume: int
    inode: int
    filesize: int = 0
    attrs: dict[str, str] = field(default_factory=dict)
    #: blockset layers, outermost first: ``(layer kind, content bytes)``
    blocks: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def ref(self) -> INodeRef:
        """The INodeRef naming this version."""
        return INodeRef(self.volume, self.inode)

    def to_bytes(self) -> bytes:
        """Encode as ``models.INode`` protobuf bytes."""
        parts = [
            wire.uint_field(1, self.volume),
            wire.uint_field(2, self.inode),
            wire.uint_field(4, self.filesize),
        ]
        for k in sorted(self.attrs):
            parts.append(wire.map_entry(7, k.encode("utf-8"), self.attrs[k].encode("utf-8")))
        for kind, content in self.blocks:
            layer = wire.uint_field(1, kind) + wire.bytes_field(2, bytes(content))
            parts.append(wire.bytes_field(8, layer, keep_empty=True))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> INode:
        """Decode ``models.INode`` protobuf bytes; InvalidArgument if malformed."""
        volume = inode = filesize = 0
        attrs: dict[str, str] = {}
        blocks: list[tuple[int, bytes]] = []
        try:
            for fno, _wt, value in wire.iter_fields(data):
                if fno == 1:
                    volume = wire.expect_int(value, "INode.volume")
                elif fno == 2:
                    inode = wire.expect_int(value, "INode.inode")
                elif fno == 4:
                    filesize = wire.expect_int(value, "INode.filesize")
                elif fno == 7:
                    k, v = wire.decode_map_entry(wire.expect_bytes(value, "INode.attrs"))
                    attrs[k.decode("utf-8")] = v.decode("utf-8")
                elif fno == 8:
                    kind, content = 0, b""
                    for lf, _lwt, lv in wire.iter_fields(wire.expect_bytes(value, "INode.blocks")):
                        if lf == 1:
                            kind = wire.expect_int(lv, "BlockLayer.type")
                        elif lf == 2:
                            content = wire.expect_bytes(lv, "BlockLayer.content")
                    blocks.append((kind, content))
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"INode attrs are not valid UTF-8: {exc}") from None
        if volume > 0xFF_FFFF_FFFF:
            raise InvalidArgument(f"INode volume {volume} exceeds 40 bits")
        return cls(volume, inode, filesize, attrs, blocks)


def virtual_inode(volume: int, size: int) -> INode:
    """The never-stored INode 1 of a fresh volume: ``size`` bytes, no layers yet."""
    if not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"volume size must be a non-negative integer, got {size!r}")
    return INode(volume, VIRTUAL_INODE, size)


class INodeStore:
    """Stores INodes as blocks in a :class:`BlockStore` (Go: ``torus.INodeStore``)."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.block_size = store.block_size
        if self.block_size < _U32.size:
            raise InvalidArgument("block size too small to hold an INode header")

    @staticmethod
    def _block_ref(ref: INodeRef, index: int) -> BlockRef:
        return BlockRef(ref.volume, ref.inode, index, BlockType.INODE)

    def _check_ref(self, ref: INodeRef) -> None:
        if not isinstance(ref, INodeRef):
            raise InvalidArgument(f"expected an INodeRef, got {type(ref).__name__}")
        if ref.inode == VIRTUAL_INODE:
            raise InvalidArgument("INode 1 is virtual and never stored")

    def write_inode(self, inode: INode) -> INodeRef:
        """Store ``inode`` under its own ref; returns that ref.

        Blocks are immutable: rewriting the same ref with different content raises
        :class:`~torus_core.errors.BlockExists` (delete it first).
        """
        ref = inode.ref
        self._check_ref(ref)
        payload = inode.to_bytes()
        framed = _U32.pack(len(payload)) + payload
        bs = self.block_size
        view = memoryview(framed)
        for n, start in enumerate(range(0, len(framed), bs), start=1):
            self.store.write_block(self._block_ref(ref, n), view[start : start + bs])
        return ref

    def block_refs(self, inode: INode) -> list[BlockRef]:
        """The store blocks :meth:`write_inode` uses for ``inode`` (none for the virtual INode 1)."""
        if inode.ref.inode == VIRTUAL_INODE:
            return []
        n = self._num_blocks(len(inode.to_bytes()))
        return [self._block_ref(inode.ref, k) for k in range(1, n + 1)]

    def _num_blocks(self, payload_len: int) -> int:
        return -(-(payload_len + _U32.size) // self.block_size)

    def get_inode(self, ref: INodeRef) -> INode:
        """Read and decode an INode; BlockNotExist if absent, CorruptBlock if undecodable."""
        self._check_ref(ref)
        first = self.store.get_block(self._block_ref(ref, 1))
        (length,) = _U32.unpack_from(first)
        k = self._num_blocks(length)
        parts = [first]
        for n in range(2, k + 1):
            parts.append(self.store.get_block(self._block_ref(ref, n)))
        data = b"".join(parts)[_U32.size : _U32.size + length]
        if len(data) != length:
            raise CorruptBlock(f"INode {ref}: stored length {length} exceeds its blocks")
        try:
            inode = INode.from_bytes(data)
        except InvalidArgument as exc:
            raise CorruptBlock(f"INode {ref} does not decode: {exc}") from None
        if inode.ref != ref:
            raise CorruptBlock(f"INode stored under {ref} names itself {inode.ref}")
        return inode

    def delete_inode(self, ref: INodeRef) -> None:
        """Delete every block of a stored INode; BlockNotExist if it is not stored."""
        self._check_ref(ref)
        first = self.store.get_block(self._block_ref(ref, 1))
        (length,) = _U32.unpack_from(first)
        for n in range(1, self._num_blocks(length) + 1):
            try:
                self.store.delete_block(self._block_ref(ref, n))
            except BlockNotExist:
                if n == 1:
                    raise

    def has_inode(self, ref: INodeRef) -> bool:
        """Whether the first block of ``ref`` is stored locally."""
        self._check_ref(ref)
        return self.store.has_block(self._block_ref(ref, 1))

    def flush(self) -> None:
        """Flush the underlying store."""
        self.store.flush()
