# mypy: allow-untyped-defs
"""The TCMU command ring (torus_core.tcmu.ring) against a ring the test lays out in an anonymous
mmap exactly as the kernel's target_core_user does: mailbox v2, entries of
``round_up(max(sizeof(tcmu_cmd_entry), offsetof(req.iov[n])), 8)`` bytes followed by the CDB,
a PAD entry where an entry would not fit before the end of the ring, iovec bases as offsets into
the map."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator

import pytest

from torus_core.errors import NotSupported, TorusError
from torus_core.nbd.memory import MemoryExport, MemoryStore
from torus_core.tcmu import ring as R
from torus_core.tcmu import scsi
from torus_core.tcmu.scsi import ScsiDisk

CMDR_OFF = 128
CMDR_SIZE = 4096
DATA_OFF = CMDR_OFF + CMDR_SIZE
MAP_SIZE = DATA_OFF + (1 << 20)
ENTRY_SIZE = 112  # sizeof(struct tcmu_cmd_entry): 8-byte header + 104-byte rsp
# struct tcmu_cmd_entry is __packed but its inner req struct is not: cdb_off is 8-aligned
CDB_OFF_AT = 24  # entry offset of req.cdb_off
IOV_OFFSET = 48  # entry offset of req.iov[0]


class KernelSide:
    """What target_core_user does to the shared map: queue entries, read completions."""

    def __init__(self, flags: int = R.FLAG_CAP_OOOC | R.FLAG_CAP_READ_LEN, version: int = 2) -> None:
        self.map = mmap.mmap(-1, MAP_SIZE)
        self.buf = memoryview(self.map)
        struct.pack_into("<HHIII", self.buf, 0, version, flags, CMDR_OFF, CMDR_SIZE, 0)
        self.head = 0
        self.next_cmd = 1
        self.data_next = DATA_OFF
        self.entries: dict[int, int] = {}  # cmd_id -> entry offset

    def _set_head(self, head: int) -> None:
        self.head = head
        struct.pack_into("<I", self.buf, 12, head)

    def alloc(self, n: int) -> int:
        off = self.data_next
        self.data_next += (n + 4095) // 4096 * 4096
        return off

    def queue(self, cdb: bytes, iovs: list[tuple[int, int]] = ()) -> int:
        base = max(ENTRY_SIZE, IOV_OFFSET + 16 * len(iovs))
        base = (base + 7) // 8 * 8
        size = base + (len(cdb) + 7) // 8 * 8
        if self.head + size > CMDR_SIZE:  # does not fit before the end: PAD to the start
            struct.pack_into(
                "<IHBB", self.buf, CMDR_OFF + self.head, (CMDR_SIZE - self.head) | R.OP_PAD, 0, 0, 0
            )
            self._set_head(0)
        ent = CMDR_OFF + self.head
        cmd_id = self.next_cmd
        self.next_cmd += 1
        struct.pack_into("<IHBB", self.buf, ent, size | R.OP_CMD, cmd_id, 0, 0)
        struct.pack_into("<III", self.buf, ent + 8, len(iovs), 0, 0)
        struct.pack_into("<QQQ", self.buf, ent + CDB_OFF_AT, ent + base, 0, 0)
        for i, (off, n) in enumerate(iovs):
            struct.pack_into("<QQ", self.buf, ent + IOV_OFFSET + 16 * i, off, n)
        self.buf[ent + base : ent + base + len(cdb)] = cdb
        self.entries[cmd_id] = ent
        self._set_head((self.head + size) % CMDR_SIZE)
        return cmd_id

    @property
    def tail(self) -> int:
        return struct.unpack_from("<I", self.buf, 64)[0]

    def status(self, cmd_id: int) -> tuple[int, bytes, int, int]:
        """(scsi_status, sense_buffer, uflags, read_len) of a completed entry."""
        ent = self.entries[cmd_id]
        status = self.buf[ent + 8]
        (read_len,) = struct.unpack_from("<I", self.buf, ent + 12)
        return status, bytes(self.buf[ent + 16 : ent + 16 + 96]), self.buf[ent + 7], read_len

    def close(self) -> None:
        self.buf.release()
        self.map.close()


@pytest.fixture
def kernel() -> Iterator[KernelSide]:
    k = KernelSide()
    yield k
    k.close()


@pytest.fixture
def disk() -> ScsiDisk:
    return ScsiDisk(MemoryExport("vol1", MemoryStore(16 << 20)), block_size=4096)


def rw10(op: int, lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, n, 0)


def test_mailbox_is_parsed_and_an_empty_ring_completes_nothing(kernel: KernelSide, disk: ScsiDisk) -> None:
    ring = R.CommandRing(kernel.buf)
    assert (ring.cmdr_off, ring.cmdr_size, ring.flags) == (CMDR_OFF, CMDR_SIZE, 3)
    assert not ring.pending()
    assert ring.process(disk.execute) == 0


def test_inquiry_fills_the_data_buffer_and_reports_its_length(kernel: KernelSide, disk: ScsiDisk) -> None:
    buf = kernel.alloc(96)
    cid = kernel.queue(bytes([scsi.INQUIRY, 0, 0, 0, 96, 0]), [(buf, 96)])
    ring = R.CommandRing(kernel.buf)
    assert ring.pending()
    assert ring.process(disk.execute) == 1
    status, sense, uflags, read_len = kernel.status(cid)
    assert status == scsi.GOOD and sense == bytes(96)
    assert uflags & R.UFLAG_READ_LEN and read_len == 36
    assert bytes(kernel.buf[buf + 8 : buf + 16]) == b"CoreOS  "
    assert kernel.tail == kernel.head


def test_read_len_is_not_claimed_when_the_kernel_does_not_offer_it(disk: ScsiDisk) -> None:
    k = KernelSide(flags=0)
    try:
        cid = k.queue(bytes([scsi.INQUIRY, 0, 0, 0, 96, 0]), [(k.alloc(96), 96)])
        R.CommandRing(k.buf).process(disk.execute)
        assert k.status(cid)[2] == 0
    finally:
        k.close()


def test_write_gathers_and_read_scatters_across_iovecs(kernel: KernelSide, disk: ScsiDisk) -> None:
    payload = bytes(range(251)) * 50  # 12550 bytes, padded below to 4 blocks
    payload = payload + bytes(4 * 4096 - len(payload))
    a, b = kernel.alloc(5000), kernel.alloc(4 * 4096 - 5000)
    kernel.buf[a : a + 5000] = payload[:5000]
    kernel.buf[b : b + len(payload) - 5000] = payload[5000:]
    w = kernel.queue(rw10(scsi.WRITE_10, 9, 4), [(a, 5000), (b, 4 * 4096 - 5000)])
    c, d = kernel.alloc(4096), kernel.alloc(3 * 4096)
    r = kernel.queue(rw10(scsi.READ_10, 9, 4), [(c, 4096), (d, 3 * 4096)])
    assert R.CommandRing(kernel.buf).process(disk.execute) == 2
    assert kernel.status(w)[0] == kernel.status(r)[0] == scsi.GOOD
    assert bytes(kernel.buf[c : c + 4096]) + bytes(kernel.buf[d : d + 3 * 4096]) == payload
    assert bytes(disk.export.read(9 * 4096, 4 * 4096)) == payload


def test_unknown_opcode_completes_with_check_condition_and_sense(kernel: KernelSide, disk: ScsiDisk) -> None:
    cid = kernel.queue(bytes([0xA3, 0x0C]) + bytes(10))
    R.CommandRing(kernel.buf).process(disk.execute)
    status, sense, uflags, _ = kernel.status(cid)
    assert status == scsi.CHECK_CONDITION and uflags == 0
    assert sense[0] == 0x70 and sense[2] == scsi.ILLEGAL_REQUEST and sense[12:14] == b"\x20\x00"
    assert kernel.tail == kernel.head


def test_entries_wrap_around_the_ring_through_a_pad_entry(kernel: KernelSide, disk: ScsiDisk) -> None:
    ring = R.CommandRing(kernel.buf)
    done = 0
    wrapped = False
    for i in range(120):  # 120 entries of 128 bytes: the 4096-byte ring wraps several times
        before = kernel.head
        cid = kernel.queue(bytes(6))  # TEST UNIT READY
        wrapped |= kernel.entries[cid] - CMDR_OFF < before
        if i % 7 == 6:
            done += ring.process(disk.execute)
            assert kernel.tail == kernel.head
    done += ring.process(disk.execute)
    assert wrapped and done == 120 == ring.completed
    assert all(kernel.status(c)[0] == scsi.GOOD for c in list(kernel.entries)[-20:])


def test_limit_bounds_one_pass(kernel: KernelSide, disk: ScsiDisk) -> None:
    for _ in range(5):
        kernel.queue(bytes(6))
    ring = R.CommandRing(kernel.buf)
    assert ring.process(disk.execute, limit=2) == 2 and ring.pending()
    assert ring.process(disk.execute) == 3 and not ring.pending()


def test_a_crashing_executor_still_completes_the_command_as_hardware_error(kernel: KernelSide) -> None:
    def broken(cdb, iov):
        raise RuntimeError("bug")

    cid = kernel.queue(bytes(6))
    R.CommandRing(kernel.buf).process(broken)
    status, sense, _, _ = kernel.status(cid)
    assert status == scsi.CHECK_CONDITION and sense[2] == scsi.HARDWARE_ERROR and sense[12] == 0x44
    assert kernel.tail == kernel.head


def test_wrong_mailbox_version_is_not_supported() -> None:
    k = KernelSide(version=1)
    try:
        with pytest.raises(NotSupported, match="version 1"):
            R.CommandRing(k.buf)
    finally:
        k.close()


def test_corrupt_entries_raise_ring_error_instead_of_spinning(kernel: KernelSide, disk: ScsiDisk) -> None:
    cid = kernel.queue(bytes(6))
    ent = kernel.entries[cid]
    struct.pack_into("<I", kernel.buf, ent, R.OP_CMD)  # length 0
    with pytest.raises(R.RingError, match="length 0"):
        R.CommandRing(kernel.buf).process(disk.execute)


def test_iovec_outside_the_map_is_a_ring_error(kernel: KernelSide, disk: ScsiDisk) -> None:
    kernel.queue(bytes([scsi.INQUIRY, 0, 0, 0, 96, 0]), [(MAP_SIZE - 10, 96)])
    with pytest.raises(R.RingError, match="outside"):
        R.CommandRing(kernel.buf).process(disk.execute)


def test_a_map_smaller_than_its_ring_is_refused() -> None:
    m = mmap.mmap(-1, 4096)
    try:
        struct.pack_into("<HHIII", m, 0, 2, 0, 128, 8192, 0)
        with pytest.raises(R.RingError, match="does not fit"):
            R.CommandRing(memoryview(m))
    finally:
        m.close()


def test_entry_offsets_match_the_uapi_header() -> None:
    # hdr 8 bytes; req: 3 x u32, 4 bytes of alignment, 3 x u64 = 40 bytes, iov[] at 48;
    # rsp: status, pad, pad, read_len, sense[96]
    assert (R.HDR.size, R.REQ.size, R.IOV_OFFSET, R.IOVEC.size) == (8, 40, IOV_OFFSET, 16)
    assert (R.RSP.size, R.SENSE_OFFSET, R.TAIL_OFFSET) == (8, 16, 64)


def test_backstore_size_is_read_from_info_not_the_sector_size(tmp_path) -> None:
    from torus_core.tcmu.configfs import TcmuBackstore

    store = TcmuBackstore(30, "torus_v", "torus/v", root=str(tmp_path))
    assert store.dev_size() is None and not store.enabled()
    d = tmp_path / "core" / "user_30" / "torus_v"
    d.mkdir(parents=True)
    # as a 6.1 kernel prints it
    (d / "info").write_text(
        "Status: ACTIVATED  Max Queue Depth: 0  SectorSize: 4096  HwMaxSectors: 1024 "
        "        Config: torus/v Size: 167772160 MaxDataAreaMB: 1024 DataPagesPerBlk: 1 CmdRingSizeMB: 8\n"
    )
    (d / "enable").write_text("1\n")
    assert store.dev_size() == 167772160 and store.enabled()


# --- write-through: commit before completing, and a killed handler's pass runs again -----------


class BufferedExport(MemoryExport):
    """A MemoryExport with a volatile write-back buffer, like a volume's File: writes stay in
    this object until ``flush`` copies them to the store (what survives the process)."""

    def __init__(self, store: MemoryStore, *, fail_flush: bool = False) -> None:
        super().__init__("vol1", store)
        self.pending: list[tuple[int, bytes]] = []
        self.flushes = 0
        self.fail_flush = fail_flush

    def read(self, offset: int, length: int) -> memoryview:
        out = bytearray(self.store.read(offset, length))
        for off, data in self.pending:
            lo, hi = max(off, offset), min(off + len(data), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - off : hi - off]
        return memoryview(bytes(out))

    def write(self, offset: int, data, fua: bool) -> None:
        self.pending.append((offset, bytes(data)))
        if fua:
            self.flush()

    def flush(self) -> None:
        if self.fail_flush:
            raise TorusError("journal replicas unreachable")
        self.flushes += 1
        for off, data in self.pending:
            self.store.write(off, data)
        self.pending.clear()


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def queue_write(kernel: KernelSide, lba: int, fill: int) -> int:
    buf = kernel.alloc(4096)
    kernel.buf[buf : buf + 4096] = bytes([fill]) * 4096
    return kernel.queue(rw10(scsi.WRITE_10, lba, 1), [(buf, 4096)])


def test_write_through_disk_reports_no_write_cache() -> None:
    disk = ScsiDisk(MemoryExport("v", MemoryStore(1 << 20)), write_cache=False)
    page = disk.execute(bytes([scsi.MODE_SENSE_6, 0, scsi.PAGE_CACHING, 0, 255, 0])).data[12:]
    assert page[0] == scsi.PAGE_CACHING and not page[2] & 0x04  # WCE=0


def test_a_pass_commits_its_writes_once_before_completing_any_of_them(kernel: KernelSide) -> None:
    store = MemoryStore(1 << 20)
    export = BufferedExport(store)
    disk = ScsiDisk(export, write_cache=False)
    tails_at_commit: list[int] = []

    def commit():
        tails_at_commit.append(kernel.tail)
        return disk.commit()

    writes = [queue_write(kernel, lba, 0x40 + lba) for lba in range(3)]
    rbuf = kernel.alloc(4096)
    read = kernel.queue(rw10(scsi.READ_10, 1, 1), [(rbuf, 4096)])
    assert R.CommandRing(kernel.buf).process(disk.execute, commit=commit) == 4
    assert tails_at_commit == [0]  # the kernel saw nothing complete before the flush
    assert export.flushes == 1 and not export.pending
    assert all(kernel.status(c)[0] == scsi.GOOD for c in [*writes, read])
    assert bytes(kernel.buf[rbuf : rbuf + 4096]) == bytes([0x41]) * 4096
    assert bytes(store.read(2 * 4096, 4096)) == bytes([0x42]) * 4096


def test_a_pass_of_reads_only_does_not_flush(kernel: KernelSide) -> None:
    export = BufferedExport(MemoryStore(1 << 20))
    disk = ScsiDisk(export, write_cache=False)
    kernel.queue(rw10(scsi.READ_10, 0, 1), [(kernel.alloc(4096), 4096)])
    kernel.queue(bytes(6))
    assert R.CommandRing(kernel.buf).process(disk.execute, commit=disk.commit) == 2
    assert export.flushes == 0


def test_a_failed_commit_completes_the_writes_with_an_error_and_the_reads_good(kernel: KernelSide) -> None:
    export = BufferedExport(MemoryStore(1 << 20), fail_flush=True)
    disk = ScsiDisk(export, write_cache=False)
    write = queue_write(kernel, 0, 0x77)
    read = kernel.queue(rw10(scsi.READ_10, 5, 1), [(kernel.alloc(4096), 4096)])
    assert R.CommandRing(kernel.buf).process(disk.execute, commit=disk.commit) == 2
    status, sense, _, read_len = kernel.status(write)
    assert status == scsi.CHECK_CONDITION and sense[2] == scsi.MEDIUM_ERROR and read_len == 0
    assert sense[12:14] == bytes(scsi.ASC_WRITE_ERROR)
    assert kernel.status(read)[0] == scsi.GOOD
    assert disk.unflushed  # the next pass flushes again rather than forget the writes


def test_a_handler_killed_before_its_commit_leaves_the_pass_for_the_next_handler(
    kernel: KernelSide,
) -> None:
    store = MemoryStore(1 << 20)
    first = ScsiDisk(BufferedExport(store), write_cache=False)

    def killed_at_commit():
        raise Killed

    writes = [queue_write(kernel, lba, 0x10 + lba) for lba in range(4)]
    with pytest.raises(Killed):
        R.CommandRing(kernel.buf).process(first.execute, commit=killed_at_commit)
    assert kernel.tail == 0  # nothing completed: the kernel still waits for all four
    assert bytes(store.read(0, 4 * 4096)) == bytes(4 * 4096)  # and none of it is durable
    # the restarted handler (a new process: a new export, the killed one's buffer is gone)
    second = ScsiDisk(BufferedExport(store), write_cache=False)
    assert R.CommandRing(kernel.buf).process(second.execute, commit=second.commit) == 4
    assert kernel.tail == kernel.head
    assert all(kernel.status(c)[0] == scsi.GOOD for c in writes)
    assert bytes(store.read(0, 4 * 4096)) == b"".join(bytes([0x10 + i]) * 4096 for i in range(4))


class WatchedRing(R.CommandRing):
    """A ring that checks, each time the tail moves, that no completed write is only buffered."""

    export: BufferedExport
    moves = 0

    @property
    def tail(self) -> int:
        return R.CommandRing.tail.fget(self)

    @tail.setter
    def tail(self, value: int) -> None:
        assert not self.export.pending, "a write completes while it is only in the handler's memory"
        self.moves += 1
        R.CommandRing.tail.fset(self, value)


def test_the_tail_never_moves_past_a_write_that_is_not_durable(kernel: KernelSide) -> None:
    """The invariant the TCMU reattach relies on: whenever a kill lands, every write the kernel
    was told is complete is in the store, so the restarted handler serves the same data."""
    export = BufferedExport(MemoryStore(1 << 20))
    disk = ScsiDisk(export, write_cache=False)
    ring = WatchedRing(kernel.buf)
    ring.export = export
    for step in range(40):
        queue_write(kernel, step % 6, step)
        if step % 4 == 1:
            kernel.queue(rw10(scsi.READ_10, step % 6, 1), [(kernel.alloc(4096), 4096)])
        if step % 3 == 2:
            ring.process(disk.execute, commit=disk.commit)
            kernel.data_next = DATA_OFF  # completed: the kernel reuses its data area
    ring.process(disk.execute, commit=disk.commit)
    assert ring.moves >= 50 and kernel.tail == kernel.head
    assert bytes(export.store.read(5 * 4096, 4096)) == bytes([35]) * 4096
