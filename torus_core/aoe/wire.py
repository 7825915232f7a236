"""AoE (ATA over Ethernet, protocol version 1, spec AoEr11) frame codec.

A frame is an Ethernet II header (destination, source, EtherType ``0x88A2``) followed by the AoE
header (10 bytes: version and flags, error, major, minor, command, tag) and a command-specific
argument. Everything multi-byte is big-endian except the ATA LBA, which is six little-endian
bytes, and IDENTIFY data, which is little-endian 16-bit words.

This module only encodes and decodes; :mod:`torus_core.aoe.ata` runs ATA commands and
:mod:`torus_core.aoe.target` answers requests. Decoding errors raise :class:`FrameError`
(a :class:`~torus_core.errors.ProtocolError`) carrying the AoE error code a target replies with,
or ``None`` when the frame is too damaged to answer (it is dropped).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from torus_core.errors import ProtocolError

ETHERTYPE = 0x88A2
VERSION = 1
BROADCAST_MAC = b"\xff" * 6
BROADCAST_MAJOR = 0xFFFF
BROADCAST_MINOR = 0xFF

ETH_HEADER = 14
AOE_HEADER = 10
#: Ethernet + AoE header: where the argument starts in a frame.
ARG_OFFSET = ETH_HEADER + AOE_HEADER
ATA_ARG = 12
CONFIG_ARG = 8
MASK_ARG = 4
RESERVE_ARG = 2
#: Shortest Ethernet frame (without FCS); shorter replies are zero-padded like vblade's.
MIN_FRAME = 60
SECTOR = 512
#: Longest config string (AoEr11 §3.2).
MAX_CONFIG = 1024

# header flags (low nibble of the first AoE byte)
FLAG_RESPONSE = 0x08
FLAG_ERROR = 0x04

# commands
CMD_ATA = 0
CMD_CONFIG = 1
CMD_MASK = 2
CMD_RESERVE = 3

# AoE error codes (AoEr11 §2.4)
ERR_BAD_COMMAND = 1
ERR_BAD_ARG = 2
ERR_DEVICE_UNAVAILABLE = 3
ERR_CONFIG_PRESENT = 4
ERR_BAD_VERSION = 5
ERR_RESERVED = 6

# ATA argument flags
AFLAG_WRITE = 0x01
AFLAG_ASYNC = 0x02
AFLAG_DEVICE = 0x10
AFLAG_EXTENDED = 0x40

# Query Config sub-commands
CCMD_READ = 0
CCMD_TEST = 1
CCMD_PREFIX = 2
CCMD_SET = 3
CCMD_FORCE_SET = 4

# MAC mask list sub-commands, directives and errors
MCMD_READ = 0
MCMD_EDIT = 1
DCMD_NONE = 0
DCMD_ADD = 1
DCMD_DELETE = 2
MERR_UNSPECIFIED = 1
MERR_BAD_DIRECTIVE = 2
MERR_FULL = 3

# Reserve/Release sub-commands
RCMD_READ = 0
RCMD_SET = 1
RCMD_FORCE_SET = 2

_AOE = struct.Struct(">BBHBB4s")
_CONFIG = struct.Struct(">HHBBH")


class FrameError(ProtocolError):
    """A malformed AoE frame. ``code`` is the AoE error to reply with (None: drop the frame)."""

    def __init__(self, message: str, code: int | None = ERR_BAD_ARG) -> None:
        super().__init__(message)
        self.code = code


def mac_str(mac: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (or ``-`` separated, or 12 hex digits) → 6 bytes."""
    digits = text.strip().replace(":", "").replace("-", "")
    try:
        mac = bytes.fromhex(digits)
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise FrameError(f"bad MAC address {text!r}", None)
    return mac


@dataclass
class Header:
    """Ethernet + AoE header of one frame."""

    dst: bytes
    src: bytes
    major: int
    minor: int
    command: int
    tag: bytes = b"\0\0\0\0"
    version: int = VERSION
    flags: int = 0
    error: int = 0

    @property
    def response(self) -> bool:
        """The R flag: this frame is a reply."""
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def is_error(self) -> bool:
        """The E flag: ``error`` holds an AoE error code."""
        return bool(self.flags & FLAG_ERROR)

    def encode(self) -> bytes:
        """The 24 header bytes."""
        if len(self.dst) != 6 or len(self.src) != 6 or len(self.tag) != 4:
            raise FrameError("MAC addresses are 6 bytes and tags 4", None)
        eth = self.dst + self.src + ETHERTYPE.to_bytes(2, "big")
        vf = ((self.version & 0x0F) << 4) | (self.flags & 0x0F)
        return eth + _AOE.pack(vf, self.error, self.major, self.minor, self.command, self.tag)

    @classmethod
    def decode(cls, frame: bytes | bytearray | memoryview) -> Header:
        """Parse the first 24 bytes; FrameError(code=None) if shorter or not AoE."""
        if len(frame) < ARG_OFFSET:
            raise FrameError(f"frame of {len(frame)} bytes is shorter than the AoE header", None)
        if int.from_bytes(frame[12:14], "big") != ETHERTYPE:
            raise FrameError("not an AoE frame", None)
        vf, err, major, minor, cmd, tag = _AOE.unpack_from(frame, ETH_HEADER)
        return cls(
            dst=bytes(frame[0:6]),
            src=bytes(frame[6:12]),
            major=major,
            minor=minor,
            command=cmd,
            tag=bytes(tag),
            version=vf >> 4,
            flags=vf & 0x0F,
            error=err,
        )

    def reply(self, src: bytes, major: int, minor: int) -> Header:
        """The header of a reply to this request, sent from ``src`` as ``major.minor``."""
        return Header(
            dst=self.src,
            src=src,
            major=major,
            minor=minor,
            command=self.command,
            tag=self.tag,
            version=VERSION,
            flags=FLAG_RESPONSE,
        )


def lba_from(raw: bytes | bytearray | memoryview) -> int:
    """Six little-endian LBA bytes → int."""
    return int.from_bytes(bytes(raw[:6]), "little")


@dataclass
class AtaArg:
    """Issue ATA Command argument (AoEr11 §3.1) plus the data that follows it."""

    aflags: int = 0
    feature: int = 0  # err on replies
    count: int = 0
    command: int = 0  # status on replies
    lba: int = 0
    data: bytes | bytearray | memoryview = b""

    @property
    def write(self) -> bool:
        """The W flag: data goes from the initiator to the device."""
        return bool(self.aflags & AFLAG_WRITE)

    @property
    def extended(self) -> bool:
        """The E flag: LBA48 addressing."""
        return bool(self.aflags & AFLAG_EXTENDED)

    def encode(self) -> bytes:
        """Argument bytes (12) followed by the data."""
        lba = (self.lba & 0xFFFF_FFFF_FFFF).to_bytes(6, "little")
        head = bytes((self.aflags & 0xFF, self.feature & 0xFF, self.count & 0xFF, self.command & 0xFF))
        return head + lba + b"\0\0" + bytes(self.data)

    @classmethod
    def decode(cls, arg: bytes | bytearray | memoryview) -> AtaArg:
        """Parse; FrameError(BadArg) if shorter than 12 bytes. ``data`` is a view of the rest."""
        if len(arg) < ATA_ARG:
            raise FrameError(f"ATA argument of {len(arg)} bytes (need {ATA_ARG})")
        view = memoryview(arg)
        return cls(
            aflags=view[0],
            feature=view[1],
            count=view[2],
            command=view[3],
            lba=lba_from(view[4:10]),
            data=view[ATA_ARG:],
        )


@dataclass
class ConfigArg:
    """Query Config Information argument (AoEr11 §3.2)."""

    buffer_count: int = 0
    firmware: int = 0
    sector_count: int = 0
    version: int = VERSION
    ccmd: int = CCMD_READ
    config: bytes = b""

    def encode(self) -> bytes:
        """Argument bytes including the config string."""
        vc = ((self.version & 0x0F) << 4) | (self.ccmd & 0x0F)
        head = _CONFIG.pack(self.buffer_count, self.firmware, self.sector_count & 0xFF, vc, len(self.config))
        return head + self.config

    @classmethod
    def decode(cls, arg: bytes | bytearray | memoryview) -> ConfigArg:
        """Parse; FrameError(BadArg) when short or the string length is impossible."""
        if len(arg) < CONFIG_ARG:
            raise FrameError(f"Query Config argument of {len(arg)} bytes (need {CONFIG_ARG})")
        bufcnt, fw, scnt, vc, length = _CONFIG.unpack_from(arg, 0)
        if length > MAX_CONFIG or CONFIG_ARG + length > len(arg):
            raise FrameError(f"config string length {length} exceeds the frame or {MAX_CONFIG}")
        return cls(bufcnt, fw, scnt, vc >> 4, vc & 0x0F, bytes(arg[CONFIG_ARG : CONFIG_ARG + length]))


@dataclass
class MaskArg:
    """MAC Mask List argument (AoEr11 §3.3): ``directives`` are ``(dcmd, mac)`` pairs."""

    mcmd: int = MCMD_READ
    merror: int = 0
    directives: list[tuple[int, bytes]] = field(default_factory=list)

    def encode(self) -> bytes:
        """Argument bytes."""
        out = bytearray((0, self.mcmd & 0xFF, self.merror & 0xFF, len(self.directives) & 0xFF))
        for dcmd, mac in self.directives:
            out += bytes((0, dcmd & 0xFF)) + mac
        return bytes(out)

    @classmethod
    def decode(cls, arg: bytes | bytearray | memoryview) -> MaskArg:
        """Parse; FrameError(BadArg) when the directive count exceeds the frame."""
        if len(arg) < MASK_ARG:
            raise FrameError(f"MAC mask argument of {len(arg)} bytes (need {MASK_ARG})")
        n = arg[3]
        if MASK_ARG + 8 * n > len(arg):
            raise FrameError(f"{n} mask directives do not fit in the frame")
        dirs = []
        for i in range(n):
            at = MASK_ARG + 8 * i
            dirs.append((arg[at + 1], bytes(arg[at + 2 : at + 8])))
        return cls(arg[1], arg[2], dirs)


@dataclass
class ReserveArg:
    """Reserve/Release argument (AoEr11 §3.4)."""

    rcmd: int = RCMD_READ
    macs: list[bytes] = field(default_factory=list)

    def encode(self) -> bytes:
        """Argument bytes."""
        return bytes((self.rcmd & 0xFF, len(self.macs) & 0xFF)) + b"".join(self.macs)

    @classmethod
    def decode(cls, arg: bytes | bytearray | memoryview) -> ReserveArg:
        """Parse; FrameError(BadArg) when the MAC count exceeds the frame."""
        if len(arg) < RESERVE_ARG:
            raise FrameError(f"reserve/release argument of {len(arg)} bytes (need {RESERVE_ARG})")
        n = arg[1]
        if RESERVE_ARG + 6 * n > len(arg):
            raise FrameError(f"{n} reserve-list MACs do not fit in the frame")
        return cls(arg[0], [bytes(arg[RESERVE_ARG + 6 * i : RESERVE_ARG + 6 * i + 6]) for i in range(n)])


def frame(header: Header, arg: bytes | bytearray = b"", pad: bool = True) -> bytes:
    """Header + argument, zero-padded to the 60-byte Ethernet minimum when ``pad``."""
    out = header.encode() + bytes(arg)
    if pad and len(out) < MIN_FRAME:
        out += bytes(MIN_FRAME - len(out))
    return out


def max_sectors(mtu: int) -> int:
    """Sectors one ATA request or reply can carry within ``mtu`` (AoE + ATA headers: 22 bytes)."""
    return max(0, min(255, (mtu - AOE_HEADER - ATA_ARG) // SECTOR))
