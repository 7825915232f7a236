"""Identifiers with byte formats identical to the Go original (inventory §5.1).

All integers are little-endian. A volume word is 64 bits: the low 40 bits are the volume id,
the high 24 bits the block type (0 = data, 1 = inode).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NewType

from torus_core.errors import InvalidArgument

VolumeID = NewType("VolumeID", int)
INodeID = NewType("INodeID", int)
IndexID = NewType("IndexID", int)

#: Largest volume id that fits the 40-bit field.
VOLUME_MAX = 0xFF_FFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_TYPE_MAX = 0xFF_FFFF

_BLOCKREF = struct.Struct("<QQQ")
_INODEREF = struct.Struct("<QQ")


class BlockType(IntEnum):
    """What a block holds; stored in the high 24 bits of the volume word."""

    DATA = 0
    INODE = 1


def _check(name: str, value: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise InvalidArgument(f"{name} must be an integer in [0, {maximum:#x}], got {value!r}")


@dataclass(frozen=True, slots=True, order=True)
class INodeRef:
    """Names one version of a volume's INode: 16 bytes (u64 volume, u64 inode)."""

    volume: int
    inode: int

    SIZE = 16

    def __post_init__(self) -> None:
        _check("volume", self.volume, VOLUME_MAX)
        _check("inode", self.inode, _U64)

    def to_bytes(self) -> bytes:
        """Encode as 16 little-endian bytes."""
        return _INODEREF.pack(self.volume, self.inode)

    @classmethod
    def from_bytes(cls, data: bytes) -> INodeRef:
        """Decode 16 bytes; raises :class:`InvalidArgument` on a wrong length."""
        if len(data) != cls.SIZE:
            raise InvalidArgument(f"INodeRef needs {cls.SIZE} bytes, got {len(data)}")
        vol, inode = _INODEREF.unpack(data)
        return cls(vol & VOLUME_MAX, inode)

    def __str__(self) -> str:
        return f"vol: {self.volume}, inode: {self.inode}"


@dataclass(frozen=True, slots=True, order=True)
class BlockRef:
    """Names one immutable block: 24 bytes (u64 volume word with type bits, u64 inode, u64 index)."""

    volume: int
    inode: int
    index: int
    type: BlockType = BlockType.DATA

    SIZE = 24

    def __post_init__(self) -> None:
        _check("volume", self.volume, VOLUME_MAX)
        _check("inode", self.inode, _U64)
        _check("index", self.index, _U64)
        _check("type", int(self.type), _TYPE_MAX)

    @property
    def volume_word(self) -> int:
        """The 64-bit volume field with the block type in the high 24 bits."""
        return (int(self.type) << 40) | self.volume

    def to_bytes(self) -> bytes:
        """Encode as 24 little-endian bytes."""
        return _BLOCKREF.pack(self.volume_word, self.inode, self.index)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> BlockRef:
        """Decode 24 bytes; raises :class:`InvalidArgument` on a wrong length or unknown type."""
        if len(data) != cls.SIZE:
            raise InvalidArgument(f"BlockRef needs {cls.SIZE} bytes, got {len(data)}")
        word, inode, index = _BLOCKREF.unpack(data)
        raw_type = word >> 40
        try:
            btype = BlockType(raw_type)
        except ValueError:
            raise InvalidArgument(f"unknown block type {raw_type}") from None
        return cls(word & VOLUME_MAX, inode, index, btype)

    @property
    def inode_ref(self) -> INodeRef:
        """The INode version this block was written under."""
        return INodeRef(self.volume, self.inode)

    def is_zero(self) -> bool:
        """True for the hole marker (volume, inode and index all zero; type ignored)."""
        return self.volume == 0 and self.inode == 0 and self.index == 0

    def __str__(self) -> str:
        return f"br {self.volume} : {self.inode} : {self.index}"


ZERO_BLOCKREF = BlockRef(0, 0, 0)
ZERO_BLOCKREF_BYTES = bytes(BlockRef.SIZE)
