"""A volume as a thin-provisioned virtual file (Go: ``torus.File``), with a write-back cache.

Data path (inventory §1.3/§1.4, improved):

* **Whole-block writes** land in a bounded in-memory cache of dirty blocks (``cache_bytes``);
  when it is full they go straight to the blockset.
* **Partial writes** never read the old block up front and never hold a whole block in memory:
  their bytes go to a *staging file* (an unlinked temporary file, sparse, one block-sized region
  per block; it lives in the page cache, not in the process) and the file records which byte
  ranges of the block are new. The stored block is merged in only when the block is flushed
  (a hole needs no read at all). At most ``staging_bytes`` worth of blocks are staged; beyond
  that the least recently written staged block is flushed. A partial write to a block held in
  memory updates that buffer.
* Reads see dirty data (memory, staged ranges); clean bytes come from the blockset (holes
  without I/O). A partial read of a clean block asks the blockset for just that range
  (:meth:`Blockset.get_block_range`: the ``crc`` layer checks it page by page).
* The first mutation after a sync asks the injected ``allocate_inode()`` for the new INode number;
  new blocks get refs minted under it. :meth:`File.sync` flushes dirty blocks and the store,
  writes the new INode through the :class:`~torus_core.inode.INodeStore` and calls the injected
  ``commit(ref)`` (the metadata service's fenced commit). Any failure propagates and keeps the
  file's state, so ``sync`` can be retried; a retry whose INode content changed meanwhile takes a
  fresh INode number rather than touching the INode blocks already written.
* ``trim`` turns whole blocks into holes and zeroes partial edge blocks in place (the original
  left edges untouched).
* Read-only files (opened snapshots) raise :class:`~torus_core.errors.Locked` on every mutation,
  like the original's ``ErrLocked``.

All public methods hold one re-entrant lock, so the file may be shared between threads.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO, Required, TypedDict, Unpack

from torus_core.blockset import DEFAULT_BLOCK_SPEC, Blockset, create_blockset, unmarshal_blockset
from torus_core.blockset.base import BaseLayer
from torus_core.blockstore import BlockStore
from torus_core.errors import InvalidArgument, Locked, TorusError, WouldBlock
from torus_core.inode import VIRTUAL_INODE, INode, INodeStore, virtual_inode
from torus_core.journal.record import KIND_REF, Extent
from torus_core.refs import BlockRef, INodeRef
from torus_core.registry import Registry

log = logging.getLogger(__name__)

#: Default bound of the in-memory write-back cache (whole dirty blocks).
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024
#: Default bound of staged blocks for served volumes (staged bytes live in the page cache, not
#: in the process; a FLUSH has to merge and write them all, about 0.5 ms per 512 KiB block).
DEFAULT_STAGING_BYTES = 1024 * 1024 * 1024
#: Blocks named to the store's ``prefetch`` ahead of a sequential read (a cluster's read-ahead).
READ_AHEAD_BLOCKS = 8
_U64 = (1 << 64) - 1
#: INode attribute: the journal sequence number a checkpoint covers (records up to it are in it)
JOURNAL_SEQ_ATTR = "torus.journal_seq"
#: Bytes of data per journal record (a flush of more makes several records)
JOURNAL_CHUNK = 16 * 1024 * 1024

Data = bytes | bytearray | memoryview


class _Ranges:
    """Sorted disjoint ``[start, end)`` byte ranges of one staged block (touching ones merge)."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        starts, ends = self.starts, self.ends
        lo = bisect_left(ends, start)
        hi = bisect_right(starts, end)
        if lo < hi:
            start = min(start, starts[lo])
            end = max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]

    def covers(self, start: int, end: int) -> bool:
        """Whether one range holds all of ``[start, end)``."""
        k = bisect_right(self.starts, start) - 1
        return k >= 0 and self.ends[k] >= end

    def segments(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """``(s, e, staged)`` pieces covering ``[start, end)`` in order."""
        out: list[tuple[int, int, bool]] = []
        starts, ends = self.starts, self.ends
        k = bisect_right(ends, start)
        pos = start
        while pos < end and k < len(starts):
            s, e = starts[k], ends[k]
            if s >= end:
                break
            if s > pos:
                out.append((pos, s, False))
                pos = s
            stop = min(e, end)
            out.append((pos, stop, True))
            pos = stop
            k += 1
        if pos < end:
            out.append((pos, end, False))
        return out


def _check_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
        raise InvalidArgument(f"{name} must be a non-negative integer, got {value!r}")


class FileOptions(TypedDict, total=False):
    """The keyword arguments :meth:`File.open` passes on to the :class:`File` constructor
    (see there); ``layer_registry`` is required."""

    allocate_inode: Callable[[], int] | None
    commit: Callable[[INodeRef], None] | None
    on_commit: Callable[[INodeRef, list[BlockRef]], None] | None
    read_only: bool
    block_spec: str
    layer_registry: Required[Registry]
    cache_bytes: int
    staging_bytes: int | None
    staging_dir: str | None
    journaled: bool


class File:
    """Random-access bytes of one volume, backed by a blockset over a block store."""

    def __init__(
        self,
        inode: INode,
        store: BlockStore,
        *,
        inode_store: INodeStore | None = None,
        allocate_inode: Callable[[], int] | None = None,
        commit: Callable[[INodeRef], None] | None = None,
        on_commit: Callable[[INodeRef, list[BlockRef]], None] | None = None,
        read_only: bool = False,
        block_spec: str = DEFAULT_BLOCK_SPEC,
        layer_registry: Registry,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        staging_bytes: int | None = None,
        staging_dir: str | None = None,
        journaled: bool = False,
    ) -> None:
        """Open ``inode``; an INode without layers (a fresh volume) gets a ``block_spec`` blockset.

        ``layer_registry`` resolves the blockset layers (the process's registry, or
        :func:`~torus_core.blockset.default_layer_registry` for the built-in layers only).
        ``allocate_inode`` and ``commit`` are required for writable files. After each successful
        commit, ``on_commit(ref, freed)`` (if given) receives the blocks that the committed INode
        no longer names: superseded data blocks and the INode blocks of the INode before the
        previous one (kept one commit longer for readers of the just-replaced INode). The callee
        decides what may be deleted (snapshots and clones may still hold some). ``staging_bytes``
        bounds the blocks with staged partial writes (default: ``cache_bytes``); the staging
        file is created in ``staging_dir`` (default: the system temporary directory).

        ``journaled``: the owner makes FLUSHes durable through a write journal
        (:meth:`take_journal`) and folds them in with :meth:`checkpoint`; the file then tracks
        the byte ranges written since the last :meth:`take_journal`, and blocks written before
        a commit are only freed after it (a journal record may name them).
        """
        if not read_only and (allocate_inode is None or commit is None):
            raise InvalidArgument("a writable File needs allocate_inode and commit callbacks")
        _check_int("cache_bytes", cache_bytes)
        if staging_bytes is not None:
            _check_int("staging_bytes", staging_bytes)
        self._store = store
        self._bs = store.block_size
        self._inode_store = inode_store if inode_store is not None else INodeStore(store)
        self._allocate = allocate_inode
        self._commit = commit
        self.read_only = read_only
        self._volume = inode.volume
        self._attrs = dict(inode.attrs)
        self._size = inode.filesize
        n_blocks = -(-self._size // self._bs)
        if inode.blocks:
            self._blockset: Blockset = unmarshal_blockset(inode.blocks, store, layer_registry)
        else:
            self._blockset = create_blockset(block_spec, store, layer_registry)
        if self._blockset.length < n_blocks:
            self._blockset.truncate(n_blocks)
        self._superseded_sink: list[BlockRef] = []
        #: journaled files: refs superseded before the last commit, freed after the next one
        self._held_superseded: list[BlockRef] = []
        #: journaled files: refs named by REF records made since the last commit
        self._ref_named: set[BlockRef] = set()
        if not read_only:
            self._blockset.set_superseded_sink(self._superseded_sink)
        self._committed = inode.ref
        self._on_commit = on_commit
        #: refs the blockset stopped naming since the last commit (``_superseded_sink``) are
        #: handed to ``on_commit`` after the next one
        #: store blocks of the committed INode, and of the one committed before it
        self._committed_inode_blocks = self._inode_store.block_refs(inode)
        self._retired_inode_blocks: list[BlockRef] = []
        self._write_inode: int | None = None
        self._pending: INode | None = None
        self._max_dirty = max(1, cache_bytes // self._bs)
        self._max_staged = max(1, (cache_bytes if staging_bytes is None else staging_bytes) // self._bs)
        #: whole dirty blocks held in memory (every byte valid), least recently written first
        self._dirty: OrderedDict[int, bytearray] = OrderedDict()
        #: blocks with partial writes in the staging file: the byte ranges that are new
        self._staged: OrderedDict[int, _Ranges] = OrderedDict()
        self._staging_dir = staging_dir
        self._staging: BinaryIO | None = None
        self._staging_fd = -1
        self._zero_block = bytes(self._bs)
        self._lock = threading.RLock()
        self._journaled = journaled
        #: byte ranges of the file written since the last take_journal (journaled files only)
        self._unjournaled = _Ranges()
        #: the store's read-ahead hint (``Distributor.prefetch``), if it declares one that fetches
        self._prefetch: Callable[[list[BlockRef]], object] | None = (
            store.prefetch if store.prefetches else None
        )
        #: read clean blocks after releasing the lock (their store is networked: see read_at)
        self._read_unlocked = store.prefetches
        #: last block of the previous read (sequential-access detection for read-ahead)
        self._last_read_block = -2
        #: :meth:`watch_superseded`: blocks superseded since the last commit at which
        #: ``_on_superseded`` is called (under the lock; it must not block)
        self._superseded_limit = 0
        self._on_superseded: Callable[[], None] | None = None

    @classmethod
    def open(
        cls,
        store: BlockStore,
        ref: INodeRef,
        *,
        volume_size: int | None = None,
        inode_store: INodeStore | None = None,
        **options: Unpack[FileOptions],
    ) -> File:
        """Open the INode ``ref``; INode 1 is the virtual empty INode of a ``volume_size`` volume.

        ``options`` are the constructor's keyword arguments (:class:`FileOptions`).
        """
        istore = inode_store if inode_store is not None else INodeStore(store)
        if ref.inode == VIRTUAL_INODE:
            if volume_size is None:
                raise InvalidArgument("opening the virtual INode 1 needs the volume size")
            inode = virtual_inode(ref.volume, volume_size)
        else:
            inode = istore.get_inode(ref)
        return cls(inode, store, inode_store=istore, **options)

    # --- properties ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """File size in bytes."""
        return self._size

    @property
    def block_size(self) -> int:
        """Block size of the underlying store."""
        return self._bs

    @property
    def committed_ref(self) -> INodeRef:
        """The INode this file was opened at or last committed."""
        return self._committed

    @property
    def blockset(self) -> Blockset:
        """The live blockset (for GC marking and diagnostics; do not mutate)."""
        return self._blockset

    def dirty_blocks(self) -> int:
        """Number of blocks waiting to be flushed (in memory or staged)."""
        return len(self._dirty) + len(self._staged)

    def superseded_blocks(self) -> int:
        """Blocks this file stopped naming since its last commit, plus those held back one
        commit for the journal: store space that the next commit (or two) gives back."""
        return len(self._superseded_sink) + len(self._held_superseded)

    def superseded_since_commit(self) -> int:
        """Blocks this file stopped naming since its last commit (freed by the next one, or one
        later if a journal record names them)."""
        return len(self._superseded_sink)

    def watch_superseded(self, limit_bytes: int, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (under the file's lock: it must only signal, never block) after a
        mutation that leaves at least ``limit_bytes`` of superseded blocks waiting for a commit
        (:meth:`superseded_blocks`); a journaled volume's checkpointer uses it to commit, and so
        free them, without waiting for a FLUSH. ``None`` turns it off."""
        _check_int("limit_bytes", limit_bytes)
        with self._lock:
            self._superseded_limit = max(1, limit_bytes // self._bs)
            self._on_superseded = callback

    def _note_superseded(self) -> None:
        cb = self._on_superseded
        if cb is not None and len(self._superseded_sink) >= self._superseded_limit:
            cb()

    def is_write_open(self) -> bool:
        """True between the first mutation and the next successful sync."""
        return self._write_inode is not None

    # --- internals --------------------------------------------------------------------------

    def _open_write(self) -> INodeRef:
        if self.read_only:
            raise Locked("file is read-only (a snapshot)")
        if self._write_inode is None:
            assert self._allocate is not None
            n = self._allocate()
            _check_int("allocated inode number", n)
            self._write_inode = n
            if self._pending is None and not self._journaled:
                # No INode numbered n exists anywhere yet: blocks minted under it that get
                # replaced before the next sync are garbage and are deleted right away.
                self._blockset.set_reclaim(INodeRef(self._volume, n))
        return INodeRef(self._volume, self._write_inode)

    def _staging_file(self) -> int:
        if self._staging_fd < 0:
            self._staging = tempfile.TemporaryFile(prefix="torus-staging-", dir=self._staging_dir)
            self._staging_fd = self._staging.fileno()
        return self._staging_fd

    def _clean_range(self, i: int, s: int, k: int) -> bytes:
        """Bytes ``[s, s+k)`` of block ``i`` as stored (not dirty)."""
        if self._blockset.is_hole(i):
            return self._zero_block[:k] if k < self._bs else self._zero_block
        if k == self._bs:
            return self._blockset.get_block(i)
        return self._blockset.get_block_range(i, s, k)

    def _staged_range(self, i: int, ranges: _Ranges, s: int, k: int) -> bytes:
        """Bytes ``[s, s+k)`` of staged block ``i``: staged ranges over the stored block."""
        fd = self._staging_fd
        base = i * self._bs
        if ranges.covers(s, s + k):
            return os.pread(fd, k, base + s)
        parts = [
            os.pread(fd, b - a, base + a) if staged else self._clean_range(i, a, b - a)
            for a, b, staged in ranges.segments(s, s + k)
        ]
        return b"".join(parts)

    def _materialize(self, i: int, ranges: _Ranges) -> bytearray:
        """The whole new content of staged block ``i``."""
        bs = self._bs
        if ranges.covers(0, bs) or self._blockset.is_hole(i):
            buf = bytearray(bs)
        else:
            buf = bytearray(self._blockset.get_block(i))
        mv = memoryview(buf)
        fd = self._staging_fd
        base = i * bs
        for a, b in zip(ranges.starts, ranges.ends, strict=True):
            got = os.preadv(fd, [mv[a:b]], base + a)
            if got != b - a:
                raise OSError(f"short read of the staging file: {got} of {b - a} bytes")
        return buf

    def _flush_staged(self, i: int, ref: INodeRef) -> None:
        ranges = self._staged[i]
        self._blockset.put_block(ref, i, self._materialize(i, ranges))
        del self._staged[i]

    def _flush_mem(self, i: int, ref: INodeRef) -> None:
        self._blockset.put_block(ref, i, self._dirty[i])
        del self._dirty[i]

    def _evict(self, ref: INodeRef) -> None:
        while len(self._dirty) > self._max_dirty:
            self._flush_mem(next(iter(self._dirty)), ref)
        while len(self._staged) > self._max_staged:
            self._flush_staged(next(iter(self._staged)), ref)

    def _grow(self, new_size: int) -> None:
        n_blocks = -(-new_size // self._bs)
        if n_blocks > self._blockset.length:
            self._blockset.truncate(n_blocks)
        self._size = new_size

    def _write_partial(self, i: int, start: int, chunk: Data) -> None:
        """Put ``chunk`` at ``start`` in block ``i`` (less than a whole block)."""
        end = start + len(chunk)
        buf = self._dirty.get(i)
        if buf is not None:
            buf[start:end] = chunk
            self._dirty.move_to_end(i)
            return
        fd = self._staging_file()
        written = os.pwrite(fd, chunk, i * self._bs + start)
        if written != end - start:
            raise OSError(f"short write to the staging file: {written} of {end - start} bytes")
        ranges = self._staged.get(i)
        if ranges is None:
            ranges = self._staged[i] = _Ranges()
        else:
            self._staged.move_to_end(i)
        ranges.add(start, end)

    def _zero_partial(self, i: int, start: int, end: int) -> None:
        if i not in self._dirty and i not in self._staged and self._blockset.is_hole(i):
            return  # already zeros
        self._write_partial(i, start, self._zero_block[: end - start])

    def _read_ahead(self, first: int, last: int) -> None:
        """Note a read of blocks ``first..last``; when it continues the previous read into a new
        block, name the refs of the next stored (not hole, not dirty) blocks to the store's
        ``prefetch`` so a cluster fetches them from peers in the background."""
        prev, self._last_read_block = self._last_read_block, last
        if self._prefetch is None or not prev <= first <= prev + 1 or last <= prev:
            return
        base = self._blockset.layers()[-1]
        if not isinstance(base, BaseLayer):
            return
        stop = min(last + 1 + READ_AHEAD_BLOCKS, base.length)
        refs = [
            ref
            for j in range(last + 1, stop)
            if j not in self._dirty and j not in self._staged and not (ref := base.ref_at(j)).is_zero()
        ]
        if refs:
            try:
                self._prefetch(refs)
            except TorusError:
                pass  # only a hint: the reads themselves report any error

    def _drop_dirty(self, first: int, last: int | None = None) -> None:
        """Forget dirty state of blocks ``first <= i < last`` (to the end if ``last`` is None)."""
        for cache in (self._dirty, self._staged):
            for i in [i for i in cache if i >= first and (last is None or i < last)]:
                del cache[i]

    # --- public API -------------------------------------------------------------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short (or empty) at the end of the file.

        On a store whose blocks live elsewhere (``BlockStore.prefetches``: a cluster), clean
        blocks are read **after** the file lock is released, so reads of remote blocks by
        several threads overlap instead of queueing on the lock for one network round trip
        each (see :meth:`_read_clean_unlocked`)."""
        _check_int("offset", offset)
        _check_int("length", length)
        clean: list[tuple[int, int, int, int]] = []  # (index in parts, block, start, length)
        with self._lock:
            end = min(offset + length, self._size)
            if offset >= end:
                return b""
            bs = self._bs
            self._read_ahead(offset // bs, (end - 1) // bs)
            parts: list[bytes | memoryview] = []
            pos = offset
            while pos < end:
                i, s = divmod(pos, bs)
                k = min(bs - s, end - pos)
                buf = self._dirty.get(i)
                if buf is not None:
                    part = memoryview(buf)[s : s + k]
                    parts.append(bytes(part) if self._read_unlocked else part)
                else:
                    ranges = self._staged.get(i)
                    if ranges is not None:
                        parts.append(self._staged_range(i, ranges, s, k))
                    elif self._read_unlocked:
                        clean.append((len(parts), i, s, k))
                        parts.append(b"")
                    else:
                        parts.append(self._clean_range(i, s, k))
                pos += k
            if not clean:  # joined under the lock: parts may be views of dirty blocks
                if len(parts) == 1 and isinstance(parts[0], bytes):
                    return parts[0]
                return b"".join(parts)
        for n, i, s, k in clean:
            parts[n] = self._read_clean_unlocked(i, s, k)
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def _read_clean_unlocked(self, i: int, s: int, k: int) -> bytes:
        """Bytes ``[s, s+k)`` of block ``i``, found clean under the lock, read without it.

        Blocks are immutable per ref, so the read returns the block as it was when found clean,
        or -- if a later write was flushed into the blockset meanwhile -- as it is now: either
        is a valid answer for a read concurrent with that write. A read that fails on the way
        (the flush deleted the old ref, replaced the slot's CRC, or a trim shrank the tables) is
        done again under the lock, whose answer (data or error) is authoritative."""
        try:
            return self._clean_range(i, s, k)
        except WouldBlock:
            raise  # inside nonblocking_reads: the caller sends the read to a worker
        except Exception as exc:  # anything: the locked read below decides
            log.debug("unlocked read of block %d failed (%s); reading it under the lock", i, exc)
        with self._lock:
            buf = self._dirty.get(i)
            if buf is not None:
                return bytes(memoryview(buf)[s : s + k])
            ranges = self._staged.get(i)
            if ranges is not None:
                return self._staged_range(i, ranges, s, k)
            return self._clean_range(i, s, k)

    def write_at(self, offset: int, data: Data) -> int:
        """Write ``data`` at ``offset`` (growing the file if needed); returns the byte count."""
        _check_int("offset", offset)
        mv = memoryview(data).cast("B")
        n = len(mv)
        with self._lock:
            ref = self._open_write()
            if n == 0:
                return 0
            end = offset + n
            if end > self._size:
                self._grow(end)
            if self._journaled:
                self._unjournaled.add(offset, end)
            bs = self._bs
            pos = offset
            while pos < end:
                i, s = divmod(pos, bs)
                k = min(bs - s, end - pos)
                chunk = mv[pos - offset : pos - offset + k]
                if k == bs:
                    self._staged.pop(i, None)
                    buf = self._dirty.get(i)
                    if buf is not None:
                        buf[:] = chunk
                        self._dirty.move_to_end(i)
                    elif len(self._dirty) < self._max_dirty:
                        self._dirty[i] = bytearray(chunk)
                    else:  # cache full: whole blocks go straight through
                        self._blockset.put_block(ref, i, chunk)
                else:
                    self._write_partial(i, s, chunk)
                    self._evict(ref)
                pos += k
            self._note_superseded()
            return n

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """:meth:`read_at` if the lock is free right now, else None (nothing done)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            bs = self._bs
            if type(offset) is int and type(length) is int and offset >= 0 and length > 0:
                i, s = divmod(offset, bs)
                if s + length <= bs and offset + length <= self._size:  # one block: no loop
                    if i != self._last_read_block:
                        self._read_ahead(i, i)
                    buf = self._dirty.get(i)
                    if buf is not None:
                        return bytes(memoryview(buf)[s : s + length])
                    ranges = self._staged.get(i)
                    if ranges is not None:
                        return self._staged_range(i, ranges, s, length)
                    return self._clean_range(i, s, length)
            return self.read_at(offset, length)
        finally:
            self._lock.release()

    def write_nowait(self, offset: int, data: Data) -> bool:
        """:meth:`write_at` if it needs neither waiting for the lock nor metadata or block-store
        I/O (only the cache and the staging file); False with nothing done otherwise."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._write_inode is None or self.read_only:
                return False  # the first write after a sync allocates an INode number
            if isinstance(data, memoryview):
                data = data.cast("B")
            n = len(data)
            if type(offset) is not int or offset < 0 or offset + n > self._size:
                return False
            bs = self._bs
            i, s = divmod(offset, bs)
            if (0 < n and s + n < bs) or (s and s + n == bs):  # part of one block: the common case
                buf = self._dirty.get(i)
                if buf is not None:
                    buf[s : s + n] = data
                    self._dirty.move_to_end(i)
                    if self._journaled:
                        self._unjournaled.add(offset, offset + n)
                    return True
                if i not in self._staged and len(self._staged) >= self._max_staged:
                    return False  # would flush a staged block
                self._write_partial(i, s, data)
                if self._journaled:
                    self._unjournaled.add(offset, offset + n)
                return True
            staged_new = 0
            pos, end = offset, offset + n
            while pos < end:
                i, s = divmod(pos, bs)
                k = min(bs - s, end - pos)
                if i not in self._dirty:
                    if k == bs:
                        if len(self._dirty) >= self._max_dirty:
                            return False  # would go straight to the block store
                    elif i not in self._staged:
                        staged_new += 1
                pos += k
            if staged_new and len(self._staged) + staged_new > self._max_staged:
                return False  # would flush a staged block
            self.write_at(offset, data)
            return True
        finally:
            self._lock.release()

    def truncate(self, size: int) -> None:
        """Set the size; growing adds holes, shrinking drops blocks and zeroes the new tail."""
        _check_int("size", size)
        with self._lock:
            ref = self._open_write()
            if size >= self._size:
                self._grow(size)
                return
            bs = self._bs
            n_blocks = -(-size // bs)
            self._drop_dirty(n_blocks)
            self._blockset.truncate(n_blocks)
            if size % bs:
                self._zero_partial(n_blocks - 1, size % bs, bs)
            self._size = size
            self._evict(ref)

    def trim(self, offset: int, length: int) -> None:
        """Discard a range: whole blocks become holes, partial edges are zeroed in place."""
        _check_int("offset", offset)
        _check_int("length", length)
        with self._lock:
            ref = self._open_write()
            end = min(offset + length, self._size)
            if offset >= end:
                return
            if self._journaled:
                self._unjournaled.add(offset, end)
            bs = self._bs
            first_full = -(-offset // bs)
            last_full = end // bs
            if first_full < last_full:
                self._blockset.trim(first_full, last_full)
                self._drop_dirty(first_full, last_full)
                edges = [(offset, first_full * bs), (last_full * bs, end)]
            else:
                edges = [(offset, end)]
            for s, e in edges:
                while s < e:  # an edge range may straddle one block boundary
                    i = s // bs
                    stop = min(e, (i + 1) * bs)
                    self._zero_partial(i, s - i * bs, stop - i * bs)
                    s = stop
            self._evict(ref)
            self._note_superseded()

    def write_zeroes(self, offset: int, length: int, *, punch_hole: bool = True) -> None:
        """Make a range read as zeros (growing the file if needed).

        With ``punch_hole`` (the default) whole blocks become holes; otherwise zeros are written.
        """
        _check_int("offset", offset)
        _check_int("length", length)
        with self._lock:
            self._open_write()
            end = offset + length
            if length and end > self._size:
                self._grow(end)
            if punch_hole:
                self.trim(offset, length)
                return
            pos = offset
            while pos < end:
                k = min(self._bs - pos % self._bs, end - pos)
                self.write_at(pos, self._zero_block[:k])
                pos += k

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``(length, is_hole)`` runs covering ``[offset, offset+length)`` clamped to the size."""
        _check_int("offset", offset)
        _check_int("length", length)
        with self._lock:
            end = min(offset + length, self._size)
            out: list[tuple[int, bool]] = []
            pos = offset
            bs = self._bs
            while pos < end:
                i, s = divmod(pos, bs)
                k = min(bs - s, end - pos)
                hole = i not in self._dirty and i not in self._staged and self._blockset.is_hole(i)
                if out and out[-1][1] == hole:
                    out[-1] = (out[-1][0] + k, hole)
                else:
                    out.append((k, hole))
                pos += k
            return out

    def flush_blocks(self) -> None:
        """Write every dirty block to the blockset and flush the store (no INode commit)."""
        with self._lock:
            self._write_dirty()
            self._store.flush()

    def _write_dirty(self) -> None:
        """Write every dirty and staged block to the blockset, without flushing the store."""
        if self._dirty or self._staged:
            ref = self._open_write()
            for i in sorted(self._dirty):
                self._flush_mem(i, ref)
            for i in sorted(self._staged):
                self._flush_staged(i, ref)
            self._drop_staging_file()

    def _drop_staging_file(self) -> None:
        """Start a fresh staging file and free the old one's space in the background (lock held).

        Freeing a large staging file whose writes the kernel already allocated can take seconds
        (measured 12.6 s for 1 GiB of scattered 4 KiB writes on ext4 mounted with ``discard``);
        done here, under the file's lock, it stalled every write and flush for that long.
        """
        old = self._staging
        if old is None:
            return
        self._staging = None
        self._staging_fd = -1
        threading.Thread(target=old.close, name="torus-staging-free", daemon=True).start()

    def sync(self, attrs: dict[str, str] | None = None) -> INodeRef | None:
        """Flush, store the new INode and commit it; None if nothing changed since the last sync.

        ``attrs`` are set on the new INode (only if there is one to commit). Raises whatever
        flushing, storing or ``commit`` raised; the file then stays write-open with its state
        intact, and ``sync`` may be retried.
        """
        with self._lock:
            if self._write_inode is None:
                return None
            if attrs:
                self._attrs.update(attrs)
            # Data blocks and the INode go to the store first and are made durable by one flush
            # (one replication round in a cluster) before the commit names them.
            self._write_dirty()
            inode = self._current_inode()
            pending = self._pending
            if pending is not None and pending.inode == inode.inode and pending != inode:
                # an earlier attempt stored a different INode under this number and its commit
                # failed: never rewrite (or delete) it, take a new number instead
                self._write_inode = None
                self._open_write()
                inode = self._current_inode()
            self._blockset.set_reclaim(None)  # from here on an INode may name these refs
            self._inode_store.write_inode(inode)
            self._pending = inode
            self._store.flush()
            assert self._commit is not None
            self._commit(inode.ref)
            self._pending = None
            self._write_inode = None
            self._committed = inode.ref
            self._after_commit(inode)
            return inode.ref

    def _after_commit(self, inode: INode) -> None:
        """Hand the blocks ``inode`` no longer names to ``on_commit`` (errors only logged).

        A journaled file hands a superseded block over one commit later if a REF record made
        since the previous commit names it: such a record may be numbered after this
        checkpoint's position, and replay after a crash needs the block until the next
        checkpoint covers that record. (Records made before the previous commit are all at or
        below this checkpoint's position, which was taken after that commit.)
        """
        if self._journaled:
            named = self._ref_named
            freed = [*self._held_superseded, *self._retired_inode_blocks]
            freed += [r for r in self._superseded_sink if r not in named]
            self._held_superseded = [r for r in self._superseded_sink if r in named]
            self._ref_named = set()
        else:
            freed = [*self._superseded_sink, *self._retired_inode_blocks]
        self._superseded_sink.clear()
        self._retired_inode_blocks = self._committed_inode_blocks
        self._committed_inode_blocks = self._inode_store.block_refs(inode)
        if self._on_commit is not None and freed:
            try:
                self._on_commit(inode.ref, freed)
            except TorusError as exc:  # the blocks stay for the garbage collector
                log.warning("freeing %d superseded block(s) of volume %d: %s", len(freed), self._volume, exc)

    # --- journal support -------------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, str]:
        """The INode attributes (a copy)."""
        with self._lock:
            return dict(self._attrs)

    def take_journal(
        self, submit: Callable[[list[Extent]], int], *, ref_fraction: float = 0.25
    ) -> int | None:
        """Turn the byte ranges written since the last call into journal extents and hand them
        to ``submit`` (which numbers and queues one record per call) under the file's lock, so
        records are numbered in the order of the writes they carry. Returns the last sequence
        number ``submit`` gave, or None if nothing was written.

        A block of which at least ``ref_fraction`` was rewritten is written to the store as a
        new block and journaled as a REF extent; the store is flushed before ``submit`` so the
        record never names a block that is not durable. Other ranges are copied (DATA), and
        ranges reading as zeros become ZERO extents.

        If anything fails before every record was handed to ``submit``, the ranges stay marked
        as not journaled (a later flush retries them; nothing is reported durable that is not).
        """
        with self._lock:
            rng = self._unjournaled
            if not rng.starts:
                return None
            self._unjournaled = _Ranges()
            try:
                return self._journal_ranges(rng, submit, ref_fraction)
            except BaseException:
                for a, b in zip(rng.starts, rng.ends, strict=True):
                    self._unjournaled.add(a, b)
                raise

    def _journal_ranges(
        self, rng: _Ranges, submit: Callable[[list[Extent]], int], ref_fraction: float
    ) -> int | None:
        """:meth:`take_journal`'s work on the taken ranges (lock held)."""
        bs = self._bs
        per_block: dict[int, list[tuple[int, int]]] = {}
        for a, b in zip(rng.starts, rng.ends, strict=True):
            b = min(b, self._size)
            while a < b:
                i, s = divmod(a, bs)
                e = min(bs, s + b - a)
                per_block.setdefault(i, []).append((s, e))
                a += e - s
        base = self._blockset.layers()[-1]
        refs_ok = isinstance(base, BaseLayer)
        extents: list[Extent] = []
        wrote_blocks = False
        for i in sorted(per_block):
            segs = per_block[i]
            block_len = min(bs, self._size - i * bs)
            if refs_ok and sum(e - s for s, e in segs) >= bs * ref_fraction:
                wref = self._open_write()
                if i in self._dirty:
                    self._flush_mem(i, wref)
                    wrote_blocks = True
                elif i in self._staged:
                    self._flush_staged(i, wref)
                    wrote_blocks = True
                assert isinstance(base, BaseLayer)
                bref = base.ref_at(i)
                if bref.is_zero():
                    extents.append(Extent(i * bs, block_len))
                else:
                    extents.append(Extent(i * bs, block_len, bref.to_bytes(), KIND_REF))
                    self._ref_named.add(bref)
                    wrote_blocks = True
                continue
            for s, e in segs:
                data = self._block_bytes(i, s, e - s)
                if data == self._zero_block[: e - s]:
                    extents.append(Extent(i * bs + s, e - s))
                else:
                    extents.append(Extent(i * bs + s, e - s, bytes(data)))
        if wrote_blocks:
            self._store.flush()
        seq: int | None = None
        chunk: list[Extent] = []
        size = 0
        for ext in extents:
            n = len(ext.data) if ext.data is not None else 0
            if chunk and size + n + 64 > JOURNAL_CHUNK:
                seq = submit(chunk)
                chunk, size = [], 0
            chunk.append(ext)
            size += n + 16
        if chunk:
            seq = submit(chunk)
        return seq

    def release_held(self) -> None:
        """Hand the superseded blocks held back for the journal to ``on_commit`` now: call it
        once the journal holds nothing past the last checkpoint (the volume is closing and its
        journal was trimmed)."""
        with self._lock:
            held, self._held_superseded = self._held_superseded, []
        if held and self._on_commit is not None:
            try:
                self._on_commit(self._committed, held)
            except TorusError as exc:  # the blocks stay for the garbage collector
                log.warning("freeing %d superseded block(s) of volume %d: %s", len(held), self._volume, exc)

    def discard_unjournaled(self) -> None:
        """Forget the ranges written since the last :meth:`take_journal` (a replay's writes,
        already folded by a checkpoint)."""
        with self._lock:
            self._unjournaled = _Ranges()

    def _block_bytes(self, i: int, s: int, k: int) -> bytes | memoryview:
        """Current bytes ``[s, s+k)`` of block ``i`` (dirty, staged or stored)."""
        buf = self._dirty.get(i)
        if buf is not None:
            return memoryview(buf)[s : s + k]
        ranges = self._staged.get(i)
        if ranges is not None:
            return self._staged_range(i, ranges, s, k)
        return self._clean_range(i, s, k)

    def checkpoint(self, position: Callable[[], int]) -> tuple[INodeRef | None, int]:
        """Fold everything written so far into blocks, a new INode and a commit, without holding
        the file's lock for long: dirty blocks are written one at a time (writes and journal
        flushes go on in between), then the remaining ones, the INode and the commit under the
        lock. ``position()`` (called under the lock at the start) is the journal sequence number
        the checkpoint covers; it is stored in the INode attribute ``JOURNAL_SEQ_ATTR``.
        Returns the committed ref (None if nothing needed committing) and that position.
        """
        with self._lock:
            seq = position()
            todo = sorted({*self._dirty, *self._staged})
        for i in todo:
            with self._lock:
                if i in self._dirty:
                    self._flush_mem(i, self._open_write())
                elif i in self._staged:
                    self._flush_staged(i, self._open_write())
        if todo:
            self._store.flush()  # the bulk of the fsync work, outside the lock
        with self._lock:
            return self.sync({JOURNAL_SEQ_ATTR: str(seq)}), seq

    def close(self) -> None:
        """Release the staging file (dirty data not synced is dropped). Idempotent."""
        with self._lock:
            self._staged.clear()
            if self._staging is not None:
                self._staging.close()
                self._staging = None
                self._staging_fd = -1

    def _current_inode(self) -> INode:
        assert self._write_inode is not None
        return INode(self._volume, self._write_inode, self._size, dict(self._attrs), self._blockset.marshal())

    def __repr__(self) -> str:
        return (
            f"<File vol={self._volume} size={self._size} committed={self._committed.inode} "
            f"dirty={self.dirty_blocks()}{' ro' if self.read_only else ''}>"
        )
