"""The interface the NBD server serves: :class:`Export` and :class:`ExportProvider`.

The protocol layer knows nothing about torus volumes. Anything that can read and write bytes at
offsets can be served by implementing :class:`Export` (one opened export, possibly shared by
several connections) and :class:`ExportProvider` (the catalogue of names).

Threading contract: unless :attr:`Export.blocking` is ``False``, the server calls the data
methods from a pool of worker threads, **concurrently** and possibly for overlapping ranges, and
the export does its own locking. Every method may block (disk, metadata). Errors are raised as
:mod:`torus_core.errors` types; the server maps them to NBD error codes (see
:mod:`torus_core.nbd.errmap`). ``close`` is called exactly once per successful
:meth:`ExportProvider.open_export`, also when the client disconnects abruptly.

Multi-connection: the server advertises ``NBD_FLAG_CAN_MULTI_CONN`` only if
:attr:`Export.multi_conn` is true, which an export may claim only when ``flush`` on one
connection's export makes the completed writes of *all* connections to the same name durable
(e.g. all connections share one underlying volume file).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

#: Byte buffers accepted and returned by exports (``collections.abc.Buffer`` needs 3.12).
Buffer = bytes | bytearray | memoryview

#: Default block size hints: any alignment accepted, 4 KiB preferred, 32 MiB payload maximum.
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024


@dataclass(frozen=True)
class ExportInfo:
    """What NBD_OPT_INFO/NBD_OPT_LIST report about an export, obtainable without opening it."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block_size: int = DEFAULT_MIN_BLOCK
    preferred_block_size: int = DEFAULT_PREFERRED_BLOCK
    max_block_size: int = DEFAULT_MAX_BLOCK
    multi_conn: bool = False


class Export(ABC):
    """One opened export: a fixed-size range of bytes with block-device operations.

    Subclasses set the attributes below (class or instance attributes) and implement the
    abstract methods. Offsets and lengths passed in are always validated by the server to lie
    within ``[0, size)``.
    """

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block_size: int = DEFAULT_MIN_BLOCK
    preferred_block_size: int = DEFAULT_PREFERRED_BLOCK
    max_block_size: int = DEFAULT_MAX_BLOCK
    #: True only if flush on one opened instance makes writes of all instances durable.
    multi_conn: bool = False
    #: False if every call is a short non-blocking in-memory operation: the server then calls
    #: the export on its event loop instead of a worker thread (cheaper for tiny operations).
    blocking: bool = True

    def info(self) -> ExportInfo:
        """Describe this export (used for NBD_OPT_GO replies)."""
        return ExportInfo(
            name=self.name,
            size=self.size,
            read_only=self.read_only,
            description=self.description,
            min_block_size=self.min_block_size,
            preferred_block_size=self.preferred_block_size,
            max_block_size=self.max_block_size,
            multi_conn=self.multi_conn,
        )

    @abstractmethod
    def read(self, offset: int, length: int) -> Buffer:
        """Return exactly ``length`` bytes starting at ``offset``.

        A memoryview onto the export's own storage is allowed if that storage stays valid until
        the reply is sent (for a blocking export: some time after this call returned)."""

    @abstractmethod
    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        """Write ``data`` at ``offset``; if ``fua``, return only once it is durable.

        ``data`` is only valid during the call (the server reuses the buffer afterwards): copy
        what must be kept."""

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        """Fast path of :meth:`read` for blocking exports, called on the event loop first.

        Return the data if it can be had without waiting (no lock held by another thread, no
        slow I/O), else None: the read then goes to a worker thread. Errors raised here are
        replied like errors of :meth:`read`. The default always returns None."""
        return None

    def write_nowait(self, offset: int, data: Buffer, fua: bool) -> bool:
        """Fast path of :meth:`write` (see :meth:`read_nowait`): True if the write was done,
        False (with nothing changed) to have it done by a worker thread. Default: False."""
        return False

    @abstractmethod
    def flush(self) -> None:
        """Make every write that has returned so far durable."""

    @abstractmethod
    def trim(self, offset: int, length: int) -> None:
        """Hint that the range is no longer needed; its contents become unspecified."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        """Make the range read back as zeroes; ``may_trim`` allows punching a hole."""

    @abstractmethod
    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Describe allocation from ``offset`` as ``(length, flags)`` runs.

        ``flags`` is a combination of ``STATE_HOLE`` and ``STATE_ZERO``
        (:mod:`torus_core.nbd.constants`). The runs start at ``offset``, are non-empty, and may
        cover less than ``length`` (at least one run); the server clips what exceeds it.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the export (locks, handles). Called once, also on abrupt disconnects."""


class ExportProvider(ABC):
    """The catalogue of exports a server offers."""

    @abstractmethod
    def list_exports(self) -> list[str]:
        """Names of the exports, for NBD_OPT_LIST."""

    @abstractmethod
    def open_export(self, name: str) -> Export:
        """Open ``name`` for one connection.

        Raises :class:`~torus_core.errors.NotExist` for an unknown name and
        :class:`~torus_core.errors.Locked` if it is in use and cannot be shared.
        """

    @abstractmethod
    def describe(self, name: str) -> ExportInfo:
        """Describe ``name`` without opening or locking it (NBD_OPT_INFO); NotExist if unknown."""

    def default_export(self) -> str | None:
        """The export served for the empty name, or None if there is none."""
        names = self.list_exports()
        return names[0] if names else None
