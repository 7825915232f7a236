"""An in-memory export that tracks holes: for tests and as the protocol layer's bench baseline."""

from __future__ import annotations

import mmap
import threading

from torus_core.errors import AlreadyExists, InvalidArgument, Locked, NotExist
from torus_core.nbd.constants import STATE_HOLE, STATE_ZERO
from torus_core.nbd.export import Buffer, Export, ExportInfo, ExportProvider

#: Allocation-tracking granularity in bytes (holes are reported in multiples of this).
GRAIN = 4096
_PAGE = mmap.PAGESIZE


class MemoryStore:
    """The shared contents of one in-memory export: an anonymous private mapping plus a map
    of which ``GRAIN``-sized pieces were ever written (the rest are holes reading as zero)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise InvalidArgument(f"export size must not be negative: {size}")
        self.size = size
        # MAP_PRIVATE anonymous memory is zero-filled lazily and MADV_DONTNEED re-zeroes it.
        self._mem = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)
        self._view = memoryview(self._mem)
        self._alloc = bytearray((size + GRAIN - 1) // GRAIN)
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> memoryview:
        """A view of ``length`` bytes at ``offset`` (the server copies it when sending)."""
        return self._view[offset : offset + length]

    def write(self, offset: int, data: Buffer) -> None:
        """Store ``data`` at ``offset`` and mark the touched grains allocated."""
        n = len(data)
        if n == 0:
            return
        self._view[offset : offset + n] = data
        first, last = offset // GRAIN, (offset + n - 1) // GRAIN
        if first == last:
            self._alloc[first] = 1
        else:
            with self._lock:
                self._alloc[first : last + 1] = b"\x01" * (last + 1 - first)

    def zero(self, offset: int, length: int, punch: bool) -> None:
        """Zero a range; with ``punch``, whole grains inside it become holes."""
        if length == 0:
            return
        end = offset + length
        g_first = -(-offset // GRAIN)
        g_end = end // GRAIN if end < self.size else len(self._alloc)
        if not punch or g_first >= g_end:
            self._fill_zero(offset, end)
            if not punch:
                self._mark(offset // GRAIN, (end - 1) // GRAIN + 1, 1)
            return
        hole_start, hole_end = g_first * GRAIN, min(g_end * GRAIN, self.size)
        self._fill_zero(offset, hole_start)
        self._fill_zero(hole_end, end)
        self._fill_zero(hole_start, hole_end)
        self._mark(g_first, g_end, 0)

    def _fill_zero(self, start: int, end: int) -> None:
        if end <= start:
            return
        p_start = -(-start // _PAGE) * _PAGE
        p_end = end // _PAGE * _PAGE
        if p_end - p_start >= _PAGE:
            self._mem.madvise(mmap.MADV_DONTNEED, p_start, p_end - p_start)
            self._view[start:p_start] = bytes(p_start - start)
            self._view[p_end:end] = bytes(end - p_end)
        else:
            self._view[start:end] = bytes(end - start)

    def _mark(self, g_start: int, g_end: int, value: int) -> None:
        with self._lock:
            self._alloc[g_start:g_end] = bytes([value]) * (g_end - g_start)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Runs of data (flags 0) and holes (HOLE|ZERO) from ``offset``, covering ``length``."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        alloc = self._alloc
        while pos < end:
            g = pos // GRAIN
            allocated = alloc[g]
            nxt = alloc.find(b"\x00" if allocated else b"\x01", g + 1)
            run_end = end if nxt < 0 else min(end, nxt * GRAIN)
            out.append((run_end - pos, 0 if allocated else STATE_HOLE | STATE_ZERO))
            pos = run_end
        return out

    def allocated_bytes(self) -> int:
        """Bytes in grains marked allocated (for tests and stats)."""
        return self._alloc.count(1) * GRAIN


class MemoryExport(Export):
    """One connection's handle on a :class:`MemoryStore`; all handles share the same bytes.

    Calls are short in-memory copies, so by default they run on the server's event loop
    (``blocking=False``); pass ``blocking=True`` to exercise the worker-thread path.
    """

    multi_conn = True

    def __init__(
        self,
        name: str,
        store: MemoryStore,
        *,
        read_only: bool = False,
        description: str = "",
        blocking: bool = False,
        on_close: object = None,
    ) -> None:
        self.name = name
        self.size = store.size
        self.read_only = read_only
        self.description = description
        self.blocking = blocking
        self.store = store
        self._on_close = on_close
        self.closed = False

    def read(self, offset: int, length: int) -> memoryview:
        """Read from the shared store."""
        return self.store.read(offset, length)

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        """Write to the shared store (memory is as durable as it gets: ``fua`` is a no-op)."""
        self.store.write(offset, data)

    def flush(self) -> None:
        """Nothing to do for memory."""

    def trim(self, offset: int, length: int) -> None:
        """Punch holes over whole grains, zero the rest."""
        self.store.zero(offset, length, punch=True)

    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Zero the range, punching holes if allowed."""
        self.store.zero(offset, length, punch=may_trim)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Allocation runs from the store's map."""
        return self.store.extents(offset, length)

    def close(self) -> None:
        """Release this handle (idempotent)."""
        if not self.closed:
            self.closed = True
            if callable(self._on_close):
                self._on_close(self)


class MemoryExportProvider(ExportProvider):
    """A catalogue of named in-memory exports.

    ``exclusive=True`` makes an export usable by one connection at a time (a second open
    raises :class:`Locked`, like a torus volume held by another client).
    """

    def __init__(self, *, exclusive: bool = False, blocking: bool = False) -> None:
        self._stores: dict[str, tuple[MemoryStore, bool, str]] = {}
        self._open: dict[str, int] = {}
        self._exclusive = exclusive
        self._blocking = blocking
        self._lock = threading.Lock()

    def add(self, name: str, size: int, *, read_only: bool = False, description: str = "") -> MemoryStore:
        """Create an export ``name`` of ``size`` bytes, all holes; returns its store."""
        with self._lock:
            if name in self._stores:
                raise AlreadyExists(f"export {name!r} already exists")
            store = MemoryStore(size)
            self._stores[name] = (store, read_only, description)
            return store

    def list_exports(self) -> list[str]:
        """Names in creation order."""
        with self._lock:
            return list(self._stores)

    def describe(self, name: str) -> ExportInfo:
        """Describe without opening."""
        with self._lock:
            entry = self._stores.get(name)
        if entry is None:
            raise NotExist(f"no export named {name!r}")
        store, read_only, description = entry
        return ExportInfo(
            name=name, size=store.size, read_only=read_only, description=description, multi_conn=True
        )

    def open_export(self, name: str) -> MemoryExport:
        """Open a handle; Locked if exclusive and already open."""
        with self._lock:
            entry = self._stores.get(name)
            if entry is None:
                raise NotExist(f"no export named {name!r}")
            if self._exclusive and self._open.get(name, 0) > 0:
                raise Locked(f"export {name!r} is in use by another connection")
            self._open[name] = self._open.get(name, 0) + 1
        store, read_only, description = entry
        return MemoryExport(
            name,
            store,
            read_only=read_only,
            description=description,
            blocking=self._blocking,
            on_close=self._release,
        )

    def open_count(self, name: str) -> int:
        """How many handles on ``name`` are open (lets tests check that close happened)."""
        with self._lock:
            return self._open.get(name, 0)

    def _release(self, export: MemoryExport) -> None:
        with self._lock:
            self._open[export.name] -= 1
