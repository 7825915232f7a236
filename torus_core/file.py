"""A volume as a thin-provisioned virtual file (Go: ``torus.File``), with a write-back cache.

Data path (inventory §1.3/§1.4, improved):

* Writes land in a bounded **write-back cache** of dirty blocks (``cache_bytes``). A partial
  write does not read the old block up front: the cache records which byte ranges are new and
  merges them with the stored block only when the block is flushed or read (a hole needs no read
  at all). When the cache is full the least recently written blocks are flushed with
  ``put_block``; whole aligned blocks that do not fit go straight to the blockset.
* Reads see dirty data; clean blocks come from the blockset (holes without I/O) through a small
  read cache.
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

import threading
from collections import OrderedDict
from collections.abc import Callable

from torus_core.blockset import DEFAULT_BLOCK_SPEC, Blockset, create_blockset, unmarshal_blockset
from torus_core.blockstore import BlockStore
from torus_core.errors import InvalidArgument, Locked
from torus_core.inode import VIRTUAL_INODE, INode, INodeStore, virtual_inode
from torus_core.refs import INodeRef
from torus_core.registry import Registry

#: Default bound of the write-back cache.
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024
_READ_CACHE_BLOCKS = 8
_U64 = (1 << 64) - 1

Data = bytes | bytearray | memoryview


class _Dirty:
    """One dirty block: its buffer and, until merged with the stored block, the new ranges."""

    __slots__ = ("buf", "ranges")

    def __init__(self, buf: bytearray, ranges: list[tuple[int, int]] | None) -> None:
        self.buf = buf
        #: sorted disjoint ``(start, end)`` ranges holding new bytes; None = whole buffer valid
        self.ranges = ranges

    def add_range(self, start: int, end: int, size: int) -> None:
        if self.ranges is None:
            return
        merged: list[tuple[int, int]] = []
        for s, e in self.ranges:
            if e < start or s > end:
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        merged.append((start, end))
        merged.sort()
        self.ranges = None if merged == [(0, size)] else merged


def _check_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
        raise InvalidArgument(f"{name} must be a non-negative integer, got {value!r}")


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
        read_only: bool = False,
        block_spec: str = DEFAULT_BLOCK_SPEC,
        layer_registry: Registry | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        """Open ``inode``; an INode without layers (a fresh volume) gets a ``block_spec`` blockset.

        ``allocate_inode`` and ``commit`` are required for writable files.
        """
        if not read_only and (allocate_inode is None or commit is None):
            raise InvalidArgument("a writable File needs allocate_inode and commit callbacks")
        _check_int("cache_bytes", cache_bytes)
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
        self._committed = inode.ref
        self._write_inode: int | None = None
        self._pending: INode | None = None
        self._max_dirty = max(1, cache_bytes // self._bs)
        self._dirty: OrderedDict[int, _Dirty] = OrderedDict()
        self._read_cache: OrderedDict[int, bytes] = OrderedDict()
        self._zero_block = bytes(self._bs)
        self._lock = threading.RLock()

    @classmethod
    def open(
        cls,
        store: BlockStore,
        ref: INodeRef,
        *,
        volume_size: int | None = None,
        inode_store: INodeStore | None = None,
        **kwargs: object,
    ) -> File:
        """Open the INode ``ref``; INode 1 is the virtual empty INode of a ``volume_size`` volume."""
        istore = inode_store if inode_store is not None else INodeStore(store)
        if ref.inode == VIRTUAL_INODE:
            if volume_size is None:
                raise InvalidArgument("opening the virtual INode 1 needs the volume size")
            inode = virtual_inode(ref.volume, volume_size)
        else:
            inode = istore.get_inode(ref)
        return cls(inode, store, inode_store=istore, **kwargs)  # type: ignore[arg-type]

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
        """Number of blocks waiting in the write-back cache."""
        return len(self._dirty)

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
        return INodeRef(self._volume, self._write_inode)

    def _clean_block(self, i: int) -> bytes:
        if self._blockset.is_hole(i):
            return self._zero_block
        data = self._read_cache.get(i)
        if data is None:
            data = self._blockset.get_block(i)
            self._read_cache[i] = data
            if len(self._read_cache) > _READ_CACHE_BLOCKS:
                self._read_cache.popitem(last=False)
        return data

    def _materialize(self, i: int, entry: _Dirty) -> bytearray:
        if entry.ranges is not None:
            if not self._blockset.is_hole(i):
                merged = bytearray(self._clean_block(i))
                buf = entry.buf
                for s, e in entry.ranges:
                    merged[s:e] = buf[s:e]
                entry.buf = merged
            entry.ranges = None
        return entry.buf

    def _flush_one(self, i: int, entry: _Dirty, ref: INodeRef) -> None:
        buf = self._materialize(i, entry)
        self._blockset.put_block(ref, i, buf)
        self._read_cache.pop(i, None)

    def _evict(self, ref: INodeRef) -> None:
        while len(self._dirty) > self._max_dirty:
            i, entry = next(iter(self._dirty.items()))
            self._flush_one(i, entry, ref)
            del self._dirty[i]

    def _grow(self, new_size: int) -> None:
        n_blocks = -(-new_size // self._bs)
        if n_blocks > self._blockset.length:
            self._blockset.truncate(n_blocks)
        self._size = new_size

    def _write_partial(self, i: int, start: int, chunk: Data | None) -> None:
        """Put ``chunk`` (None = zeros of the remaining length) at ``start`` in block ``i``."""
        end = start + (len(chunk) if chunk is not None else 0)
        entry = self._dirty.get(i)
        if entry is None:
            entry = _Dirty(bytearray(self._bs), [])
            self._dirty[i] = entry
        else:
            self._dirty.move_to_end(i)
        if chunk is not None:
            entry.buf[start:end] = chunk
        entry.add_range(start, end, self._bs)
        self._read_cache.pop(i, None)

    def _zero_partial(self, i: int, start: int, end: int) -> None:
        entry = self._dirty.get(i)
        if entry is None and self._blockset.is_hole(i):
            return  # already zeros
        self._write_partial(i, start, self._zero_block[: end - start])

    # --- public API -------------------------------------------------------------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; short (or empty) at the end of the file."""
        _check_int("offset", offset)
        _check_int("length", length)
        with self._lock:
            end = min(offset + length, self._size)
            if offset >= end:
                return b""
            bs = self._bs
            parts: list[memoryview] = []
            pos = offset
            while pos < end:
                i, s = divmod(pos, bs)
                k = min(bs - s, end - pos)
                entry = self._dirty.get(i)
                data: bytes | bytearray = (
                    self._materialize(i, entry) if entry is not None else self._clean_block(i)
                )
                parts.append(memoryview(data)[s : s + k])
                pos += k
            return b"".join(parts)

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
            bs = self._bs
            pos = offset
            while pos < end:
                i, s = divmod(pos, bs)
                k = min(bs - s, end - pos)
                chunk = mv[pos - offset : pos - offset + k]
                if k == bs:
                    entry = self._dirty.get(i)
                    if entry is not None:
                        entry.buf[:] = chunk
                        entry.ranges = None
                        self._dirty.move_to_end(i)
                    elif len(self._dirty) < self._max_dirty:
                        self._dirty[i] = _Dirty(bytearray(chunk), None)
                    else:  # cache full: whole blocks go straight through
                        self._blockset.put_block(ref, i, chunk)
                    self._read_cache.pop(i, None)
                else:
                    self._write_partial(i, s, chunk)
                    self._evict(ref)
                pos += k
            return n

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
            for i in [i for i in self._dirty if i >= n_blocks]:
                del self._dirty[i]
            self._blockset.truncate(n_blocks)
            self._read_cache.clear()
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
            bs = self._bs
            first_full = -(-offset // bs)
            last_full = end // bs
            if first_full < last_full:
                self._blockset.trim(first_full, last_full)
                for i in [i for i in self._dirty if first_full <= i < last_full]:
                    del self._dirty[i]
                for i in [i for i in self._read_cache if first_full <= i < last_full]:
                    del self._read_cache[i]
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
                hole = i not in self._dirty and self._blockset.is_hole(i)
                if out and out[-1][1] == hole:
                    out[-1] = (out[-1][0] + k, hole)
                else:
                    out.append((k, hole))
                pos += k
            return out

    def flush_blocks(self) -> None:
        """Write every dirty block to the blockset and flush the store (no INode commit)."""
        with self._lock:
            if self._dirty:
                ref = self._open_write()
                for i in sorted(self._dirty):
                    self._flush_one(i, self._dirty[i], ref)
                    del self._dirty[i]
            self._store.flush()

    def sync(self) -> INodeRef | None:
        """Flush, store the new INode and commit it; None if nothing changed since the last sync.

        Raises whatever flushing, storing or ``commit`` raised; the file then stays write-open
        with its state intact, and ``sync`` may be retried.
        """
        with self._lock:
            if self._write_inode is None:
                return None
            self.flush_blocks()
            inode = self._current_inode()
            pending = self._pending
            if pending is not None and pending.inode == inode.inode and pending != inode:
                # an earlier attempt stored a different INode under this number and its commit
                # failed: never rewrite (or delete) it, take a new number instead
                self._write_inode = None
                self._open_write()
                inode = self._current_inode()
            self._inode_store.write_inode(inode)
            self._pending = inode
            self._store.flush()
            assert self._commit is not None
            self._commit(inode.ref)
            self._pending = None
            self._write_inode = None
            self._committed = inode.ref
            return inode.ref

    def _current_inode(self) -> INode:
        assert self._write_inode is not None
        return INode(self._volume, self._write_inode, self._size, dict(self._attrs), self._blockset.marshal())

    def __repr__(self) -> str:
        return (
            f"<File vol={self._volume} size={self._size} committed={self._committed.inode} "
            f"dirty={len(self._dirty)}{' ro' if self.read_only else ''}>"
        )
