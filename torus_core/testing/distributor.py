"""Test helpers: an in-process cluster of gRPC peers, and a store wrapper that injects faults.

:class:`LocalCluster` starts one :class:`~torus_core.rpc.server.PeerServer` per peer on
127.0.0.1 ephemeral ports, each over its own in-memory store (the ``mem`` block store from the
plugin registry, or any factory you pass), and builds distributors wired to them. Later layers
(rebalancer, GC, block volumes) can reuse it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.distributor.distributor import Distributor
from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import BlockUnavailable, CorruptBlock, PeerUnavailable
from torus_core.refs import BlockRef
from torus_core.ring.base import Ring, RingMember
from torus_core.rpc.auth import ClusterKey, PeerAuth
from torus_core.rpc.client import PeerClientPool
from torus_core.rpc.options import RPCTimeouts
from torus_core.rpc.server import PeerServer

StoreFactory = Callable[[int, int], BlockStore]


def mem_store_factory() -> StoreFactory:
    """``factory(block_size, capacity_blocks)`` opening the registered ``mem`` block store."""
    from torus_core.plugins import make_plugin_manager

    cls = make_plugin_manager().collect_registries().block_stores.get("mem")

    def make(block_size: int, capacity_blocks: int) -> BlockStore:
        store: BlockStore = cls.open(BlockStoreConfig(block_size, block_size * capacity_blocks))
        return store

    return make


class FaultyStore(BlockStore):
    """Wraps a real store; refs in :attr:`corrupt` raise CorruptBlock on read, :attr:`fail_gets`
    makes the next reads fail transiently, and :attr:`fail_with` fails every call.
    Counts ``get_block`` calls."""

    name = "faulty"

    def __init__(self, inner: BlockStore) -> None:
        self.inner = inner
        self.corrupt: set[BlockRef] = set()
        self.fail_with: BaseException | None = None
        #: The next this-many ``get_block`` calls raise BlockUnavailable (a transient outage).
        self.fail_gets = 0
        self.get_calls = 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, config: BlockStoreConfig) -> FaultyStore:
        """Not used: wrap an opened store instead."""
        raise NotImplementedError

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    @property
    def block_size(self) -> int:
        """The inner store's block size."""
        return self.inner.block_size

    def has_block(self, ref: BlockRef) -> bool:
        """Delegates."""
        self._maybe_fail()
        return self.inner.has_block(ref)

    def get_block(self, ref: BlockRef) -> bytes:
        """Delegates, unless ``ref`` is marked corrupt."""
        with self._lock:
            self.get_calls += 1
            transient = self.fail_gets > 0
            if transient:
                self.fail_gets -= 1
        if transient:
            raise BlockUnavailable(f"block {ref} temporarily unavailable (injected)")
        self._maybe_fail()
        if ref in self.corrupt:
            raise CorruptBlock(f"block {ref} failed its checksum (injected)")
        return self.inner.get_block(ref)

    def read_block_range(self, ref: BlockRef, start: int, length: int) -> bytes:
        """Delegates (the inner store's unverified range read), unless ``ref`` is marked corrupt."""
        self._maybe_fail()
        if ref in self.corrupt:
            raise CorruptBlock(f"block {ref} failed its checksum (injected)")
        return self.inner.read_block_range(ref, start, length)

    def write_block(self, ref: BlockRef, data: bytes | bytearray | memoryview) -> None:
        """Delegates; writing a corrupt-marked ref over a deleted copy heals it."""
        self._maybe_fail()
        self.inner.write_block(ref, data)

    def delete_block(self, ref: BlockRef) -> None:
        """Delegates and clears the corrupt mark."""
        self._maybe_fail()
        self.inner.delete_block(ref)
        self.corrupt.discard(ref)

    def num_blocks(self) -> int:
        """Delegates."""
        return self.inner.num_blocks()

    def used_blocks(self) -> int:
        """Delegates."""
        return self.inner.used_blocks()

    def iter_refs(self) -> Iterator[BlockRef]:
        """Delegates."""
        return self.inner.iter_refs()

    def flush(self) -> None:
        """Delegates."""
        self._maybe_fail()
        self.inner.flush()

    def close(self) -> None:
        """Delegates."""
        self.inner.close()


class LocalCluster:
    """N storage peers on 127.0.0.1, each a PeerServer over a FaultyStore(mem store).

    :param uuids: peer UUIDs, in ring order.
    :param block_size: block size of every store.
    :param capacity_blocks: capacity of every store.
    :param ring_factory: ``ring_factory(members)`` builds the cluster's ring.
    """

    def __init__(
        self,
        uuids: list[str],
        ring_factory: Callable[[list[RingMember]], Ring],
        *,
        block_size: int = 4096,
        capacity_blocks: int = 1024,
        store_factory: StoreFactory | None = None,
        server_kwargs: dict[str, Any] | None = None,
    ) -> None:
        make = store_factory or mem_store_factory()
        self.block_size = block_size
        self.stores: dict[str, FaultyStore] = {}
        self.servers: dict[str, PeerServer] = {}
        #: the cluster key every server demands and :attr:`pool` presents
        self.key = ClusterKey.generate()
        try:
            for uuid in uuids:
                store = FaultyStore(make(block_size, capacity_blocks))
                self.stores[uuid] = store
                kwargs = {"auth": self.key, **(server_kwargs or {})}
                self.servers[uuid] = PeerServer(store, uuid=uuid, **kwargs).start()
        except BaseException:
            self.close()
            raise
        self.addresses = {u: s.address for u, s in self.servers.items()}
        self.ring = ring_factory([RingMember(u, capacity_blocks, self.addresses[u]) for u in uuids])
        self.pool = PeerClientPool(
            timeouts=RPCTimeouts(get=1.0, put=2.0, check=1.0, ping=0.5),
            auth=PeerAuth(self.key, "local-cluster"),
        )
        self._distributors: list[Distributor] = []

    def directory(self) -> PeerDirectory:
        """A fresh directory of every peer's address."""
        return PeerDirectory(self.addresses)

    def client(self, uuid: str = "client", **kwargs: Any) -> Distributor:
        """A distributor for a process outside the ring (no local store unless given)."""
        kwargs.setdefault("block_size", self.block_size)
        dist = Distributor(
            uuid, kwargs.pop("local_store", None), self.ring, self.directory(), self.pool, **kwargs
        )
        self._distributors.append(dist)
        return dist

    def peer_distributor(self, uuid: str, **kwargs: Any) -> Distributor:
        """A distributor running inside peer ``uuid`` (its store is the local store)."""
        dist = Distributor(
            uuid, self.stores[uuid], self.ring, self.directory(), self.pool, close_local_store=False, **kwargs
        )
        self._distributors.append(dist)
        return dist

    def stop(self, uuid: str) -> None:
        """Stop peer ``uuid``'s server (its port then refuses connections)."""
        self.servers[uuid].stop(grace=0)

    def holders(self, ref: BlockRef) -> set[str]:
        """Peers whose store holds ``ref`` (asked directly, not over RPC)."""
        return {u for u, s in self.stores.items() if s.inner.has_block(ref)}

    def close(self) -> None:
        """Close distributors, stop servers, close stores and the pool."""
        for dist in getattr(self, "_distributors", []):
            dist.close()
        for server in self.servers.values():
            server.stop(grace=0)
        for store in self.stores.values():
            store.close()
        if hasattr(self, "pool"):
            self.pool.close()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["FaultyStore", "LocalCluster", "PeerUnavailable", "mem_store_factory"]
