# mypy: allow-untyped-defs
"""The SCSI command set of ``torusblk tcmu`` (torus_core.tcmu.scsi) against an in-memory export.

Responses are decoded by sg3_utils (``sg_inq``/``sg_vpd --inhex``, ``sg_decode_sense``), an
independent implementation of the same standards, wherever it has an offline decoder; the rest
is checked field by field against SBC-3/SPC-4.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torus_core.errors import Again, OutOfSpace, TorusError
from torus_core.nbd.constants import STATE_HOLE
from torus_core.nbd.export import Buffer
from torus_core.nbd.memory import MemoryExport, MemoryStore
from torus_core.tcmu import scsi
from torus_core.tcmu.scsi import CHECK_CONDITION, GOOD, ScsiDisk

MiB = 1 << 20
BS = 4096


class RecordingExport(MemoryExport):
    """A memory export that records FUA writes and flushes, and can be told to fail."""

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        super().__init__("vol1", MemoryStore(size), read_only=read_only)
        self.calls: list[tuple[str, int, int, bool]] = []
        self.fail: TorusError | None = None

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    def read(self, offset: int, length: int) -> memoryview:
        self._maybe_fail()
        return super().read(offset, length)

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        self._maybe_fail()
        self.calls.append(("write", offset, len(data), fua))
        super().write(offset, data, fua)

    def flush(self) -> None:
        self._maybe_fail()
        self.calls.append(("flush", 0, 0, False))

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self._maybe_fail()
        self.calls.append(("zero", offset, length, may_trim))
        super().write_zeroes(offset, length, may_trim)


@pytest.fixture
def export() -> RecordingExport:
    return RecordingExport(64 * MiB)


@pytest.fixture
def disk(export: RecordingExport) -> ScsiDisk:
    return ScsiDisk(export, block_size=BS)


def _sg(tool: str, *args: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.fail(f"{tool} is missing: install Debian's sg3-utils (scripts/bootstrap.sh does)")
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20, check=False)
    return out.stdout + out.stderr


def _hexfile(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "resp.hex"
    path.write_text(" ".join(f"{b:02x}" for b in data) + "\n")
    return str(path)


def decode_sense(tmp_path: Path, sense: bytes) -> str:
    return _sg("sg_decode_sense", "-f", _hexfile(tmp_path, sense))


def cdb16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def cdb10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def cdb12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba, blocks, 0, 0)


def cdb6(op: int, lba: int, blocks: int) -> bytes:
    return bytes([op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0])


def inquiry(page: int | None = None, alloc: int = 255) -> bytes:
    return bytes([scsi.INQUIRY, 0 if page is None else 1, page or 0]) + struct.pack(">HB", alloc, 0)


def sense_of(result: scsi.ScsiResult) -> tuple[int, int, int]:
    assert result.status == CHECK_CONDITION
    assert result.sense[0] & 0x7F == 0x70
    return result.sense[2] & 0x0F, result.sense[12], result.sense[13]


# --- INQUIRY -----------------------------------------------------------------------------------


def test_standard_inquiry_decodes_as_a_spc4_disk_from_coreos(disk: ScsiDisk, tmp_path: Path) -> None:
    res = disk.execute(inquiry())
    assert res.status == GOOD and len(res.data) == 36
    out = _sg("sg_inq", f"--inhex={_hexfile(tmp_path, res.data)}")
    assert "PDT=0" in out and "[SPC-4]" in out and "CmdQue=1" in out
    assert "Vendor identification: CoreOS" in out
    assert "Product identification: TorusBlk" in out
    assert "Product revision level: 0001" in out


def test_inquiry_is_cut_to_the_allocation_length(disk: ScsiDisk) -> None:
    assert disk.execute(inquiry(alloc=5)).data == disk.execute(inquiry()).data[:5]
    assert disk.execute(inquiry(0x83, alloc=4)).data[:2] == b"\x00\x83"


@pytest.mark.parametrize(
    ("page", "expect"),
    [
        (
            0x00,
            [
                "Supported VPD pages [sv]",
                "Unit serial number [sn]",
                "Device identification [di]",
                "Block limits (SBC) [bl]",
                "Logical block provisioning (SBC) [lbpv]",
            ],
        ),
        (0x80, ["Unit serial number: "]),
        (0x83, ["designator type: NAA,  code set: Binary", "0x6000000", "vendor specific: torus:vol1"]),
        (
            0xB0,
            [
                "Write same non-zero (WSNZ): 1",
                "Maximum transfer length: 1024 blocks",
                "Maximum unmap LBA count: 262144",
                "Maximum unmap block descriptor count: 64",
                "Maximum write same length: 0x40000 blocks",
            ],
        ),
        (
            0xB2,
            [
                "Unmap command supported (LBPU): 1",
                "Write same (16) with unmap bit supported (LBPWS): 1",
                "Logical block provisioning read zeros (LBPRZ): 1",
                "Provisioning type: 2 (thin provisioned)",
            ],
        ),
    ],
)
def test_vpd_page_decodes_with_sg_vpd(disk: ScsiDisk, tmp_path: Path, page: int, expect: list[str]) -> None:
    res = disk.execute(inquiry(page))
    assert res.status == GOOD
    out = _sg("sg_vpd", f"--inhex={_hexfile(tmp_path, res.data)}")
    for line in expect:
        assert line in out, out
    assert "unexpected" not in out, out


def test_identity_is_stable_per_volume_name_and_differs_between_volumes(export: RecordingExport) -> None:
    a, b = ScsiDisk(export), ScsiDisk(export)
    c = ScsiDisk(export, identity=scsi.DiskIdentity("other"))
    assert a.identity.wwid == b.identity.wwid != c.identity.wwid
    assert a.identity.serial != c.identity.serial
    assert a.identity.wwid.startswith("naa.6000000") and len(a.identity.wwid) == 4 + 32


def test_unknown_vpd_page_and_page_without_evpd_are_invalid_field(disk: ScsiDisk) -> None:
    assert sense_of(disk.execute(inquiry(0x89))) == (scsi.ILLEGAL_REQUEST, 0x24, 0x00)
    assert sense_of(disk.execute(bytes([scsi.INQUIRY, 0, 0x80, 0, 255, 0]))) == (
        scsi.ILLEGAL_REQUEST,
        0x24,
        0,
    )


# --- unknown commands and sense data -----------------------------------------------------------


@pytest.mark.parametrize("op", [0x04, 0x15, 0x41, 0x55, 0x7F, 0x83, 0x89, 0xA3, 0xC0, 0xFF])
def test_unknown_opcode_is_check_condition_illegal_request_invalid_opcode(
    disk: ScsiDisk, tmp_path: Path, op: int
) -> None:
    res = disk.execute(bytes([op]) + bytes(15))
    assert sense_of(res) == (scsi.ILLEGAL_REQUEST, 0x20, 0x00)
    out = decode_sense(tmp_path, res.sense)
    assert "Fixed format, current" in out and "Illegal Request" in out
    assert "Invalid command operation code" in out


def test_empty_cdb_and_unknown_service_action_are_refused(disk: ScsiDisk) -> None:
    assert sense_of(disk.execute(b""))[0] == scsi.ILLEGAL_REQUEST
    assert sense_of(disk.execute(bytes([scsi.SERVICE_ACTION_IN_16, 0x12]) + bytes(14)))[1] == 0x20


@settings(max_examples=400, deadline=None)
@given(cdb=st.binary(min_size=0, max_size=16), data=st.binary(max_size=64))
def test_any_cdb_gets_a_status_never_an_exception(cdb: bytes, data: bytes) -> None:
    disk = ScsiDisk(RecordingExport(4 * MiB), block_size=512)
    res = disk.execute(cdb, [data])
    assert res.status in (GOOD, CHECK_CONDITION)
    if res.status == CHECK_CONDITION:
        assert len(res.sense) == 18 and res.sense[0] & 0x7F == 0x70


# --- capacity ----------------------------------------------------------------------------------


def test_read_capacity_10_and_16_report_the_last_lba_and_block_size(disk: ScsiDisk) -> None:
    nblocks = 64 * MiB // BS
    res = disk.execute(bytes([scsi.READ_CAPACITY_10]) + bytes(9))
    assert struct.unpack(">II", res.data) == (nblocks - 1, BS)
    res = disk.execute(bytes([scsi.SERVICE_ACTION_IN_16, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2))
    last, bs = struct.unpack_from(">QI", res.data)
    assert (last, bs) == (nblocks - 1, BS) and len(res.data) == 32
    assert res.data[14] & 0xC0 == 0xC0  # LBPME and LBPRZ


def test_read_capacity_10_saturates_beyond_2_to_the_32_blocks() -> None:
    big = RecordingExport(4 * MiB)
    big.size = 3 << 40  # only the capacity is asked for: no need for 3 TiB of memory
    d = ScsiDisk(big, block_size=512)
    assert struct.unpack(">II", d.execute(bytes([scsi.READ_CAPACITY_10]) + bytes(9)).data)[0] == 0xFFFFFFFF
    res = d.execute(bytes([scsi.SERVICE_ACTION_IN_16, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2))
    assert struct.unpack_from(">Q", res.data)[0] == (3 << 40) // 512 - 1


def test_physical_block_and_io_granularity_follow_the_volume_block_size() -> None:
    exp = RecordingExport(64 * MiB)
    exp.preferred_block_size = 64 * 1024
    d = ScsiDisk(exp, block_size=4096)
    res = d.execute(bytes([scsi.SERVICE_ACTION_IN_16, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2))
    assert res.data[13] == 4  # 2**4 logical blocks per physical block
    # Linux warns unless the minimum I/O size (granularity) is a multiple of the physical block
    limits = d.execute(inquiry(0xB0)).data
    assert struct.unpack_from(">HII", limits, 6) == (16, 1024, 16)


# --- reads and writes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rd", "wr", "make"),
    [
        (scsi.READ_6, scsi.WRITE_6, lambda op, lba, n, f=0: cdb6(op, lba, n)),
        (scsi.READ_10, scsi.WRITE_10, cdb10),
        (scsi.READ_12, scsi.WRITE_12, cdb12),
        (scsi.READ_16, scsi.WRITE_16, cdb16),
    ],
)
def test_write_then_read_round_trips_for_every_cdb_size(disk: ScsiDisk, export, rd, wr, make) -> None:
    payload = bytes(range(256)) * (3 * BS // 256)
    res = disk.execute(make(wr, 77, 3), [memoryview(payload)[:5000], memoryview(payload)[5000:]])
    assert res.status == GOOD
    assert bytes(export.store.read(77 * BS, 3 * BS)) == payload
    res = disk.execute(make(rd, 77, 3))
    assert res.status == GOOD and res.data == payload


def test_fua_write_reaches_the_export_as_fua_and_plain_write_does_not(disk: ScsiDisk, export) -> None:
    disk.execute(cdb10(scsi.WRITE_10, 1, 1, flags=scsi.FUA), [bytes(BS)])
    disk.execute(cdb16(scsi.WRITE_16, 2, 1, flags=scsi.FUA), [bytes(BS)])
    disk.execute(cdb12(scsi.WRITE_12, 3, 1), [bytes(BS)])
    assert [c[3] for c in export.calls] == [True, True, False]


def test_read_6_with_zero_length_reads_256_blocks(disk: ScsiDisk) -> None:
    assert len(disk.execute(cdb6(scsi.READ_6, 0, 0)).data) == 256 * BS


def test_zero_length_transfers_succeed_without_touching_the_volume(disk: ScsiDisk, export) -> None:
    assert disk.execute(cdb10(scsi.WRITE_10, 5, 0)).status == GOOD
    assert disk.execute(cdb16(scsi.READ_16, 5, 0)).data == b""
    assert export.calls == []


@pytest.mark.parametrize(
    "cdb",
    [
        cdb10(scsi.READ_10, 16383, 2),
        cdb16(scsi.READ_16, 1 << 40, 1),
        cdb12(scsi.WRITE_12, 16384, 1),
        cdb10(scsi.SYNCHRONIZE_CACHE_10, 16384, 1),
        cdb16(scsi.SYNCHRONIZE_CACHE_16, 16000, 1000),
        cdb16(scsi.WRITE_SAME_16, 16380, 5, flags=0x08),
    ],
)
def test_lba_out_of_range_is_illegal_request_0x21(disk: ScsiDisk, export, tmp_path: Path, cdb: bytes) -> None:
    res = disk.execute(cdb, [bytes(2 * BS)])
    assert sense_of(res) == (scsi.ILLEGAL_REQUEST, 0x21, 0x00)
    assert "Logical block address out of range" in decode_sense(tmp_path, res.sense)
    assert [c for c in export.calls if c[0] != "flush"] == []


def test_short_data_out_is_refused_not_padded(disk: ScsiDisk, export) -> None:
    assert sense_of(disk.execute(cdb10(scsi.WRITE_10, 0, 2), [bytes(BS)]))[0] == scsi.ILLEGAL_REQUEST
    assert export.calls == []


def test_synchronize_cache_10_and_16_flush_the_volume(disk: ScsiDisk, export) -> None:
    assert disk.execute(cdb10(scsi.SYNCHRONIZE_CACHE_10, 0, 0)).status == GOOD
    assert disk.execute(cdb16(scsi.SYNCHRONIZE_CACHE_16, 0, 0)).status == GOOD
    assert [c[0] for c in export.calls] == ["flush", "flush"]


# --- errors from the volume --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "cdb", "want", "text"),
    [
        (
            OutOfSpace("full"),
            cdb10(scsi.WRITE_10, 0, 1),
            (0x7, 0x27, 0x07),
            "Space allocation failed write protect",
        ),
        (TorusError("disk"), cdb10(scsi.READ_10, 0, 1), (0x3, 0x11, 0x00), "Unrecovered read error"),
        (TorusError("disk"), cdb10(scsi.WRITE_10, 0, 1), (0x3, 0x0C, 0x00), "Write error"),
        (TorusError("disk"), cdb10(scsi.SYNCHRONIZE_CACHE_10, 0, 0), (0x3, 0x0C, 0x00), "Write error"),
        (Again("busy"), cdb10(scsi.WRITE_10, 0, 1), (0xB, 0x00, 0x00), "Aborted Command"),
    ],
)
def test_volume_errors_map_to_sense_data(disk, export, tmp_path, error, cdb, want, text) -> None:
    export.fail = error
    res = disk.execute(cdb, [bytes(BS)])
    assert sense_of(res) == want
    assert text in decode_sense(tmp_path, res.sense)


def test_writes_to_a_read_only_volume_are_data_protect(tmp_path: Path) -> None:
    ro = RecordingExport(4 * MiB, read_only=True)
    d = ScsiDisk(ro)
    for cdb in (cdb10(scsi.WRITE_10, 0, 1), cdb16(scsi.WRITE_SAME_16, 0, 1, flags=0x08)):
        res = d.execute(cdb, [bytes(BS)])
        assert sense_of(res) == (scsi.DATA_PROTECT, 0x27, 0x00)
        assert "Write protected" in decode_sense(tmp_path, res.sense)
    ms = d.execute(bytes([scsi.MODE_SENSE_6, 0x08, scsi.PAGE_CACHING, 0, 255, 0])).data
    assert ms[2] & 0x80  # WP in the mode parameter header
    assert ro.calls == []


def test_bad_geometry_is_a_typed_error() -> None:
    with pytest.raises(scsi.InvalidArgument):
        ScsiDisk(RecordingExport(4 * MiB + 512), block_size=4096)
    with pytest.raises(scsi.InvalidArgument):
        ScsiDisk(RecordingExport(4 * MiB), block_size=1000)


# --- thin provisioning -------------------------------------------------------------------------


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def test_unmap_zeroes_and_deallocates_the_ranges(disk: ScsiDisk, export) -> None:
    disk.execute(cdb16(scsi.WRITE_16, 0, 16), [b"\xab" * (16 * BS)])
    params = unmap_params((2, 3), (10, 4))
    res = disk.execute(bytes([scsi.UNMAP, 0, 0, 0, 0, 0, 0]) + struct.pack(">HB", len(params), 0), [params])
    assert res.status == GOOD
    data = disk.execute(cdb16(scsi.READ_16, 0, 16)).data
    for blk in range(16):
        want = 0 if 2 <= blk < 5 or 10 <= blk < 14 else 0xAB
        assert data[blk * BS : (blk + 1) * BS] == bytes([want]) * BS, blk
    assert export.store.extents(2 * BS, 3 * BS)[0] == (3 * BS, STATE_HOLE | 2)


def test_unmap_parameter_list_errors(disk: ScsiDisk) -> None:
    def run(params: bytes, plen: int | None = None) -> scsi.ScsiResult:
        n = len(params) if plen is None else plen
        return disk.execute(bytes([scsi.UNMAP, 0, 0, 0, 0, 0, 0]) + struct.pack(">HB", n, 0), [params])

    assert run(b"", 0).status == GOOD
    assert sense_of(run(bytes(4)))[1] == 0x1A  # parameter list length error
    assert sense_of(run(unmap_params(*[(i, 1) for i in range(65)])))[1] == 0x26
    assert sense_of(run(unmap_params((16383, 2))))[1] == 0x21


def test_write_same_16_with_unmap_deallocates_and_reads_zero(disk: ScsiDisk, export) -> None:
    disk.execute(cdb16(scsi.WRITE_16, 0, 8), [b"\x11" * (8 * BS)])
    res = disk.execute(cdb16(scsi.WRITE_SAME_16, 1, 6, flags=0x08), [bytes(BS)])
    assert res.status == GOOD
    assert export.calls[-1] == ("zero", BS, 6 * BS, True)
    data = disk.execute(cdb16(scsi.READ_16, 0, 8)).data
    assert data == b"\x11" * BS + bytes(6 * BS) + b"\x11" * BS


def test_write_same_16_repeats_a_pattern_block(disk: ScsiDisk) -> None:
    block = bytes(range(256)) * (BS // 256)
    assert disk.execute(cdb16(scsi.WRITE_SAME_16, 3, 300), [block]).status == GOOD
    assert disk.execute(cdb16(scsi.READ_16, 3, 300)).data == block * 300


def test_write_same_16_refuses_zero_blocks_anchor_and_unmap_of_non_zero_data(disk: ScsiDisk) -> None:
    assert sense_of(disk.execute(cdb16(scsi.WRITE_SAME_16, 0, 0), [bytes(BS)]))[1] == 0x24
    assert sense_of(disk.execute(cdb16(scsi.WRITE_SAME_16, 0, 1, flags=0x18), [bytes(BS)]))[1] == 0x24
    assert sense_of(disk.execute(cdb16(scsi.WRITE_SAME_16, 0, 1, flags=0x08), [b"\x01" * BS]))[1] == 0x24


# --- mode pages, REPORT LUNS, TEST UNIT READY --------------------------------------------------


def test_mode_sense_6_caching_page_has_write_cache_enabled_and_dpofua(disk: ScsiDisk) -> None:
    data = disk.execute(bytes([scsi.MODE_SENSE_6, 0, scsi.PAGE_CACHING, 0, 255, 0])).data
    length, _medium, dsp, bdl = data[:4]
    assert length == len(data) - 1 and dsp == 0x10 and bdl == 8
    nblocks, bs = struct.unpack_from(">II", data, 4)
    assert (nblocks, bs & 0xFFFFFF) == (64 * MiB // BS, BS)
    page = data[12:]
    assert page[0] == 0x08 and page[1] == 18 and page[2] & 0x04  # WCE


def test_mode_sense_10_all_pages_long_lba_and_dbd(disk: ScsiDisk) -> None:
    data = disk.execute(bytes([scsi.MODE_SENSE_10, 0x10, scsi.PAGE_ALL, 0, 0, 0, 0, 0x10, 0, 0])).data
    (length,) = struct.unpack_from(">H", data)
    assert length == len(data) - 2 and data[4] & 1 and struct.unpack_from(">H", data, 6)[0] == 16
    assert struct.unpack_from(">Q", data, 8)[0] == 64 * MiB // BS
    pages = data[24:]
    assert pages[0] == 0x08 and pages[20] == 0x0A and len(pages) == 32
    no_bd = disk.execute(bytes([scsi.MODE_SENSE_10, 0x08, scsi.PAGE_CACHING, 0, 0, 0, 0, 0, 255, 0])).data
    assert struct.unpack_from(">H", no_bd, 6)[0] == 0 and no_bd[8] == 0x08


def test_mode_sense_changeable_values_are_zero_and_saved_values_unsupported(disk: ScsiDisk) -> None:
    data = disk.execute(bytes([scsi.MODE_SENSE_6, 0x08, 0x40 | scsi.PAGE_CACHING, 0, 255, 0])).data
    assert data[4:6] == b"\x08\x12" and not any(data[6:])
    assert sense_of(disk.execute(bytes([scsi.MODE_SENSE_6, 0, 0xC0 | 0x08, 0, 255, 0])))[1] == 0x39
    assert sense_of(disk.execute(bytes([scsi.MODE_SENSE_6, 0, 0x1C, 0, 255, 0])))[1] == 0x24


def test_report_luns_lists_lun_0(disk: ScsiDisk) -> None:
    data = disk.execute(bytes([scsi.REPORT_LUNS, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2)).data
    assert data == struct.pack(">I", 8) + bytes(4) + bytes(8)
    short = disk.execute(bytes([scsi.REPORT_LUNS]) + bytes(5) + struct.pack(">I", 8) + bytes(2))
    assert sense_of(short)[1] == 0x24


def test_test_unit_ready_is_good(disk: ScsiDisk) -> None:
    assert disk.execute(bytes(6)) == scsi.ScsiResult()
