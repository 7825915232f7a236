"""A stand-in for the metadata service in :class:`~torus_core.file.File` tests.

:class:`FileVolume` keeps what a volume needs from the service, an INode counter and the
committed INode pointer, over a real block store, and opens :class:`File` objects on it (with
the built-in blockset layers, :func:`~torus_core.blockset.default_layer_registry`).
"""

from __future__ import annotations

from typing import Any

from torus_core.blockset import default_layer_registry
from torus_core.blockstore import BlockStore
from torus_core.errors import MetadataUnavailable
from torus_core.file import File
from torus_core.inode import INodeStore
from torus_core.refs import INodeRef


class FileVolume:
    """Volume ``volume_id`` of ``size`` bytes on ``store``; ``open_defaults`` go to every open.

    ``fail_next_commit = True`` makes the next commit raise MetadataUnavailable (once).
    """

    def __init__(self, store: BlockStore, volume_id: int, size: int, **open_defaults: Any) -> None:
        self.store = store
        self.istore = INodeStore(store)
        self.counter = 1
        self.current = INodeRef(volume_id, 1)
        self.size = size
        self.fail_next_commit = False
        self.open_defaults = open_defaults

    def allocate(self) -> int:
        """Hand out the next INode index."""
        self.counter += 1
        return self.counter

    def commit(self, ref: INodeRef) -> None:
        """Make ``ref`` the committed INode (or refuse once, see ``fail_next_commit``)."""
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise MetadataUnavailable("commit refused for the test")
        self.current = ref

    def open(self, ref: INodeRef | None = None, **kw: Any) -> File:
        """Open a :class:`File` on ``ref`` (default: the committed INode); ``kw`` override defaults."""
        return File.open(
            self.store,
            ref or self.current,
            volume_size=self.size,
            inode_store=self.istore,
            allocate_inode=self.allocate,
            commit=self.commit,
            **{"layer_registry": default_layer_registry(), **self.open_defaults, **kw},
        )
