"""``DirBlockStore``: one file per block in a directory -- the template's working block store.

Replace the storage with yours and keep the contract: blocks are immutable (rewriting a ref
with other content is :class:`~torus_core.errors.BlockExists`), short data is zero-padded,
capacity is counted in blocks, ``flush`` makes every completed write durable, every method
raises :class:`~torus_core.errors.Closed` after ``close``. The shipped suites
(:mod:`torus_core.testing.blockstore`, run by ``tests/test_contract.py``) check all of it.
"""

from __future__ import annotations

import json
import os
import threading
from typing import ClassVar

from torus_core.blockstore import BlockStoreConfig, RefTableBlockStore
from torus_core.errors import BlockExists, BlockNotExist, Closed, ConfigError, InvalidArgument, OutOfSpace
from torus_core.refs import BlockRef

#: Keys accepted in ``[blockstore_options]`` (declared to core in ``plugin.py``).
OPTION_NAMES = ("fsync",)
_META = "store.json"
_SUFFIX = ".blk"


class DirBlockStore(RefTableBlockStore):
    """Blocks as files ``<path>/<ref hex>.blk``; the block size is recorded in ``store.json``.

    Writes go to a temporary file renamed into place, so a crash leaves whole blocks or none.
    With ``fsync`` (the default) ``flush`` fsyncs the files written since the last flush and
    the directory.
    """

    name: ClassVar[str] = "template"
    persistent: ClassVar[bool] = True

    def __init__(self, path: str, block_size: int, capacity_blocks: int, *, fsync: bool = True) -> None:
        self._path = path
        self._block_size = block_size
        self._capacity = capacity_blocks
        self._fsync = fsync
        self._lock = threading.Lock()
        self._closed = False
        self._dirty: set[str] = set()
        self._refs: dict[BlockRef, str] = {}
        for entry in os.listdir(path):
            if entry.endswith(_SUFFIX):
                self._refs[BlockRef.from_bytes(bytes.fromhex(entry[: -len(_SUFFIX)]))] = entry
            elif entry.endswith(".tmp"):
                os.unlink(os.path.join(path, entry))  # a write that never completed

    @classmethod
    def open(cls, config: BlockStoreConfig) -> DirBlockStore:
        """Open (creating if needed) the store in ``config.path``."""
        if not isinstance(config.block_size, int) or config.block_size <= 0:
            raise InvalidArgument(f"block_size must be a positive integer, got {config.block_size!r}")
        if not isinstance(config.capacity_bytes, int) or config.capacity_bytes < 0:
            raise InvalidArgument(f"capacity_bytes must be >= 0, got {config.capacity_bytes!r}")
        unknown = sorted(set(config.options) - set(OPTION_NAMES))
        if unknown:
            raise ConfigError(f"unknown template store option(s): {', '.join(unknown)}")
        if config.path is None:
            raise InvalidArgument("the template block store needs a path (its directory)")
        path = os.fspath(config.path)
        os.makedirs(path, exist_ok=True)
        meta = os.path.join(path, _META)
        if os.path.exists(meta):
            with open(meta, encoding="utf-8") as fh:
                recorded = json.load(fh).get("block_size")
            if recorded != config.block_size:
                raise InvalidArgument(f"store {path} has {recorded}-byte blocks, not {config.block_size}")
        else:
            with open(meta, "w", encoding="utf-8") as fh:
                json.dump({"block_size": config.block_size}, fh)
        fsync = bool(config.options.get("fsync", True))
        return cls(path, config.block_size, config.capacity_blocks, fsync=fsync)

    # --- RefTableBlockStore hooks -----------------------------------------------------------

    def _ref_table(self) -> dict[BlockRef, str]:
        return self._refs

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("template block store is closed")

    # --- BlockStore -------------------------------------------------------------------------

    def __enter__(self) -> DirBlockStore:
        return self

    @property
    def block_size(self) -> int:
        """Size of every block in bytes."""
        return self._block_size

    def get_block(self, ref: BlockRef) -> bytes:
        """The stored bytes (always ``block_size`` long)."""
        with self._lock:
            self._check_open()
            name = self._refs.get(ref)
            if name is None:
                raise BlockNotExist(f"block {ref} not found")
            with open(os.path.join(self._path, name), "rb") as fh:
                return fh.read()

    def write_block(self, ref: BlockRef, data: bytes | bytearray | memoryview) -> None:
        """Store a zero-padded copy of ``data``; identical rewrites are no-ops."""
        size = memoryview(data).nbytes
        if size > self._block_size:
            raise InvalidArgument(f"block data is {size} bytes, block size is {self._block_size}")
        block = bytes(data) + bytes(self._block_size - size)
        with self._lock:
            self._check_open()
            name = self._refs.get(ref)
            if name is not None:
                with open(os.path.join(self._path, name), "rb") as fh:
                    if fh.read() != block:
                        raise BlockExists(f"block {ref} already stored with different content")
                return
            if len(self._refs) >= self._capacity:
                raise OutOfSpace(f"template block store full ({self._capacity} blocks)")
            name = ref.to_bytes().hex() + _SUFFIX
            tmp = os.path.join(self._path, name + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(block)
            os.replace(tmp, os.path.join(self._path, name))
            self._refs[ref] = name
            self._dirty.add(name)

    def delete_block(self, ref: BlockRef) -> None:
        """Remove ``ref``; :class:`BlockNotExist` if absent."""
        with self._lock:
            self._check_open()
            name = self._refs.pop(ref, None)
            if name is None:
                raise BlockNotExist(f"block {ref} not found")
            os.unlink(os.path.join(self._path, name))
            self._dirty.discard(name)

    def flush(self) -> None:
        """Make every completed write and delete durable (fsync files, then the directory)."""
        with self._lock:
            self._check_open()
            if not self._fsync:
                self._dirty.clear()
                return
            for name in self._dirty:
                fd = os.open(os.path.join(self._path, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._dirty.clear()
            dfd = os.open(self._path, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def close(self) -> None:
        """Flush and close. Idempotent."""
        with self._lock:
            if self._closed:
                return
        self.flush()
        with self._lock:
            self._closed = True
