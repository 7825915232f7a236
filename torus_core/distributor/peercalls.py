"""One way to call a peer by UUID, and what a failed call teaches about it.

Every remote operation of the distributor (a read, a replica write, a flush, an existence check,
a repair) has the same shape: find the peer's address, take its pooled channel, call, and on
:class:`~torus_core.errors.PeerUnavailable` drop the channel (the next call dials again) and
try that peer after the others for a while. :class:`PeerCalls` is that shape, once.

Block reads and writes (:meth:`PeerCalls.data`) go over the peer's framed channel
(:mod:`torus_core.journal.channel`) when it advertises one (:attr:`PeerCalls.channel_address`):
one framed round trip costs a fraction of a gRPC call. A channel that refuses the connection or
serves no store sends that peer's block calls back to gRPC for ``suspect_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from torus_core.distributor.peers import PeerDirectory
from torus_core.errors import NotSupported, PeerUnavailable, TorusError
from torus_core.journal.channel import ChannelRefused, JournalChannelClient
from torus_core.refs import BlockRef
from torus_core.rpc.client import PeerClient, PeerClientPool

log = logging.getLogger(__name__)

T = TypeVar("T")


class BlockCalls(Protocol):
    """The block reads and writes both transports offer
    (:class:`~torus_core.rpc.client.PeerClient` and
    :class:`~torus_core.journal.channel.JournalChannelClient`)."""

    @property
    def max_message_bytes(self) -> int:
        """Largest request the transport carries."""
        ...

    def get_block(self, ref: BlockRef, *, timeout: float | None = None) -> bytes:
        """One whole block, verified by the peer."""
        ...

    def get_block_range(
        self, ref: BlockRef, start: int, length: int, *, timeout: float | None = None
    ) -> bytes:
        """Bytes ``[start, start + length)`` of a block, unverified."""
        ...

    def get_block_page_crcs(
        self, ref: BlockRef, page_size: int, block_size: int, *, timeout: float | None = None
    ) -> bytes:
        """The page CRC table of a block."""
        ...

    def put_blocks(
        self,
        refs: Sequence[BlockRef],
        blocks: Sequence[bytes | bytearray | memoryview],
        *,
        repair: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Store blocks durably; returns how many."""
        ...

    def put_blocks_deferred(
        self,
        refs: Sequence[BlockRef],
        blocks: Sequence[bytes | bytearray | memoryview],
        *,
        repair: bool = False,
        defer_flush: bool = True,
        timeout: float | None = None,
        trim: bool = False,
    ) -> tuple[int, str]:
        """Store blocks, durable only after a :meth:`flush`; returns ``(count, boot_id)``."""
        ...

    def flush(self, *, timeout: float | None = None) -> str:
        """Make what the peer stored durable; returns its ``boot_id``."""
        ...


class PeerCalls:
    """Calls to peers by UUID, with a short memory of the peers that just failed.

    :param peers: the ``uuid -> address`` directory (membership feeds it).
    :param pool: pooled channels to the peers' addresses.
    :param suspect_seconds: how long a peer whose call failed is tried after the others
        (:meth:`healthy_first`; write placement uses it as a last resort meanwhile).
    """

    def __init__(self, peers: PeerDirectory, pool: PeerClientPool, suspect_seconds: float) -> None:
        self.peers = peers
        self.pool = pool
        self.suspect_seconds = suspect_seconds
        self._suspects: dict[str, float] = {}
        self._lock = threading.Lock()
        #: ``uuid -> address`` of the peer's framed channel ("" or None: none); None: reads
        #: always use gRPC. The cluster node sets it from the heartbeats.
        self.channel_address: Callable[[str], str | None] | None = None
        #: seconds a channel call may take by default
        self.channel_timeout = 5.0
        self._channels: dict[str, JournalChannelClient] = {}
        self._channel_off: dict[str, float] = {}  # uuid -> until when its channel is not used

    def call(self, uuid: str, fn: Callable[[PeerClient], T]) -> T:
        """``fn(client)`` on ``uuid``'s channel.

        Raises :class:`PeerUnavailable` at once for a peer without a known address (or marked
        down). A call that raises :class:`PeerUnavailable` resets the channel and makes the
        peer suspect; any other error is the peer's answer and passes through untouched.
        """
        address = self.peers.address(uuid)
        if address is None:
            raise PeerUnavailable(f"peer {uuid} has no known address or is down")
        try:
            return fn(self.pool.get(address))
        except PeerUnavailable:
            self.pool.reset(address)
            self.suspect(uuid)
            raise

    def data(self, uuid: str, fn: Callable[[BlockCalls], T]) -> T:
        """``fn(client)`` for a block read or write on ``uuid``: over its channel when it has one, else
        (or when the channel refuses the connection, or serves no store) over gRPC, as
        :meth:`call`. A channel call that raises :class:`PeerUnavailable` makes the peer suspect."""
        chan = self.channel(uuid)
        if chan is not None:
            try:
                return fn(chan)
            except (ChannelRefused, NotSupported) as exc:
                log.debug("channel of peer %s not usable for blocks (%s); using gRPC", uuid, exc)
                self._channel_off[uuid] = time.monotonic() + self.suspect_seconds
            except PeerUnavailable:
                self.suspect(uuid)
                raise
        return self.call(uuid, fn)

    def channel(self, uuid: str) -> JournalChannelClient | None:
        """The channel client of peer ``uuid`` when it advertises one (else None: use gRPC)."""
        lookup = self.channel_address
        address = lookup(uuid) if lookup is not None else None
        if not address:
            return None
        off = self._channel_off.get(uuid)
        if off is not None:
            if off > time.monotonic():
                return None
            self._channel_off.pop(uuid, None)
        chan = self._channels.get(uuid)
        if chan is not None and chan.address == address:
            return chan
        try:
            fresh = JournalChannelClient(
                address,
                tls=self.pool.tls,
                allow_insecure=self.pool.allow_insecure,
                timeout=self.channel_timeout,
                auth=self.pool.auth,
            )
        except TorusError as exc:
            log.warning("channel of peer %s at %s unusable, using gRPC: %s", uuid, address, exc)
            self._channel_off[uuid] = time.monotonic() + self.suspect_seconds
            return None
        with self._lock:
            old = self._channels.get(uuid)
            self._channels[uuid] = fresh
        if old is not None:
            old.close()
        return fresh

    def close(self) -> None:
        """Close the channel clients (the gRPC pool belongs to whoever passed it)."""
        with self._lock:
            chans, self._channels = list(self._channels.values()), {}
        for chan in chans:
            chan.close()

    def dialable(self, uuid: str) -> bool:
        """Whether ``uuid`` has a known address (it is neither down nor a client)."""
        return self.peers.address(uuid) is not None

    def suspect(self, uuid: str) -> None:
        """Mark ``uuid`` as just failed (a timeout outside :meth:`call` counts too)."""
        with self._lock:
            self._suspects[uuid] = time.monotonic() + self.suspect_seconds

    def is_suspect(self, uuid: str) -> bool:
        """Whether ``uuid`` failed within the last ``suspect_seconds``."""
        if not self._suspects:  # the common case, on every append and read: no lock
            return False
        with self._lock:
            until = self._suspects.get(uuid)
            if until is None:
                return False
            if until <= time.monotonic():
                del self._suspects[uuid]
                return False
            return True

    def healthy_first(self, uuids: Sequence[str]) -> list[str]:
        """``uuids`` with peers marked down or suspect moved to the end (order kept otherwise)."""
        good = [u for u in uuids if not self.is_suspect(u) and not self.peers.is_down(u)]
        if len(good) == len(uuids):
            return list(uuids)
        return good + [u for u in uuids if u not in good]
