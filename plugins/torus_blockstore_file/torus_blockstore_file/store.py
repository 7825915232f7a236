"""A persistent, crash-safe block store: a sparse slab file plus a checksummed index.

Layout: see :mod:`torus_blockstore_file.layout`.

Write protocol (``write_block``)
    1. take a free slot from the in-memory free set (a roaring bitmap: O(1)-ish, no scan);
    2. ``pwrite`` the zero-padded block into the slot in ``data.blk``;
    3. ``pwrite`` the slot's 64-byte record (ref, next ``seq``, CRC-32 of the block) into
       ``index.blk``.

``flush``
    ``fsync(data)`` then ``fsync(index)``; then the header's ``durable_seq`` is set to the highest
    ``seq`` written before the flush started. Only flushed blocks are guaranteed.

Deletes
    ``delete_block`` zeroes the record; the slot goes to a *pending* list and is only reused
    once a later fsync of the index made the zero record durable. So a slot holding a flushed
    block is never overwritten while the index on disk may still name that block.

Open / recovery
    The index is scanned once (all-zero 1 MiB chunks are skipped wholesale). A record with a
    bad record CRC is torn and is dropped. A record with ``seq > durable_seq`` was written after
    the last completed flush, so its data may be torn: its block is read and checked, and
    dropped if the checksum fails (an unflushed block is therefore either intact or absent).
    Records with ``seq <= durable_seq`` are trusted; if their data later fails the checksum,
    ``get_block`` raises :class:`~torus_core.errors.CorruptBlock` and never returns the bytes.
    Two records for one ref (a delete + rewrite interrupted by a crash) resolve to the highest
    ``seq``. Every drop is written back and fsynced before the store is used.

Every read verifies the block's CRC-32 against the record.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pyroaring import BitMap

from torus_blockstore_file.layout import (
    DURABLE_OFFSET,
    HEADER_SIZE,
    RECORD_SIZE,
    STATIC_COPY_OFFSET,
    ZERO_RECORD,
    Record,
    block_checksum,
    pack_durable,
    pack_static_header,
    record_offset,
    unpack_durable,
    unpack_record,
    unpack_static_header,
)
from torus_core.blockstore import BlockStoreConfig, RefTableBlockStore
from torus_core.datadir import open_private, private_dir
from torus_core.errors import (
    BlockExists,
    BlockNotExist,
    BlockStoreError,
    BlockStoreLocked,
    Closed,
    CorruptBlock,
    InvalidArgument,
    OutOfSpace,
    disk_full_is_out_of_space,
)
from torus_core.refs import BlockRef
from torus_core.units import format_size, parse_size

DATA_FILE = "data.blk"
INDEX_FILE = "index.blk"

_SCAN_CHUNK_RECORDS = 16384  # 1 MiB of index per read at open
_T = TypeVar("_T")


#: Default ``reserve``: bytes of the file system the store leaves free for the rest of the data
#: directory (SQLite metadata, journal segments), see :class:`FileStoreOptions`.
DEFAULT_RESERVE = 32 << 20


@dataclass(frozen=True, slots=True)
class FileStoreOptions:
    """Options read from ``BlockStoreConfig.options`` (the ``[blockstore.file]`` section).

    :param fsync: if false, ``flush`` skips ``fsync`` (blocks then survive a process crash but
        not a power loss or kernel crash). Default true.
    :param reserve: bytes (or a size such as ``"64MiB"``) of free space the store leaves on its
        file system. ``data.blk`` is sparse, so a store larger than the disk fills it; a write
        that would take a slot not yet backed by disk while less than ``reserve`` is free
        raises :class:`~torus_core.errors.OutOfSpace` instead, so that the metadata database
        and journals next to it can still write (reads, volume opens and lease renewals go on
        working). ``0`` turns this off. Default 32 MiB.
    """

    fsync: bool = True
    reserve: int = DEFAULT_RESERVE

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> FileStoreOptions:
        """Validate and build options; unknown keys or wrong types raise InvalidArgument."""
        unknown = set(options) - {"fsync", "reserve"}
        if unknown:
            raise InvalidArgument(f"unknown file block store option(s): {', '.join(sorted(unknown))}")
        fsync = options.get("fsync", True)
        if not isinstance(fsync, bool):
            raise InvalidArgument(f"option fsync must be a boolean, got {fsync!r}")
        raw = options.get("reserve", DEFAULT_RESERVE)
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise InvalidArgument(f"option reserve must be a size, got {raw!r}")
        return cls(fsync=fsync, reserve=parse_size(raw))


@dataclass(frozen=True, slots=True)
class _Entry:
    slot: int
    checksum: int
    seq: int


class FileBlockStore(RefTableBlockStore):
    """Blocks kept in ``<path>/data.blk`` with a checksummed index in ``<path>/index.blk``.

    Open with :meth:`open`; the directory is created if needed and locked (``flock``) against a
    second opener, which gets :class:`~torus_core.errors.BlockStoreLocked`. Reopening with a
    larger ``capacity_bytes`` grows both files; a smaller one compacts blocks into the lower
    slots and truncates, or raises :class:`~torus_core.errors.InvalidArgument` if more blocks are
    stored than would fit.
    """

    name: ClassVar[str] = "file"
    persistent: ClassVar[bool] = True

    def __init__(self, path: str, block_size: int, capacity: int, options: FileStoreOptions) -> None:
        """Use :meth:`open`; this constructor assumes validated arguments."""
        self._path = path
        self._block_size = block_size
        self._capacity = capacity
        self._options = options
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()
        self._inflight = 0
        self._closed = False
        self._entries: dict[BlockRef, _Entry] = {}
        self._free = BitMap()
        #: slots whose bytes are allocated on disk (writing them again takes no new space)
        self._backed = BitMap()
        self._pending: list[int] = []
        self._next_seq = 1
        self._durable_seq = 0
        self._index_fd = -1
        self._data_fd = -1

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, config: BlockStoreConfig) -> FileBlockStore:
        """Create or reopen the store in ``config.path``."""
        if not config.path:
            raise InvalidArgument("the file block store needs a path")
        if not isinstance(config.block_size, int) or config.block_size <= 0:
            raise InvalidArgument(f"block_size must be a positive integer, got {config.block_size!r}")
        if not isinstance(config.capacity_bytes, int) or config.capacity_bytes < 0:
            raise InvalidArgument(f"capacity_bytes must be >= 0, got {config.capacity_bytes!r}")
        options = FileStoreOptions.from_mapping(config.options)
        store = cls(os.fspath(config.path), config.block_size, config.capacity_blocks, options)
        try:
            store._open_files()
            store._recover()
        except BaseException:
            store._release_fds()
            raise
        return store

    def _open_files(self) -> None:
        try:
            private_dir(self._path)
            index_path = os.path.join(self._path, INDEX_FILE)
            self._index_fd = open_private(index_path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise BlockStoreError(f"cannot open file block store at {self._path}: {exc}") from exc
        try:
            fcntl.flock(self._index_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BlockStoreLocked(f"file block store {self._path} is in use by another opener") from None
            raise BlockStoreError(f"cannot lock {index_path}: {exc}") from exc
        try:
            self._data_fd = open_private(os.path.join(self._path, DATA_FILE), os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise BlockStoreError(f"cannot open data file in {self._path}: {exc}") from exc

    def _release_fds(self) -> None:
        for fd in (self._data_fd, self._index_fd):
            if fd >= 0:
                os.close(fd)  # closing the index fd also drops the flock
        self._data_fd = self._index_fd = -1

    def _fsync_dir(self) -> None:
        fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_header(self) -> bool:
        """Check or initialise the header; returns True if the store was just created."""
        head = os.pread(self._index_fd, HEADER_SIZE, 0)
        if not any(head):
            if os.fstat(self._index_fd).st_size > HEADER_SIZE:
                # Creation fsyncs the header before the file ever grows, so this is damage,
                # not an interrupted creation: refuse rather than wipe the records.
                raise InvalidArgument(f"index in {self._path} has records but no header")
            # New store, or one whose creation was interrupted before the header was durable
            # (no block can have been written yet).
            os.ftruncate(self._index_fd, 0)
            os.ftruncate(self._data_fd, 0)
            os.ftruncate(self._index_fd, HEADER_SIZE)
            static = pack_static_header(self._block_size)
            os.pwrite(self._index_fd, pack_durable(0), DURABLE_OFFSET)
            os.pwrite(self._index_fd, static, STATIC_COPY_OFFSET)
            os.pwrite(self._index_fd, static, 0)
            os.fsync(self._index_fd)
            self._fsync_dir()
            return True
        try:
            stored_block_size = unpack_static_header(head)
        except InvalidArgument:
            # The first copy is damaged; the second one decides (and raises if also bad).
            stored_block_size = unpack_static_header(head[STATIC_COPY_OFFSET:])
            os.pwrite(self._index_fd, head[STATIC_COPY_OFFSET : STATIC_COPY_OFFSET + 32], 0)
        if stored_block_size != self._block_size:
            raise InvalidArgument(
                f"store at {self._path} has block size {stored_block_size}, not {self._block_size}"
            )
        self._durable_seq = unpack_durable(head[DURABLE_OFFSET:])
        return False

    def _grow_error(self, capacity: int, exc: OSError | OverflowError) -> BlockStoreError:
        size = capacity * self._block_size
        what = f"cannot size file block store {self._path} to {capacity} blocks ({size} bytes)"
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutOfSpace(f"{what}: {exc.strerror}")
        if isinstance(exc, OverflowError) or exc.errno in (errno.EFBIG, errno.EINVAL, errno.EOVERFLOW):
            return BlockStoreError(f"{what}: too large for the file system ({exc}); use a smaller size")
        return BlockStoreError(f"{what}: {exc}")

    def _recover(self) -> None:
        self._read_header()
        index_size = os.fstat(self._index_fd).st_size
        old_capacity = max(0, (index_size - HEADER_SIZE) // RECORD_SIZE)
        new_capacity = self._capacity
        scan_capacity = max(old_capacity, new_capacity)
        # Grow first (also repairs files left short by a crash during an earlier grow). The data
        # file first: the index's size is the capacity, so a grow the file system refuses
        # (too large, no space) leaves the store as it was.
        try:
            if os.fstat(self._data_fd).st_size < scan_capacity * self._block_size:
                os.ftruncate(self._data_fd, scan_capacity * self._block_size)
            if index_size < record_offset(scan_capacity):
                os.ftruncate(self._index_fd, record_offset(scan_capacity))
        except (OSError, OverflowError) as exc:
            raise self._grow_error(scan_capacity, exc) from exc

        entries: dict[BlockRef, _Entry] = {}
        dropped: list[int] = []
        max_seq = self._durable_seq
        for slot, raw in self._scan_records(old_capacity):
            rec = unpack_record(raw)
            if rec is None:
                dropped.append(slot)
                continue
            max_seq = max(max_seq, rec.seq)
            if rec.seq > self._durable_seq and not self._data_matches(slot, rec.checksum):
                dropped.append(slot)  # never flushed and torn: treat as absent
                continue
            other = entries.get(rec.ref)
            if other is not None:
                if other.seq > rec.seq:
                    dropped.append(slot)
                    continue
                dropped.append(other.slot)
            entries[rec.ref] = _Entry(slot, rec.checksum, rec.seq)
        self._next_seq = max_seq + 1
        for slot in dropped:
            os.pwrite(self._index_fd, ZERO_RECORD, record_offset(slot))

        if len(entries) > new_capacity:
            raise InvalidArgument(
                f"cannot shrink store at {self._path} to {new_capacity} blocks: {len(entries)} are stored"
            )
        used = BitMap(e.slot for e in entries.values())
        free = BitMap()
        free.add_range(0, new_capacity)
        free -= used
        self._entries = entries
        self._free = free
        self._backed = self._scan_backed(new_capacity)
        if old_capacity > new_capacity:
            self._compact(new_capacity)
        # Make drops, relocations and the new size durable before the store is used.
        if os.fstat(self._data_fd).st_size > new_capacity * self._block_size:
            os.ftruncate(self._data_fd, new_capacity * self._block_size)
        self._sync_files(force=True)
        self._write_durable(self._next_seq - 1)
        os.fsync(self._index_fd)
        self._free.run_optimize()

    def _scan_records(self, capacity: int) -> Iterator[tuple[int, bytes]]:
        """Yield ``(slot, raw)`` for every non-zero record among the first ``capacity`` slots."""
        zero_chunk = bytes(_SCAN_CHUNK_RECORDS * RECORD_SIZE)
        for first in range(0, capacity, _SCAN_CHUNK_RECORDS):
            count = min(_SCAN_CHUNK_RECORDS, capacity - first)
            chunk = os.pread(self._index_fd, count * RECORD_SIZE, record_offset(first))
            chunk = chunk + bytes(count * RECORD_SIZE - len(chunk))
            if chunk == zero_chunk[: len(chunk)]:
                continue
            view = memoryview(chunk)
            for i in range(count):
                raw = view[i * RECORD_SIZE : (i + 1) * RECORD_SIZE]
                if raw != ZERO_RECORD:
                    yield first + i, bytes(raw)

    def _scan_backed(self, capacity: int) -> BitMap:
        """Slots of ``data.blk`` that hold allocated extents (``SEEK_DATA`` / ``SEEK_HOLE``)."""
        backed = BitMap()
        end = capacity * self._block_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(self._data_fd, pos, os.SEEK_DATA)
                stop = os.lseek(self._data_fd, start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                backed.add_range(pos // self._block_size, capacity)  # no hole support: all backed
                break
            if start >= end:
                break
            backed.add_range(start // self._block_size, min(capacity, -(-stop // self._block_size)))
            pos = stop
        return backed

    def _check_reserve(self, slot: int) -> None:
        """OutOfSpace if writing ``slot`` would take disk space the reserve keeps free."""
        if not self._options.reserve or slot in self._backed:
            return
        st = os.statvfs(self._path)
        free = st.f_bavail * st.f_frsize
        if free - self._block_size < self._options.reserve:
            raise OutOfSpace(
                f"file block store {self._path}: its file system has {format_size(free)} free, "
                f"the store keeps {format_size(self._options.reserve)} of it for metadata and "
                f"journals (option reserve)"
            )

    def _data_matches(self, slot: int, checksum: int) -> bool:
        data = os.pread(self._data_fd, self._block_size, slot * self._block_size)
        return len(data) == self._block_size and block_checksum(data) == checksum

    def _compact(self, new_capacity: int) -> None:
        """Move blocks stored beyond ``new_capacity`` into free low slots, then truncate."""
        for ref, entry in list(self._entries.items()):
            if entry.slot < new_capacity:
                continue
            target = self._free.min()
            self._free.remove(target)
            data = os.pread(self._data_fd, self._block_size, entry.slot * self._block_size)
            os.pwrite(self._data_fd, data, target * self._block_size)
            moved = _Entry(target, entry.checksum, self._next_seq)
            self._next_seq += 1
            os.pwrite(self._index_fd, Record(ref, moved.seq, moved.checksum).pack(), record_offset(target))
            self._entries[ref] = moved
        # The old copies vanish with the truncation; until it is durable a crash leaves two
        # records for the same ref, which recovery resolves to the newer (relocated) one.
        self._sync_files(force=True)
        os.ftruncate(self._index_fd, record_offset(new_capacity))
        os.ftruncate(self._data_fd, new_capacity * self._block_size)

    # --- helpers ----------------------------------------------------------------------------

    def _sync_files(self, *, force: bool = False) -> None:
        if self._options.fsync or force:
            os.fsync(self._data_fd)
            os.fsync(self._index_fd)

    def _write_durable(self, seq: int) -> None:
        if seq > self._durable_seq:
            os.pwrite(self._index_fd, pack_durable(seq), DURABLE_OFFSET)
            self._durable_seq = seq

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"file block store {self._path} is closed")

    def _ref_table(self) -> dict[BlockRef, _Entry]:
        # has_block() is true for a ref with a record; its data may still turn out corrupt on read.
        return self._entries

    def _io(self, fn: Callable[[], _T]) -> _T:
        """Run file I/O outside the state lock while keeping ``close`` from closing the fds."""
        with self._lock:
            self._check_open()
            self._inflight += 1
        try:
            return fn()
        finally:
            with self._lock:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.notify_all()

    def _read_slot(self, slot: int) -> bytes:
        return os.pread(self._data_fd, self._block_size, slot * self._block_size)

    def _allocate(self) -> int:
        """Take a free slot (caller holds the lock)."""
        if not self._free and self._pending:
            # Deleted slots become reusable once their zero records are durable.
            if self._options.fsync:
                os.fsync(self._index_fd)
            self._free.update(self._pending)
            self._pending = []
        if not self._free:
            raise OutOfSpace(f"file block store {self._path} is full ({self._capacity} blocks)")
        slot = self._free.min()
        self._free.remove(slot)
        return slot

    # --- BlockStore API ---------------------------------------------------------------------

    def __enter__(self) -> FileBlockStore:
        return self

    @property
    def block_size(self) -> int:
        """Size of every block in bytes."""
        return self._block_size

    @property
    def path(self) -> str:
        """The store directory."""
        return self._path

    def get_block(self, ref: BlockRef) -> bytes:
        """Read and verify the block; :class:`CorruptBlock` if its checksum fails."""
        with self._lock:
            self._check_open()
            entry = self._entries.get(ref)
        if entry is None:
            raise BlockNotExist(f"block {ref} not found")
        data = self._io(lambda: self._read_slot(entry.slot))
        if len(data) == self._block_size and block_checksum(data) == entry.checksum:
            return data
        with self._lock:
            current = self._entries.get(ref)
        if current is None:
            raise BlockNotExist(f"block {ref} not found")  # deleted while we read
        if current != entry:
            return self.get_block(ref)  # replaced while we read; read the new one
        raise CorruptBlock(f"block {ref} in {self._path} slot {entry.slot} failed its checksum")

    def read_block_range(self, ref: BlockRef, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of the block with one ``pread`` and **no** checksum
        check (the caller verifies them, see :meth:`BlockStore.read_block_range`)."""
        if start < 0 or length < 0 or start + length > self._block_size:
            raise InvalidArgument(f"range {start}+{length} is outside a {self._block_size}-byte block")
        with self._lock:  # one short pread under the lock: the slot cannot move meanwhile
            self._check_open()
            entry = self._entries.get(ref)
            if entry is None:
                raise BlockNotExist(f"block {ref} not found")
            return os.pread(self._data_fd, length, entry.slot * self._block_size + start)

    def write_block_crc32(self, ref: BlockRef, data: bytes | bytearray | memoryview, crc32: int) -> None:
        """:meth:`write_block` reusing the caller's CRC-32 of the padded block (the record's
        checksum is that same CRC-32, see :func:`~torus_blockstore_file.layout.block_checksum`)."""
        self.write_block(ref, data, _checksum=crc32)

    def write_block(
        self, ref: BlockRef, data: bytes | bytearray | memoryview, *, _checksum: int | None = None
    ) -> None:
        """Store ``data`` (zero-padded) under ``ref``; see the module docstring for the protocol."""
        view = memoryview(data)
        size = view.nbytes
        if size > self._block_size:
            raise InvalidArgument(f"block data is {size} bytes, block size is {self._block_size}")
        if size == self._block_size and view.c_contiguous and view.format == "B":
            block: bytes | memoryview = view  # written as is: no copy of a full block
        else:
            block = view.tobytes() + bytes(self._block_size - size)
        checksum = block_checksum(block) if _checksum is None else _checksum
        with self._lock:
            self._check_open()
            existing = self._entries.get(ref)
            slot = self._allocate() if existing is None else -1
        if existing is not None:
            self._rewrite(ref, existing, block, checksum)
            return
        try:
            self._check_reserve(slot)
            with disk_full_is_out_of_space(f"file block store {self._path}"):
                self._io(lambda: os.pwrite(self._data_fd, block, slot * self._block_size))
        except BaseException:
            with self._lock:
                self._free.add(slot)  # its record is still durably zero
            raise
        with self._lock:
            raced = self._entries.get(ref)
            if raced is None and not self._closed:
                seq = self._next_seq
                self._next_seq += 1
                try:
                    with disk_full_is_out_of_space(f"file block store {self._path}"):
                        os.pwrite(self._index_fd, Record(ref, seq, checksum).pack(), record_offset(slot))
                except BaseException:
                    self._free.add(slot)  # no record names it
                    raise
                self._entries[ref] = _Entry(slot, checksum, seq)
                self._backed.add(slot)
                return
            self._backed.add(slot)
            self._free.add(slot)
            self._check_open()
        assert raced is not None
        self._rewrite(ref, raced, block, checksum)

    def _rewrite(self, ref: BlockRef, existing: _Entry, block: bytes | memoryview, checksum: int) -> None:
        """Handle a write to an existing ref: no-op if identical, else BlockExists.

        If the stored copy is corrupt and ``block`` matches the recorded checksum, the slot is
        repaired in place.
        """
        if checksum != existing.checksum:
            raise BlockExists(f"block {ref} already stored with different content")
        stored = self._io(lambda: self._read_slot(existing.slot))
        if stored == block:
            return
        if block_checksum(stored) == existing.checksum:
            raise BlockExists(f"block {ref} already stored with different content")

        def repair() -> None:
            with self._lock:
                if self._entries.get(ref) != existing:
                    return
                os.pwrite(self._data_fd, block, existing.slot * self._block_size)

        self._io(repair)

    def delete_block(self, ref: BlockRef) -> None:
        """Remove ``ref``; its slot is reused only after the removal is durable."""
        with self._lock:
            self._check_open()
            entry = self._entries.pop(ref, None)
            if entry is None:
                raise BlockNotExist(f"block {ref} not found")
            os.pwrite(self._index_fd, ZERO_RECORD, record_offset(entry.slot))
            self._pending.append(entry.slot)

    def flush(self) -> None:
        """fsync data, then the index; every block written before the call is then durable."""
        with self._flush_lock:
            with self._lock:
                self._check_open()
                upto = self._next_seq - 1
                pending, self._pending = self._pending, []
                self._inflight += 1
            try:
                try:
                    with disk_full_is_out_of_space(f"file block store {self._path} (flush)"):
                        self._sync_files()
                except BaseException:
                    with self._lock:
                        self._pending.extend(pending)  # their zero records are not durable yet
                    raise
                with self._lock:
                    self._free.update(pending)
                    self._write_durable(upto)
            finally:
                with self._lock:
                    self._inflight -= 1
                    if self._inflight == 0:
                        self._idle.notify_all()

    def close(self) -> None:
        """Flush, persist the durable mark, unlock and close the files. Idempotent."""
        with self._lock:
            if self._closed:
                return
        try:
            self.flush()
            with self._flush_lock, self._lock:
                if self._options.fsync:
                    os.fsync(self._index_fd)
        except Closed:
            return
        finally:
            with self._lock:
                self._closed = True
                while self._inflight:
                    self._idle.wait(timeout=1.0)
                self._release_fds()
                self._entries = {}
                self._free = BitMap()
                self._pending = []

    def __repr__(self) -> str:
        return (
            f"FileBlockStore(path={self._path!r}, block_size={self._block_size}, capacity={self._capacity})"
        )
