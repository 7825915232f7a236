"""Test helpers: in-process storage peers that serve journal stores over gRPC.

:class:`JournalCluster` starts one :class:`~torus_core.rpc.server.PeerServer` per peer on
127.0.0.1 (an in-memory block store plus a real :class:`~torus_core.journal.store.JournalStore`
under ``<root>/<uuid>/journal``) and builds :class:`~torus_core.journal.remote.RemoteJournalReplicas`
as any of those peers, or as a client outside the ring, would. With ``channels=True`` every peer
also serves its store over a :class:`~torus_core.journal.channel.JournalChannelServer` and the
replicas it builds append over those channels.

Every server demands the cluster key (:attr:`JournalCluster.key`, random per cluster) and the
pool presents it, as in a real cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torus_core.distributor.peers import PeerDirectory
from torus_core.journal.channel import JournalChannelServer
from torus_core.journal.remote import RemoteJournalReplicas
from torus_core.journal.store import JournalStore
from torus_core.ring.base import Ring, RingMember
from torus_core.ring.ketama import KetamaRing
from torus_core.rpc.auth import ClusterKey, PeerAuth
from torus_core.rpc.client import PeerClientPool
from torus_core.rpc.options import RPCTimeouts
from torus_core.rpc.server import PeerServer
from torus_core.testing.distributor import mem_store_factory


class JournalCluster:
    """N in-process storage peers with journal stores, a ketama ring of replication R.

    :param root: directory for the peers' journal stores.
    :param uuids: peer UUIDs.
    :param replication: the ring's replication.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        uuids: list[str],
        *,
        replication: int = 2,
        block_size: int = 4096,
        timeout: float = 2.0,
        channels: bool = False,
    ) -> None:
        make = mem_store_factory()
        self.root = Path(root)
        self.timeout = timeout
        self.journals: dict[str, JournalStore] = {}
        self.servers: dict[str, PeerServer] = {}
        #: journal channel servers by peer (``channels=True``)
        self.channels: dict[str, JournalChannelServer] = {}
        #: the key every server demands and :attr:`pool` presents
        self.key = ClusterKey.generate()
        self._stores = []
        self._replicas: list[RemoteJournalReplicas] = []
        try:
            for uuid in uuids:
                store = make(block_size, 16)
                self._stores.append(store)
                self.journals[uuid] = JournalStore(self.root / uuid / "journal")
                self.servers[uuid] = PeerServer(
                    store, uuid=uuid, journal=self.journals[uuid], auth=self.key
                ).start()
                if channels:
                    self.channels[uuid] = JournalChannelServer(self.journals[uuid], auth=self.key).start()
        except BaseException:
            self.close()
            raise
        self.addresses = {u: s.address for u, s in self.servers.items()}
        self.channel_addresses = {u: c.address for u, c in self.channels.items()}
        self.ring: Ring = KetamaRing(
            [RingMember(u, 1024, self.addresses[u]) for u in uuids], replication=replication
        )
        self.directory = PeerDirectory(self.addresses)
        self.pool = PeerClientPool(
            timeouts=RPCTimeouts(get=timeout, put=timeout, check=timeout, ping=timeout, journal=timeout),
            auth=PeerAuth(self.key, "journal-cluster"),
        )

    def replicas(self, uuid: str = "client", **kwargs: Any) -> RemoteJournalReplicas:
        """The journal replicas as peer ``uuid`` sees them (its own store local; a UUID outside
        the ring gets no local store)."""
        kwargs.setdefault("timeout", self.timeout)
        r = RemoteJournalReplicas(
            uuid, self.journals.get(uuid), lambda: self.ring, self.directory, self.pool, **kwargs
        )
        if self.channels:
            r.channel_address = self.channel_addresses.get
        self._replicas.append(r)
        return r

    def stop(self, uuid: str) -> None:
        """Stop peer ``uuid``'s server and channel (their ports then refuse connections)."""
        self.servers[uuid].stop(grace=0)
        if uuid in self.channels:
            self.channels[uuid].stop()

    def stored_seqs(self, uuid: str, volume_id: int) -> list[int]:
        """Sequence numbers in peer ``uuid``'s own journal files (read directly, not over RPC)."""
        return [r.seq for r in self.journals[uuid].read(volume_id, 0)]

    def close(self) -> None:
        """Stop servers, close journal stores, block stores and the client pool."""
        for r in self._replicas:
            r.close()
        for server in self.servers.values():
            server.stop(grace=0)
        for chan in self.channels.values():
            chan.stop()
        for journal in self.journals.values():
            journal.close()
        for store in self._stores:
            store.close()
        if hasattr(self, "pool"):
            self.pool.close()

    def __enter__(self) -> JournalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
