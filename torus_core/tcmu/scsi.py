"""A SCSI block device (SBC-3/SPC-4 subset) served from an :class:`~torus_core.nbd.export.Export`.

:class:`ScsiDisk` decodes one CDB, calls the export (the same device interface the NBD and AoE
front-ends use: ``read``, ``write(fua)``, ``flush``, ``write_zeroes``) and returns a
:class:`ScsiResult`: a status byte, fixed-format sense data and the data-in bytes. It knows
nothing about TCMU or the kernel, so it is tested on the host against an in-memory export.

Commands: INQUIRY (standard, VPD 0x00, 0x80, 0x83, 0xb0, 0xb2), TEST UNIT READY, REPORT LUNS,
READ CAPACITY (10) and (16), READ/WRITE (6/10/12/16) with FUA, SYNCHRONIZE CACHE (10/16), UNMAP,
WRITE SAME (16) with UNMAP, MODE SENSE (6/10) with the caching and control pages. Anything else
is CHECK CONDITION, ILLEGAL REQUEST, "invalid command operation code" (ASC 0x20). A failure of
the export is mapped to sense data by :func:`sense_for_error`, never raised to the caller.

Discards: UNMAP and WRITE SAME with UNMAP call ``write_zeroes(may_trim=True)``, so an unmapped
block reads back as zeroes, which is what LBPRZ=1 in READ CAPACITY (16) and VPD 0xb2 promises.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from torus_core.errors import InvalidArgument, Locked, OutOfSpace, TorusError
from torus_core.nbd.export import Buffer, Export

log = logging.getLogger(__name__)

# --- status, sense keys, additional sense codes --------------------------------------------

GOOD = 0x00
CHECK_CONDITION = 0x02

NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB

#: (ASC, ASCQ) pairs used here
ASC_PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
ASC_INVALID_OPCODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SPACE_ALLOCATION_FAILED = (0x27, 0x07)
ASC_SAVING_NOT_SUPPORTED = (0x39, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_NO_ADDITIONAL_SENSE = (0x00, 0x00)

#: Size of the sense buffer TCMU gives a handler.
SENSE_BUFFER_SIZE = 96

# --- opcodes ---------------------------------------------------------------------------------

TEST_UNIT_READY = 0x00
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
SYNCHRONIZE_CACHE_10 = 0x35
UNMAP = 0x42
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
READ_12 = 0xA8
WRITE_12 = 0xAA

SAI_READ_CAPACITY_16 = 0x10

#: FUA bit in byte 1 of READ/WRITE (10/12/16)
FUA = 0x08

#: Mode pages served
PAGE_CACHING = 0x08
PAGE_CONTROL = 0x0A
PAGE_ALL = 0x3F

#: VPD pages served, in the order VPD 0x00 lists them
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB2)


def cdb_length(opcode: int) -> int:
    """CDB length from the opcode's group code (SPC-4 4.2.5.1); 16 for vendor groups."""
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(opcode >> 5, 16)


def fixed_sense(key: int, asc: int, ascq: int, information: int | None = None) -> bytes:
    """18 bytes of fixed-format (0x70, current error) sense data."""
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key & 0x0F
    if information is not None:
        sense[0] |= 0x80  # VALID: the INFORMATION field holds the first bad LBA
        struct.pack_into(">I", sense, 3, information & 0xFFFFFFFF)
    sense[7] = 10
    sense[12] = asc
    sense[13] = ascq
    return bytes(sense)


@dataclass
class ScsiResult:
    """Outcome of one command: SCSI status, sense bytes (CHECK CONDITION only), data-in."""

    status: int = GOOD
    sense: bytes = b""
    data: bytes = b""

    @property
    def ok(self) -> bool:
        """True for GOOD."""
        return self.status == GOOD


class SenseError(TorusError):
    """A command failed with the given sense key and additional sense code."""

    def __init__(self, key: int, asc_ascq: tuple[int, int], message: str = "") -> None:
        super().__init__(message or f"sense key {key:#x} asc {asc_ascq[0]:#04x}/{asc_ascq[1]:#04x}")
        self.key = key
        self.asc, self.ascq = asc_ascq

    def result(self) -> ScsiResult:
        """The CHECK CONDITION result carrying this error's sense data."""
        return ScsiResult(CHECK_CONDITION, fixed_sense(self.key, self.asc, self.ascq))


def sense_for_error(exc: TorusError, *, writing: bool) -> SenseError:
    """Map an error from the export to sense data.

    OutOfSpace → DATA PROTECT "space allocation failed write protect" (thin provisioning);
    Locked (the volume's lock was lost) → DATA PROTECT "write protected"; a retryable error
    (metadata or peer briefly unreachable) → ABORTED COMMAND, which the initiator retries;
    anything else → MEDIUM ERROR, write error or unrecovered read error.
    """
    if isinstance(exc, SenseError):
        return exc
    if isinstance(exc, OutOfSpace):
        return SenseError(DATA_PROTECT, ASC_SPACE_ALLOCATION_FAILED, str(exc))
    if isinstance(exc, Locked):
        return SenseError(DATA_PROTECT, ASC_WRITE_PROTECTED, str(exc))
    if exc.retryable:
        return SenseError(ABORTED_COMMAND, ASC_NO_ADDITIONAL_SENSE, str(exc))
    return SenseError(MEDIUM_ERROR, ASC_WRITE_ERROR if writing else ASC_UNRECOVERED_READ_ERROR, str(exc))


def _illegal(asc_ascq: tuple[int, int] = ASC_INVALID_FIELD_IN_CDB, why: str = "") -> SenseError:
    return SenseError(ILLEGAL_REQUEST, asc_ascq, why)


def _pad(text: str, n: int) -> bytes:
    return text.encode("ascii", "replace")[:n].ljust(n, b" ")


@dataclass
class DiskIdentity:
    """What INQUIRY reports: T10 vendor/product/revision, unit serial and NAA identifier."""

    name: str
    vendor: str = "CoreOS"
    product: str = "TorusBlk"
    revision: str = "0001"
    serial: str = ""
    #: NAA IEEE Registered Extended (6) designator, 16 bytes: 4 bits NAA, 24 bits OUI (000000),
    #: 100 bits derived from the name
    naa: bytes = field(default=b"")

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.name.encode()).digest()
        if not self.serial:
            self.serial = digest[:8].hex()
        if not self.naa:
            ident = int.from_bytes(digest[8:21], "big") >> 4  # 100 bits
            self.naa = ((0x6 << 124) | ident).to_bytes(16, "big")

    @property
    def wwid(self) -> str:
        """The id Linux shows in ``/sys/block/sdX/device/wwid`` (``naa.`` + hex)."""
        return "naa." + self.naa.hex()


class ScsiDisk:
    """One logical unit (LUN 0) backed by ``export``, with ``block_size``-byte logical blocks.

    ``max_transfer_blocks`` is reported in the block limits VPD page (and should match the
    kernel's ``hw_max_sectors``); ``max_unmap_blocks`` bounds one UNMAP descriptor and one WRITE
    SAME. Not thread safe: the TCMU handler calls :meth:`execute` from one thread.

    ``write_cache`` chooses what the caching mode page promises. True (WCE=1): a completed
    write may sit in the export's write-back buffer until SYNCHRONIZE CACHE or FUA. False
    (WCE=0, write-through): the front-end calls :meth:`commit` before it completes a write,
    so no completed write is ever only in this process's memory; the TCMU handler needs this
    because the kernel keeps the disk (and its filesystem) across a handler restart and would
    otherwise never learn that the killed handler's buffered writes are gone.
    """

    def __init__(
        self,
        export: Export,
        *,
        block_size: int = 4096,
        identity: DiskIdentity | None = None,
        max_transfer_blocks: int = 1024,
        max_unmap_blocks: int = 1 << 18,
        max_unmap_descriptors: int = 64,
        optimal_blocks: int | None = None,
        write_cache: bool = True,
    ) -> None:
        if block_size < 512 or block_size & (block_size - 1):
            raise InvalidArgument(f"SCSI block size must be a power of two >= 512, got {block_size}")
        if export.size % block_size:
            raise InvalidArgument(
                f"volume size {export.size} is not a multiple of the SCSI block size {block_size}"
            )
        self.export = export
        self.block_size = block_size
        self.identity = identity or DiskIdentity(export.name)
        self.max_transfer_blocks = max_transfer_blocks
        self.max_unmap_blocks = max_unmap_blocks
        self.max_unmap_descriptors = max_unmap_descriptors
        pref = export.preferred_block_size // block_size
        self.optimal_blocks = optimal_blocks if optimal_blocks is not None else max(pref, 1)
        self.write_cache = write_cache
        #: a data-changing command completed in the export since its last flush
        self.unflushed = False

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks."""
        return self.export.size // self.block_size

    # --- entry point ----------------------------------------------------------------------

    def execute(self, cdb: bytes, data_out: Sequence[Buffer] = ()) -> ScsiResult:
        """Run one command. ``data_out`` holds the data-out buffers (writes, UNMAP lists).

        Never raises for a bad CDB or a failing export: the result carries the sense data.
        """
        if not cdb:
            return _illegal(ASC_INVALID_OPCODE, "empty CDB").result()
        op = cdb[0]
        handler = self._handlers.get(op)
        if handler is None or len(cdb) < cdb_length(op):
            log.debug("unsupported SCSI opcode %#04x", op)
            return _illegal(ASC_INVALID_OPCODE, f"opcode {op:#04x}").result()
        try:
            return handler(self, cdb, data_out)
        except SenseError as exc:
            return exc.result()
        except TorusError as exc:
            writing = op not in _READS
            log.warning("SCSI opcode %#04x failed: %s", op, exc)
            return sense_for_error(exc, writing=writing).result()

    def commit(self) -> ScsiResult | None:
        """Flush the export if a command changed data since the last flush (the write-through
        barrier of :meth:`~torus_core.tcmu.ring.CommandRing.process`). None when everything is
        durable; else the error result the uncommitted writes must complete with."""
        if not self.unflushed:
            return None
        try:
            self.export.flush()
        except TorusError as exc:
            log.warning("flush before completing writes failed: %s", str(exc))  # no traceback kept
            return sense_for_error(exc, writing=True).result()
        self.unflushed = False
        return None

    # --- helpers ----------------------------------------------------------------------------

    def _check_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.num_blocks or lba < 0:
            raise _illegal(ASC_LBA_OUT_OF_RANGE, f"LBA {lba}+{blocks} beyond {self.num_blocks}")

    def _check_writable(self) -> None:
        if self.export.read_only:
            raise SenseError(DATA_PROTECT, ASC_WRITE_PROTECTED, "read-only volume")

    @staticmethod
    def _gather(data_out: Sequence[Buffer], length: int) -> bytes:
        out = b"".join(bytes(b) for b in data_out)
        if len(out) < length:
            raise _illegal(ASC_INVALID_FIELD_IN_CDB, f"data-out has {len(out)} bytes, need {length}")
        return out[:length]

    # --- non-data commands ------------------------------------------------------------------

    def _test_unit_ready(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        return ScsiResult()

    def _report_luns(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        (alloc,) = struct.unpack_from(">I", cdb, 6)
        if alloc < 16:
            raise _illegal()
        return ScsiResult(data=(struct.pack(">II", 8, 0) + bytes(8))[:alloc])

    def _inquiry(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        evpd, page = cdb[1] & 0x01, cdb[2]
        (alloc,) = struct.unpack_from(">H", cdb, 3)
        if not evpd:
            if page:
                raise _illegal()
            ident = self.identity
            std = bytearray(36)
            std[0] = 0x00  # peripheral qualifier 0, direct-access block device
            std[2] = 0x06  # SPC-4
            std[3] = 0x02  # response data format 2
            std[4] = len(std) - 5
            std[7] = 0x02  # CMDQUE
            std[8:16] = _pad(ident.vendor, 8)
            std[16:32] = _pad(ident.product, 16)
            std[32:36] = _pad(ident.revision, 4)
            return ScsiResult(data=bytes(std[:alloc]))
        body = self._vpd(page)
        return ScsiResult(data=(bytes([0x00, page]) + struct.pack(">H", len(body)) + body)[:alloc])

    def _vpd(self, page: int) -> bytes:
        ident = self.identity
        if page == 0x00:
            return bytes(VPD_PAGES)
        if page == 0x80:
            return ident.serial.encode("ascii", "replace")
        if page == 0x83:
            naa = bytes([0x01, 0x03, 0x00, len(ident.naa)]) + ident.naa
            t10 = _pad(ident.vendor, 8) + f"torus:{ident.name}".encode("utf-8", "replace")[:240]
            return naa + bytes([0x02, 0x01, 0x00, len(t10)]) + t10
        if page == 0xB0:
            limits = bytearray(60)
            limits[0] = 0x01  # WSNZ: WRITE SAME with 0 blocks is an error, not "to the end"
            # optimal transfer length granularity: one physical (volume) block
            struct.pack_into(">H", limits, 2, min(self.optimal_blocks, 0xFFFF))
            struct.pack_into(">I", limits, 4, self.max_transfer_blocks)
            struct.pack_into(">I", limits, 8, min(self.optimal_blocks, self.max_transfer_blocks))
            struct.pack_into(">I", limits, 16, self.max_unmap_blocks)
            struct.pack_into(">I", limits, 20, self.max_unmap_descriptors)
            struct.pack_into(">I", limits, 24, self.optimal_blocks)  # optimal unmap granularity
            struct.pack_into(">Q", limits, 32, self.max_unmap_blocks)  # max WRITE SAME length
            return bytes(limits)
        if page == 0xB2:
            # LBPU (UNMAP) | LBPWS (WRITE SAME 16 with UNMAP) | LBPRZ=1; thin provisioned
            return bytes([0x00, 0x80 | 0x40 | 0x04, 0x02, 0x00])
        raise _illegal(ASC_INVALID_FIELD_IN_CDB, f"VPD page {page:#04x}")

    def _read_capacity_10(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        last = min(self.num_blocks - 1, 0xFFFFFFFF)
        return ScsiResult(data=struct.pack(">II", last, self.block_size))

    def _service_action_in(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
            raise _illegal(ASC_INVALID_OPCODE, f"SERVICE ACTION IN(16) action {cdb[1] & 0x1F:#x}")
        (alloc,) = struct.unpack_from(">I", cdb, 10)
        per_phys = max(self.optimal_blocks, 1).bit_length() - 1
        body = bytearray(32)
        struct.pack_into(">QI", body, 0, self.num_blocks - 1, self.block_size)
        body[13] = per_phys & 0x0F
        body[14] = 0x80 | 0x40  # LBPME (thin provisioning) | LBPRZ (unmapped reads zero)
        return ScsiResult(data=bytes(body[:alloc]))

    def _mode_sense(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        ten = cdb[0] == MODE_SENSE_10
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
        if pc == 3:
            raise _illegal(ASC_SAVING_NOT_SUPPORTED, "saved mode pages")
        if subpage not in (0x00, 0xFF) or (subpage == 0xFF and page != PAGE_ALL):
            raise _illegal()
        pages = {PAGE_CACHING: self._caching_page(pc == 1), PAGE_CONTROL: self._control_page(pc == 1)}
        if page == PAGE_ALL:
            body = b"".join(pages[p] for p in sorted(pages))
        elif page in pages:
            body = pages[page]
        else:
            raise _illegal(ASC_INVALID_FIELD_IN_CDB, f"mode page {page:#04x}")
        blocks = b""
        if not dbd:
            if llbaa:
                blocks = struct.pack(">QII", self.num_blocks, 0, self.block_size)
            else:
                blocks = struct.pack(">I", min(self.num_blocks, 0xFFFFFFFF)) + struct.pack(
                    ">I", self.block_size
                )
        # device-specific parameter: WP for read-only, DPOFUA (FUA honoured)
        dsp = (0x80 if self.export.read_only else 0x00) | 0x10
        if ten:
            header = struct.pack(
                ">HBBBBH", 6 + len(blocks) + len(body), 0, dsp, 0x01 if llbaa else 0, 0, len(blocks)
            )
        else:
            header = bytes([3 + len(blocks) + len(body), 0, dsp, len(blocks)])
        return ScsiResult(data=(header + blocks + body)[:alloc])

    def _caching_page(self, changeable: bool) -> bytes:
        page = bytearray(20)
        page[0], page[1] = PAGE_CACHING, 18
        if not changeable and self.write_cache:
            page[2] = 0x04  # WCE: writes are cached until SYNCHRONIZE CACHE or FUA
        return bytes(page)

    @staticmethod
    def _control_page(changeable: bool) -> bytes:
        page = bytearray(12)
        page[0], page[1] = PAGE_CONTROL, 10
        if not changeable:
            page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering allowed
            struct.pack_into(">H", page, 10, 0xFFFF)  # extended self-test time: n/a
        return bytes(page)

    # --- data commands ----------------------------------------------------------------------

    @staticmethod
    def _decode_rw(cdb: bytes) -> tuple[int, int, bool]:
        op = cdb[0]
        if op in (READ_6, WRITE_6):
            lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
            return lba, cdb[4] or 256, False
        fua = bool(cdb[1] & FUA)
        if op in (READ_10, WRITE_10):
            lba, n = struct.unpack_from(">IxH", cdb, 2)
        elif op in (READ_12, WRITE_12):
            lba, n = struct.unpack_from(">II", cdb, 2)
        else:
            lba, n = struct.unpack_from(">QI", cdb, 2)
        return lba, n, fua

    def _read(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        lba, n, _fua = self._decode_rw(cdb)  # reads are always from the volume: FUA is moot
        self._check_range(lba, n)
        if n == 0:
            return ScsiResult()
        return ScsiResult(data=bytes(self.export.read(lba * self.block_size, n * self.block_size)))

    def _write(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        lba, n, fua = self._decode_rw(cdb)
        self._check_range(lba, n)
        self._check_writable()
        if n == 0:
            return ScsiResult()
        length = n * self.block_size
        offset = lba * self.block_size
        self.unflushed = True
        if len(data_out) == 1 and len(data_out[0]) >= length:
            self.export.write(offset, memoryview(data_out[0])[:length], fua)
        else:
            self.export.write(offset, self._gather(data_out, length), fua)
        return ScsiResult()

    def _synchronize_cache(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        if cdb[0] == SYNCHRONIZE_CACHE_10:
            lba, n = struct.unpack_from(">IxH", cdb, 2)
        else:
            lba, n = struct.unpack_from(">QI", cdb, 2)
        self._check_range(lba, n)
        self.export.flush()  # the whole volume: cheaper than tracking ranges, and a superset
        self.unflushed = False
        return ScsiResult()

    def _unmap(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        self._check_writable()
        if cdb[1] & 0x01:
            raise _illegal(ASC_INVALID_FIELD_IN_CDB, "UNMAP ANCHOR")
        (plen,) = struct.unpack_from(">H", cdb, 7)
        if plen == 0:
            return ScsiResult()
        if plen < 8:
            raise _illegal(ASC_PARAMETER_LIST_LENGTH_ERROR, f"UNMAP parameter list of {plen} bytes")
        params = self._gather(data_out, plen)
        (dlen,) = struct.unpack_from(">H", params, 2)
        dlen = min(dlen, plen - 8) // 16
        if dlen > self.max_unmap_descriptors:
            raise _illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"{dlen} UNMAP descriptors")
        ranges = []
        for i in range(dlen):
            lba, n = struct.unpack_from(">QI", params, 8 + 16 * i)
            if n > self.max_unmap_blocks:
                raise _illegal(ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"UNMAP of {n} blocks")
            self._check_range(lba, n)
            ranges.append((lba, n))
        self.unflushed = True
        for lba, n in ranges:
            if n:
                self.export.write_zeroes(lba * self.block_size, n * self.block_size, True)
        return ScsiResult()

    def _write_same_16(self, cdb: bytes, data_out: Sequence[Buffer]) -> ScsiResult:
        flags = cdb[1]
        unmap, anchor, ndob = bool(flags & 0x08), bool(flags & 0x10), bool(flags & 0x01)
        lba, n = struct.unpack_from(">QI", cdb, 2)
        if anchor or n == 0 or n > self.max_unmap_blocks:
            raise _illegal(ASC_INVALID_FIELD_IN_CDB, f"WRITE SAME of {n} blocks")
        self._check_range(lba, n)
        self._check_writable()
        block = bytes(self.block_size) if ndob else self._gather(data_out, self.block_size)
        offset, length = lba * self.block_size, n * self.block_size
        self.unflushed = True
        if not block.strip(b"\0"):
            self.export.write_zeroes(offset, length, unmap)
            return ScsiResult()
        if unmap:
            raise _illegal(ASC_INVALID_FIELD_IN_CDB, "WRITE SAME with UNMAP of non-zero data")
        chunk_blocks = max(1, (1 << 20) // self.block_size)
        done = 0
        while done < n:
            k = min(chunk_blocks, n - done)
            self.export.write(offset + done * self.block_size, block * k, False)
            done += k
        return ScsiResult()

    _handlers = {
        TEST_UNIT_READY: _test_unit_ready,
        INQUIRY: _inquiry,
        REPORT_LUNS: _report_luns,
        READ_CAPACITY_10: _read_capacity_10,
        SERVICE_ACTION_IN_16: _service_action_in,
        MODE_SENSE_6: _mode_sense,
        MODE_SENSE_10: _mode_sense,
        READ_6: _read,
        READ_10: _read,
        READ_12: _read,
        READ_16: _read,
        WRITE_6: _write,
        WRITE_10: _write,
        WRITE_12: _write,
        WRITE_16: _write,
        SYNCHRONIZE_CACHE_10: _synchronize_cache,
        SYNCHRONIZE_CACHE_16: _synchronize_cache,
        UNMAP: _unmap,
        WRITE_SAME_16: _write_same_16,
    }


#: Opcodes that change the volume's data (what a write-through commit covers).
_CHANGES_DATA = frozenset({WRITE_6, WRITE_10, WRITE_12, WRITE_16, UNMAP, WRITE_SAME_16})


def changes_data(cdb: bytes) -> bool:
    """True if the command may change the volume's data (a write, UNMAP or WRITE SAME)."""
    return bool(cdb) and cdb[0] in _CHANGES_DATA


#: Opcodes whose failures are read errors (the rest report write errors).
_READS = frozenset({READ_6, READ_10, READ_12, READ_16, INQUIRY, MODE_SENSE_6, MODE_SENSE_10})
