"""Test helpers for the cluster layer: in-process peers on one metadata store, and a way to
write committed volume data without the block-volume layer.

:class:`InProcessCluster` runs real :class:`~torus_core.cluster.node.ClusterNode` objects (real
gRPC servers on 127.0.0.1, in-memory block stores, each node with its own metadata-backend
connection, as separate processes would have) so heartbeats, ring watching, rebalancing and GC
are exercised end to end inside one test process. The ring types and blockset layers are the
built-in ones (:func:`~torus_core.ring.builtin.builtin_ring_types`,
:func:`~torus_core.blockset.spec.default_layer_registry`), as plugin-free tests use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from torus_core.blockset.spec import create_blockset, default_layer_registry
from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.cluster.node import ClusterNode, ClusterOptions
from torus_core.cluster.rebalancer import RebalanceOptions
from torus_core.eventlog import MetadataBackend
from torus_core.events import VOLUME_IDS_STREAM
from torus_core.inode import INode, INodeStore
from torus_core.journal.store import JournalStore
from torus_core.metadata import MetadataService, VolumeLock
from torus_core.refs import BlockRef, INodeRef
from torus_core.ring.base import RingSpec
from torus_core.ring.builtin import builtin_ring_types


def open_mem_store(block_size: int, capacity_blocks: int) -> BlockStore:
    """An in-memory store from the plugin registry (``mem``)."""
    from torus_core.plugins import make_plugin_manager

    cls = make_plugin_manager().collect_registries().block_stores.get("mem")
    store: BlockStore = cls.open(BlockStoreConfig(block_size, block_size * capacity_blocks))
    return store


def ensure_volumes(md: MetadataService, volume_id: int, *, size: int = 1 << 20) -> None:
    """Create volumes ``vol-<id>`` until volume ids up to ``volume_id`` are allocated.

    Peers refuse blocks of a volume id never allocated and journal requests for volumes that do
    not exist (:class:`~torus_core.rpc.guard.ReplicaGuard`): a test that writes blocks or
    journal records of ``volume_id`` by hand first makes the volume real.
    """
    for _ in range(volume_id):
        top = md.state().stream_version(VOLUME_IDS_STREAM)
        if top >= volume_id:
            return
        md.create_volume(f"vol-{top + 1}", size)


def writable_volume(
    md: MetadataService, volume_id: int, *, size: int = 1 << 20, ttl: float = 60.0
) -> VolumeLock:
    """:func:`ensure_volumes` and lock ``volume_id`` (revoke the returned lock's lease and call
    again for the next epoch, as after a takeover). The volume must not have been deleted."""
    ensure_volumes(md, volume_id, size=size)
    vol = md.get_volume_by_id(volume_id)
    return md.lock_volume(vol.name, f"test-writer-{volume_id}", md.leases.grant(ttl))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded); returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def commit_blocks(
    md: MetadataService,
    store: BlockStore,
    volume: str,
    blocks: Iterable[bytes],
    *,
    spec: str = "base",
    commit: bool = True,
) -> tuple[INodeRef, list[BlockRef]]:
    """Write ``blocks`` as a new INode of ``volume`` (taking and releasing its lock).

    With ``commit=False`` the blocks are written (and flushed to the stores) under a freshly
    allocated INode index but the INode is neither stored nor committed (an in-flight write).
    Returns the INodeRef and the data refs written.
    """
    vol = md.get_volume(volume)
    lease = md.leases.grant(30.0)
    lock = md.lock_volume(volume, "test-writer", lease)
    try:
        index = md.allocate_inode_index(vol.id)
        iref = INodeRef(vol.id, index)
        bs = create_blockset(spec, store, default_layer_registry())
        for i, data in enumerate(blocks):
            bs.put_block(iref, i, data)
        refs = bs.get_all_block_refs()
        if commit:
            INodeStore(store).write_inode(INode(vol.id, index, vol.size, {}, bs.marshal()))
            store.flush()
            md.commit_inode(lock, iref)
        else:
            store.flush()  # the blocks are in the stores (a distributor may queue writes)
        md.unlock(lock)
    finally:
        md.leases.revoke(lease)
    return iref, refs


class InProcessCluster:
    """Storage peers as :class:`ClusterNode` objects in this process.

    :param open_backend: returns a new connection to the shared metadata backend.
    :param block_size: cluster block size (the cluster is formatted if needed).
    :param replication: ring replication.
    :param options: node options (fast defaults for tests).
    """

    def __init__(
        self,
        open_backend: Callable[[], MetadataBackend],
        *,
        block_size: int = 4096,
        replication: int = 2,
        capacity_blocks: int = 4096,
        options: ClusterOptions | None = None,
    ) -> None:
        self.open_backend = open_backend
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.options = options or ClusterOptions(
            heartbeat_interval=0.2,
            maintenance_interval=0.1,
            gc_grace=0.0,
            rebalance=RebalanceOptions(settle=0.3),
        )
        self._extra: list[Any] = []
        #: the ring types and blockset layers every node uses (the built-in ones)
        self.ring_types = builtin_ring_types()
        self.layer_registry = default_layer_registry()
        self.md = self.new_md()
        if self.md.state().global_metadata is None:
            self.md.format(block_size, "base", RingSpec("ketama", 1, replication))
        self.nodes: dict[str, ClusterNode] = {}
        self.stores: dict[str, BlockStore] = {}

    def new_md(self) -> MetadataService:
        """A metadata service on a new backend connection (closed with the cluster)."""
        backend = self.open_backend()
        md = MetadataService(backend, ring_types=self.ring_types)
        self._extra.append(backend)
        return md

    def add_node(
        self, uuid: str, *, join: bool = True, journal: JournalStore | None = None, **option_changes: Any
    ) -> ClusterNode:
        """Start a storage peer ``uuid`` (joining the ring unless ``join`` is false) that serves
        ``journal``'s volume journals when given one."""
        store = self.stores.get(uuid) or open_mem_store(self.block_size, self.capacity_blocks)
        self.stores[uuid] = store
        opts = replace(self.options, **option_changes) if option_changes else self.options
        node = ClusterNode(
            self.new_md(),
            uuid,
            store=store,
            listen="127.0.0.1:0",
            options=opts,
            journal=journal,
            layer_registry=self.layer_registry,
        )
        node.start(auto_join=join)
        self.nodes[uuid] = node
        return node

    def client(self, uuid: str = "client") -> ClusterNode:
        """Start a client node (no store, no listener)."""
        node = ClusterNode(
            self.new_md(), uuid, options=self.options, layer_registry=self.layer_registry
        ).start()
        self.nodes[uuid] = node
        return node

    def crash(self, uuid: str) -> None:
        """Stop a node abruptly: its server goes away and its heartbeat stops (lease not revoked)."""
        self.nodes.pop(uuid).abort()

    def holders(self, ref: BlockRef) -> set[str]:
        """Running peers whose store holds ``ref``."""
        return {u for u, n in self.nodes.items() if n.store is not None and n.store.has_block(ref)}

    def close(self) -> None:
        """Close every node and backend connection."""
        for node in list(self.nodes.values()):
            node.close()
        self.nodes.clear()
        for store in self.stores.values():
            store.close()
        for backend in self._extra:
            backend.close()

    def __enter__(self) -> InProcessCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
