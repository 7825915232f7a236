"""The TCMU shared-memory command ring (``include/uapi/linux/target_core_user.h``, mailbox v2).

The uio map of a ``user_N`` backstore starts with the mailbox::

    u16 version, u16 flags, u32 cmdr_off, u32 cmdr_size, u32 cmd_head   (offsets 0..15)
    u32 cmd_tail                                          (offset 64, its own cache line)

The command ring is ``cmdr_size`` bytes at ``cmdr_off``; the data area follows it. The kernel
appends entries at ``cmd_head``; the handler completes them in order from ``cmd_tail`` and then
advances ``cmd_tail`` by each entry's length (mod ``cmdr_size``). An entry::

    hdr:  u32 len_op (length | opcode in the low 3 bits), u16 cmd_id, u8 kflags, u8 uflags
    req:  u32 iov_cnt, u32 iov_bidi_cnt, u32 iov_dif_cnt, (4 bytes alignment), u64 cdb_off,
          u64 pad, u64 pad, struct iovec iov[] (u64 base = offset into the map, u64 len)
          at entry offsets 8, 12, 16, 24, 32, 40, 48.. (only the outer struct is __packed)
    rsp:  u8 scsi_status, u8 pad, u16 pad, u32 read_len, char sense_buffer[96] (offsets 8..)

``rsp`` overlays ``req``: everything is read before the response is written. PAD entries (and
TMR notifications, which this handler does not ask for) are skipped. :class:`CommandRing`
works on any writable buffer, so the tests lay a ring out in an anonymous mmap the way the
kernel does; :mod:`torus_core.tcmu.uio` gives it the real map.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torus_core.errors import InvalidArgument, NotSupported, TorusError
from torus_core.tcmu.scsi import HARDWARE_ERROR, SENSE_BUFFER_SIZE, ScsiResult, SenseError, cdb_length

log = logging.getLogger(__name__)

MAILBOX_VERSION = 2
#: mailbox flags (capabilities the kernel offers)
FLAG_CAP_OOOC = 1 << 0
FLAG_CAP_READ_LEN = 1 << 1

OP_PAD = 0
OP_CMD = 1
OP_TMR = 2
OP_MASK = 0x7

#: uflags the handler may set in a completed entry
UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2

MAILBOX = struct.Struct("<HHIII")
TAIL_OFFSET = 64
HDR = struct.Struct("<IHBB")
REQ = struct.Struct("<III4xQQQ")  # the inner struct is not packed: cdb_off is 8-aligned
REQ_OFFSET = HDR.size  # 8
IOV_OFFSET = REQ_OFFSET + REQ.size  # 48
IOVEC = struct.Struct("<QQ")
RSP = struct.Struct("<BxHI")  # scsi_status, __pad1, __pad2, read_len
SENSE_OFFSET = REQ_OFFSET + RSP.size  # 16
#: how many bytes of CDB a variable-length (0x7F) command may carry at most
MAX_CDB = 260


class RingError(TorusError):
    """The shared ring holds something no kernel writes (bad offsets, zero-length entry)."""


@dataclass(frozen=True)
class Command:
    """One SCSI command taken from the ring: its CDB and data buffers (views into the map)."""

    cmd_id: int
    cdb: bytes
    iov: tuple[memoryview, ...]


#: What runs a command: ``(cdb, data_out buffers) -> result``; a ScsiDisk.execute fits.
Executor = Callable[[bytes, Sequence[memoryview]], ScsiResult]


class CommandRing:
    """The mailbox, command ring and data area of one TCMU device in a shared buffer."""

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < TAIL_OFFSET + 4:
            raise InvalidArgument(f"a TCMU map is at least {TAIL_OFFSET + 4} bytes, got {len(buf)}")
        self.buf = buf
        version, self.flags, self.cmdr_off, self.cmdr_size, _head = MAILBOX.unpack_from(buf, 0)
        if version != MAILBOX_VERSION:
            raise NotSupported(
                f"TCMU mailbox version {version}; this handler speaks version {MAILBOX_VERSION}"
            )
        if (
            self.cmdr_size == 0
            or self.cmdr_off + self.cmdr_size > len(buf)
            or self.cmdr_off < TAIL_OFFSET + 4
        ):
            raise RingError(
                f"command ring {self.cmdr_off}+{self.cmdr_size} does not fit a {len(buf)}-byte map"
            )
        #: commands completed since creation
        self.completed = 0

    @property
    def head(self) -> int:
        """Where the kernel will write its next entry (offset within the ring)."""
        return int(MAILBOX.unpack_from(self.buf, 0)[4])

    @property
    def tail(self) -> int:
        """The first entry not yet completed (offset within the ring)."""
        return int(struct.unpack_from("<I", self.buf, TAIL_OFFSET)[0])

    @tail.setter
    def tail(self, value: int) -> None:
        struct.pack_into("<I", self.buf, TAIL_OFFSET, value)

    def pending(self) -> bool:
        """True if the kernel queued entries that are not completed yet."""
        return self.head != self.tail

    def _view(self, off: int, length: int, what: str) -> memoryview:
        if off < 0 or length < 0 or off + length > len(self.buf):
            raise RingError(f"{what} {off}+{length} lies outside the {len(self.buf)}-byte map")
        return self.buf[off : off + length]

    def _parse(self, ent: int) -> Command:
        _len_op, cmd_id, _kflags, _uflags = HDR.unpack_from(self.buf, ent)
        iov_cnt, bidi, dif, cdb_off, _p1, _p2 = REQ.unpack_from(self.buf, ent + REQ_OFFSET)
        if cdb_off >= len(self.buf):
            raise RingError(f"CDB offset {cdb_off} lies outside the map")
        n = cdb_length(self.buf[cdb_off])
        if self.buf[cdb_off] == 0x7F:  # variable length: 8 + additional CDB length
            n = min(8 + self.buf[cdb_off + 7] if cdb_off + 7 < len(self.buf) else 8, MAX_CDB)
        cdb = bytes(self._view(cdb_off, min(n, len(self.buf) - cdb_off), "CDB"))
        iovs = []
        for i in range(iov_cnt + bidi + dif):
            base, length = IOVEC.unpack_from(self.buf, ent + IOV_OFFSET + IOVEC.size * i)
            if i < iov_cnt:
                iovs.append(self._view(base, length, "data buffer"))
        return Command(cmd_id, cdb, tuple(iovs))

    def _respond(self, ent: int, cmd: Command, result: ScsiResult) -> None:
        data = result.data
        done = 0
        for iov in cmd.iov:
            if done >= len(data):
                break
            k = min(len(iov), len(data) - done)
            iov[:k] = data[done : done + k]
            done += k
        sense = result.sense[:SENSE_BUFFER_SIZE]
        read_len = done
        RSP.pack_into(self.buf, ent + REQ_OFFSET, result.status, 0, read_len)
        self.buf[ent + SENSE_OFFSET : ent + SENSE_OFFSET + SENSE_BUFFER_SIZE] = sense.ljust(
            SENSE_BUFFER_SIZE, b"\0"
        )
        if self.flags & FLAG_CAP_READ_LEN and data:
            # tell the kernel how much was transferred (residual for a short INQUIRY etc.)
            self.buf[ent + 7] |= UFLAG_READ_LEN

    def process(self, execute: Executor, limit: int | None = None) -> int:
        """Complete the queued entries in ring order (at most ``limit`` commands); return the
        number of commands completed. The caller notifies the kernel when this is > 0."""
        count = 0
        # every entry advances the tail, so one pass over the ring bounds the loop
        budget = self.cmdr_size // 8 + 1
        while budget > 0 and (limit is None or count < limit):
            budget -= 1
            head, tail = self.head, self.tail
            if head == tail:
                break
            if head >= self.cmdr_size or tail >= self.cmdr_size or tail % 8:
                raise RingError(f"ring head {head} / tail {tail} outside a {self.cmdr_size}-byte ring")
            ent = self.cmdr_off + tail
            (len_op,) = struct.unpack_from("<I", self.buf, ent)
            op, length = len_op & OP_MASK, len_op & ~OP_MASK
            if length == 0 or length > self.cmdr_size:
                raise RingError(f"ring entry at {tail} has length {length}")
            if op == OP_CMD:
                cmd = self._parse(ent)
                try:
                    result = execute(cmd.cdb, cmd.iov)
                except Exception:  # a bug must not leave the kernel waiting for this command
                    log.exception("SCSI command %#04x failed", cmd.cdb[0] if cmd.cdb else -1)
                    result = SenseError(HARDWARE_ERROR, (0x44, 0x00)).result()  # internal target failure
                self._respond(ent, cmd, result)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "cmd %d cdb %s -> status %#x sense %s",
                        cmd.cmd_id,
                        cmd.cdb.hex(),
                        result.status,
                        result.sense[:14].hex(),
                    )
                count += 1
                self.completed += 1
            elif op != OP_PAD:
                log.warning("skipping TCMU ring entry with opcode %d", op)
            self.tail = (tail + length) % self.cmdr_size
        return count
