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
TMR notifications, which this handler does not ask for) are skipped. A pass runs the queued
entries, optionally commits them (write-through), and only then writes their responses and moves
the tail: see :meth:`CommandRing.process`. :class:`CommandRing`
works on any writable buffer, so the tests lay a ring out in an anonymous mmap the way the
kernel does; :mod:`torus_core.tcmu.uio` gives it the real map.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torus_core.errors import InvalidArgument, NotSupported, TorusError
from torus_core.tcmu.scsi import (
    GOOD,
    HARDWARE_ERROR,
    SENSE_BUFFER_SIZE,
    ScsiResult,
    SenseError,
    cdb_length,
    changes_data,
)

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
#: What makes a pass's writes durable before they complete: None, or the result every
#: data-changing command of the pass completes with instead; a ScsiDisk.commit fits.
Commit = Callable[[], ScsiResult | None]


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

    @staticmethod
    def _fill(cmd: Command, result: ScsiResult) -> int:
        """Copy a result's data-in bytes into the command's buffers; return how many fit."""
        data = result.data
        done = 0
        for iov in cmd.iov:
            if done >= len(data):
                break
            k = min(len(iov), len(data) - done)
            iov[:k] = data[done : done + k]
            done += k
        return done

    def _respond(self, ent: int, result: ScsiResult, read_len: int) -> None:
        sense = result.sense[:SENSE_BUFFER_SIZE]
        RSP.pack_into(self.buf, ent + REQ_OFFSET, result.status, 0, read_len)
        self.buf[ent + SENSE_OFFSET : ent + SENSE_OFFSET + SENSE_BUFFER_SIZE] = sense.ljust(
            SENSE_BUFFER_SIZE, b"\0"
        )
        if self.flags & FLAG_CAP_READ_LEN and read_len:
            # tell the kernel how much was transferred (residual for a short INQUIRY etc.)
            self.buf[ent + 7] |= UFLAG_READ_LEN

    def _run(self, execute: Executor, cmd: Command) -> ScsiResult:
        try:
            return execute(cmd.cdb, cmd.iov)
        except Exception:  # a bug must not leave the kernel waiting for this command
            log.exception("SCSI command %#04x failed", cmd.cdb[0] if cmd.cdb else -1)
            return SenseError(HARDWARE_ERROR, (0x44, 0x00)).result()  # internal target failure

    def process(self, execute: Executor, limit: int | None = None, commit: Commit | None = None) -> int:
        """Run the queued entries in ring order (at most ``limit`` commands), then complete
        them; return the number of commands completed. The caller notifies the kernel when
        this is > 0.

        With ``commit``, nothing is completed before it ran: one ``commit()`` per pass makes
        the pass's writes durable (a write-through disk, group-committed), and if it returns
        an error result, every data-changing command of the pass completes with that error
        instead. The tail only moves past executed and committed entries, so a handler
        killed mid-pass leaves them queued and the next handler runs them again (writes are
        idempotent), never acknowledging a write it did not make durable.
        """
        batch: list[_Executed] = []
        failure: RingError | None = None
        cursor = self.tail
        commands = 0
        # every entry advances the cursor, so one pass over the ring bounds the loop
        budget = self.cmdr_size // 8 + 1
        try:
            while budget > 0 and (limit is None or commands < limit):
                budget -= 1
                head = self.head
                if head == cursor:
                    break
                if head >= self.cmdr_size or cursor >= self.cmdr_size or cursor % 8:
                    raise RingError(f"ring head {head} / tail {cursor} outside a {self.cmdr_size}-byte ring")
                ent = self.cmdr_off + cursor
                (len_op,) = struct.unpack_from("<I", self.buf, ent)
                op, length = len_op & OP_MASK, len_op & ~OP_MASK
                if length == 0 or length > self.cmdr_size:
                    raise RingError(f"ring entry at {cursor} has length {length}")
                cursor = (cursor + length) % self.cmdr_size
                if op == OP_CMD:
                    cmd = self._parse(ent)
                    result = self._run(execute, cmd)
                    batch.append(_Executed(ent, cursor, cmd, result, self._fill(cmd, result)))
                    commands += 1
                else:
                    if op != OP_PAD:
                        log.warning("skipping TCMU ring entry with opcode %d", op)
                    batch.append(_Executed(ent, cursor, None, None, 0))
        except RingError as exc:  # complete what ran before the bad entry, then report it
            failure = exc
        count = self._complete(batch, commit)
        if failure is not None:
            raise failure
        return count

    def _complete(self, batch: Sequence[_Executed], commit: Commit | None) -> int:
        # the committer knows whether anything is unflushed (a pass of reads costs nothing)
        refused = commit() if commit is not None and batch else None
        count = 0
        for e in batch:
            if e.cmd is not None and e.result is not None:
                result, read_len = e.result, e.read_len
                if refused is not None and result.status == GOOD and changes_data(e.cmd.cdb):
                    result, read_len = refused, 0
                self._respond(e.ent, result, read_len)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "cmd %d cdb %s -> status %#x sense %s",
                        e.cmd.cmd_id,
                        e.cmd.cdb.hex(),
                        result.status,
                        result.sense[:14].hex(),
                    )
                count += 1
                self.completed += 1
            # the response is written before the tail moves past its entry (rsp overlays req)
            self.tail = e.next_tail
        return count


@dataclass(frozen=True)
class _Executed:
    """A ring entry run in this pass but not completed yet (``cmd`` None: a PAD/skipped entry)."""

    ent: int
    next_tail: int
    cmd: Command | None
    result: ScsiResult | None
    read_len: int
