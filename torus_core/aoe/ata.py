"""The ATA device an AoE target emulates over a torus block volume.

:class:`AtaDevice` runs one Issue ATA Command argument against a :class:`Device` (a
:class:`~torus_core.block.volume.BlockVolume` fits) and returns an :class:`AtaResult`: the ATA
status/error registers, sector count and LBA of the reply, the data read, or an AoE-level error.

Commands (everything else is aborted: status ``DRDY|ERR``, error ``ABRT``):

================================  =====  ==================================================
IDENTIFY DEVICE                   ECh    one sector; LBA28 + LBA48 capacities, model/serial/firmware
READ SECTORS / READ SECTORS EXT   20h/24h  LBA28 / LBA48 (the command decides, like vblade)
WRITE SECTORS / WRITE SECTORS EXT 30h/34h  into the volume's write-back cache
FLUSH CACHE / FLUSH CACHE EXT     E7h/EAh  ``Device.sync()``: blocks, INode and fenced commit durable
DATA SET MANAGEMENT (TRIM)        06h    LBA range entries in the data; whole blocks become holes
CHECK POWER MODE                  E5h    always "active or idle" (FFh)
================================  =====  ==================================================

Errors: an LBA range past the end aborts (``ABRT``, the ATA8-ACS choice when ``IDNF`` is not
used); a sector count larger than the frame allows, a write with too little data or an IDENTIFY
asking for other than one sector is the AoE error *bad argument*; a volume whose lock was lost or
that was closed is the AoE error *device unavailable*; a failing read, write, trim or flush is
aborted (a failing flush also sets ``DF``).

IDENTIFY advertises only what is implemented: LBA, 48-bit addressing, a volatile write cache with
FLUSH CACHE (EXT), DATA SET MANAGEMENT with TRIM and deterministic zeroes after TRIM (a trimmed
range reads back as zeros: holes, zeroed edges). It claims no DMA, SMART, security or NCQ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from torus_core import __version__
from torus_core.aoe import wire
from torus_core.errors import Closed, Locked, TorusError

log = logging.getLogger(__name__)

# ATA commands
ATA_DSM = 0x06
ATA_READ = 0x20
ATA_READ_EXT = 0x24
ATA_WRITE = 0x30
ATA_WRITE_EXT = 0x34
ATA_CHECK_POWER = 0xE5
ATA_FLUSH = 0xE7
ATA_FLUSH_EXT = 0xEA
ATA_IDENTIFY = 0xEC

# status register bits
ST_ERR = 0x01
ST_DRQ = 0x08
ST_DF = 0x20
ST_DRDY = 0x40
ST_BSY = 0x80

# error register bits
ER_ABRT = 0x04
ER_IDNF = 0x10
ER_UNC = 0x40

#: Largest LBA28 capacity (IDENTIFY words 60-61 saturate here).
MAX_LBA28 = 0x0FFF_FFFF
MAX_LBA48 = 0xFFFF_FFFF_FFFF

Data = bytes | bytearray | memoryview


class Device(Protocol):
    """What the ATA emulation needs from a volume (:class:`BlockVolume` provides it)."""

    @property
    def size(self) -> int:
        """Bytes."""

    @property
    def read_only(self) -> bool:
        """True when writes must be refused."""

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``."""

    def write_at(self, offset: int, data: Data) -> int:
        """Write ``data`` at ``offset``."""

    def trim(self, offset: int, length: int) -> None:
        """Discard a range (reads back as zeros)."""

    def sync(self) -> object:
        """Make every completed write durable."""


@dataclass
class AtaResult:
    """The registers and data of an ATA reply, or an AoE error (``aoe_error``) instead."""

    status: int = ST_DRDY
    error: int = 0
    count: int = 0
    lba: int = 0
    data: bytes = b""
    aoe_error: int | None = None

    @property
    def failed(self) -> bool:
        """ERR is set in the status register."""
        return bool(self.status & ST_ERR)


def _abort(lba: int = 0, count: int = 0, status: int = ST_DRDY | ST_ERR) -> AtaResult:
    return AtaResult(status=status, error=ER_ABRT, count=count, lba=lba)


def _aoe(code: int) -> AtaResult:
    return AtaResult(status=0, aoe_error=code)


def ata_string(text: str, nbytes: int) -> bytes:
    """An IDENTIFY string field: ASCII, space padded, two characters per word swapped."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes, b" ")
    out = bytearray(nbytes)
    out[0::2] = raw[1::2]
    out[1::2] = raw[0::2]
    return bytes(out)


def read_ata_string(raw: bytes) -> str:
    """Inverse of :func:`ata_string` (trailing spaces stripped)."""
    out = bytearray(len(raw))
    out[0::2] = raw[1::2]
    out[1::2] = raw[0::2]
    return out.decode("ascii", "replace").rstrip()


def identify_words(ident: bytes) -> list[int]:
    """IDENTIFY data (512 bytes) → 256 little-endian words."""
    return [int.from_bytes(ident[2 * i : 2 * i + 2], "little") for i in range(256)]


class AtaDevice:
    """ATA command emulation over a :class:`Device` (see the module docstring for the commands)."""

    def __init__(
        self,
        device: Device,
        *,
        model: str = "torus AoE",
        serial: str = "0",
        firmware: str | None = None,
        physical_block: int = 512,
    ) -> None:
        self.device = device
        self.model = model
        self.serial = serial
        self.firmware = firmware or f"T{__version__}"
        self.physical_block = physical_block

    @property
    def sectors(self) -> int:
        """Capacity in 512-byte sectors (a partial last sector is not exposed)."""
        return min(self.device.size // wire.SECTOR, MAX_LBA48)

    # --- IDENTIFY ---------------------------------------------------------------------------

    def identify(self, max_sectors: int = 2) -> bytes:
        """The 512-byte IDENTIFY DEVICE data (with the integrity word)."""
        total = self.sectors
        w = [0] * 256
        heads, spt = 16, 63
        cyl = min(total // (heads * spt), 16383)
        w[1], w[3], w[6] = cyl, heads, spt  # legacy CHS geometry some initiators still read
        w[47] = 0x8000  # READ/WRITE MULTIPLE not supported (no sectors per DRQ block)
        w[49] = 0x0200  # LBA supported; no DMA
        w[50] = 0x4000
        w[53] = 0x0001  # words 54-58 valid
        w[54], w[55], w[56] = cyl, heads, spt
        chs = cyl * heads * spt
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        lba28 = min(total, MAX_LBA28)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        w[69] = (1 << 14) | (1 << 5)  # deterministic read after TRIM, and it reads zeros
        w[80] = 0x01F0  # ATA/ATAPI-4 .. ATA8-ACS
        w[82] = 1 << 5  # volatile write cache supported
        w[83] = 0x4000 | (1 << 13) | (1 << 12) | (1 << 10)  # FLUSH CACHE EXT, FLUSH CACHE, LBA48
        w[84] = 0x4000
        w[85] = 1 << 5  # write cache enabled
        w[86] = (1 << 13) | (1 << 12) | (1 << 10)
        w[87] = 0x4000
        for i in range(4):
            w[100 + i] = (total >> (16 * i)) & 0xFFFF
        w[105] = max(1, max_sectors)  # 512-byte blocks of DSM range entries per command
        exp = (self.physical_block // wire.SECTOR).bit_length() - 1
        if self.physical_block > wire.SECTOR and 1 << exp == self.physical_block // wire.SECTOR and exp <= 15:
            w[106] = 0x4000 | 0x2000 | exp  # several logical sectors per physical (torus block)
        else:
            w[106] = 0x4000
        w[169] = 1  # DATA SET MANAGEMENT: TRIM supported
        out = bytearray(b"".join(v.to_bytes(2, "little") for v in w))
        out[20:40] = ata_string(self.serial, 20)
        out[46:54] = ata_string(self.firmware, 8)
        out[54:94] = ata_string(self.model, 40)
        out[510] = 0xA5
        out[511] = (-sum(out[:511])) & 0xFF
        return bytes(out)

    # --- dispatch ---------------------------------------------------------------------------

    def execute(self, arg: wire.AtaArg, max_sectors: int) -> AtaResult:
        """Run one ATA command; ``max_sectors`` is what a frame on this interface can carry."""
        cmd = arg.command
        try:
            if cmd == ATA_IDENTIFY:
                if arg.count != 1 or max_sectors < 1:
                    return _aoe(wire.ERR_BAD_ARG)
                if arg.write:
                    return _abort()
                return AtaResult(data=self.identify(max_sectors))
            if cmd == ATA_CHECK_POWER:
                return AtaResult(count=0xFF)
            if cmd in (ATA_FLUSH, ATA_FLUSH_EXT):
                return self._flush()
            if cmd in (ATA_READ, ATA_READ_EXT, ATA_WRITE, ATA_WRITE_EXT):
                return self._read_write(arg, max_sectors)
            if cmd == ATA_DSM:
                return self._dsm(arg, max_sectors)
        except (Locked, Closed) as exc:
            log.warning("AoE: volume unavailable: %s", exc)
            return _aoe(wire.ERR_DEVICE_UNAVAILABLE)
        return _abort()

    def _flush(self) -> AtaResult:
        try:
            self.device.sync()
        except (Locked, Closed):
            raise
        except TorusError as exc:
            log.error("AoE FLUSH CACHE failed: %s", exc)
            return _abort(status=ST_DRDY | ST_DF | ST_ERR)
        return AtaResult()

    def _read_write(self, arg: wire.AtaArg, max_sectors: int) -> AtaResult:
        write = arg.command in (ATA_WRITE, ATA_WRITE_EXT)
        lba = arg.lba if arg.command in (ATA_READ_EXT, ATA_WRITE_EXT) else arg.lba & MAX_LBA28
        count = arg.count
        if count == 0 or count > max_sectors:
            # 0 means 256 (or 65536) sectors in ATA: more than any AoE frame carries
            return _aoe(wire.ERR_BAD_ARG)
        nbytes = count * wire.SECTOR
        if write and len(arg.data) < nbytes:
            return _aoe(wire.ERR_BAD_ARG)
        if write != arg.write:
            return _abort(lba, count)  # data direction contradicts the command
        if lba + count > self.sectors:
            return _abort(lba, count)
        offset = lba * wire.SECTOR
        if write:
            if self.device.read_only:
                return _abort(lba, count)
            try:
                self.device.write_at(offset, memoryview(arg.data)[:nbytes])
            except (Locked, Closed):
                raise
            except TorusError as exc:
                log.error("AoE write of %d sectors at LBA %d failed: %s", count, lba, exc)
                return _abort(lba, count)
            return AtaResult(lba=lba)
        try:
            data = self.device.read_at(offset, nbytes)
        except (Locked, Closed):
            raise
        except TorusError as exc:
            log.error("AoE read of %d sectors at LBA %d failed: %s", count, lba, exc)
            return AtaResult(status=ST_DRDY | ST_ERR, error=ER_UNC | ER_ABRT, count=count, lba=lba)
        if len(data) < nbytes:
            data += bytes(nbytes - len(data))
        return AtaResult(lba=lba, data=data)

    def _dsm(self, arg: wire.AtaArg, max_sectors: int) -> AtaResult:
        if not arg.feature & 0x01:
            return _abort()  # only the TRIM function is implemented
        count = arg.count
        if count == 0 or count > max_sectors:
            return _aoe(wire.ERR_BAD_ARG)
        nbytes = count * wire.SECTOR
        if len(arg.data) < nbytes:
            return _aoe(wire.ERR_BAD_ARG)
        if not arg.write or self.device.read_only:
            return _abort()
        total = self.sectors
        ranges: list[tuple[int, int]] = []
        raw = bytes(memoryview(arg.data)[:nbytes])
        for i in range(0, nbytes, 8):
            entry = int.from_bytes(raw[i : i + 8], "little")
            start, length = entry & MAX_LBA48, entry >> 48
            if length == 0:
                continue
            if start + length > total:
                return _abort(start)
            ranges.append((start, length))
        try:
            for start, length in ranges:
                self.device.trim(start * wire.SECTOR, length * wire.SECTOR)
        except (Locked, Closed):
            raise
        except TorusError as exc:
            log.error("AoE TRIM failed: %s", exc)
            return _abort()
        return AtaResult()
