"""What every peer publishes about itself under its lease (the original's ``models.PeerInfo``).

A :class:`PeerInfo` is written by the heartbeat (``MetadataService.register_peer``) as JSON and
read back by every node and by ``torusctl peer list``. :meth:`PeerInfo.from_dict` is tolerant of
missing fields (older peers) but rejects values of the wrong type with
:class:`~torus_core.errors.InvalidArgument`, so one malformed entry never crashes a reader.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torus_core.errors import InvalidArgument
from torus_core.rpc.options import PROTOCOL_VERSION

#: Oldest peer protocol version this code can work with.
MIN_PROTOCOL_VERSION = 2


@dataclass
class RebalanceInfo:
    """Progress of a peer's rebalancer (shown by ``peer list``).

    :param last_finish: wall-clock time the last complete pass ended (0 = never).
    :param last_blocks: blocks pushed to other peers during the last complete pass.
    :param rebalancing: whether a pass is running now.
    :param rate: bytes/s pushed during the last (or current) pass.
    :param under_replicated: local blocks that, in the last complete pass, were missing on at
        least one owner when checked (0 on every peer = fully replicated), -1 if unknown.
    :param unconfirmed: local blocks whose owners could not all be asked or written in the
        last complete pass (kept, retried next pass).
    :param ring_version: ring version the last complete pass used.
    :param passes: complete passes since start.
    :param gc_deleted: blocks deleted by GC since start.
    :param gc_skipped: GC cycles skipped because metadata or an INode could not be read.
    :param pushed_blocks_total: blocks pushed to other peers since start (every pass).
    :param pushed_bytes_total: bytes pushed to other peers since start (every pass).
    :param deleted_total: non-owned local copies the rebalancer deleted since start.
    :param dead_skipped: local blocks the last complete pass left alone because GC's live set
        says they are garbage (neither pushed nor counted as under-replicated).
    :param gc_dead: blocks the last GC cycle found dead (deleted once their grace is over).
    """

    last_finish: float = 0.0
    last_blocks: int = 0
    rebalancing: bool = False
    rate: float = 0.0
    under_replicated: int = -1
    unconfirmed: int = 0
    ring_version: int = 0
    passes: int = 0
    gc_deleted: int = 0
    gc_skipped: int = 0
    pushed_blocks_total: int = 0
    pushed_bytes_total: int = 0
    deleted_total: int = 0
    dead_skipped: int = 0
    gc_dead: int = 0


@dataclass
class PeerInfo:
    """One peer as the cluster sees it.

    :param uuid: the peer's stable id (``<data-dir>/metadata/uuid``).
    :param address: ``host:port`` of its peer RPC server; empty for clients.
    :param last_seen: wall-clock time of its last heartbeat.
    :param total_blocks: capacity of its local store in blocks.
    :param used_blocks: blocks stored.
    :param block_size: block size of its store (0 for a client without one).
    :param protocol_version: its peer protocol version.
    :param rebalance: its rebalancer progress.
    :param boot_id: random per process of its peer RPC server (a restart changes it; empty for
        clients and older peers).
    :param role: ``storage`` (a cluster peer) or ``single`` (a single-node torusd: no peer RPC,
        not in a ring; registered so ``peer list`` and monitoring see its store usage).
    :param journal_address: ``host:port`` of its journal channel (low-latency journal appends,
        :mod:`torus_core.journal.channel`); empty if it has none (older peers): use gRPC.
    :param journal_bytes: disk space its volume journal files occupy (its own volumes' journals
        and the replicas it holds for other peers; written data waits there until the next
        checkpoint), :meth:`~torus_core.journal.store.JournalStore.disk_bytes`. 0 for a peer
        without a journal store and for older peers.
    """

    uuid: str
    address: str = ""
    last_seen: float = field(default_factory=time.time)
    total_blocks: int = 0
    used_blocks: int = 0
    block_size: int = 0
    protocol_version: int = PROTOCOL_VERSION
    rebalance: RebalanceInfo = field(default_factory=RebalanceInfo)
    boot_id: str = ""
    role: str = "storage"
    journal_address: str = ""
    journal_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``register_peer`` stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerInfo:
        """Parse a stored dict; InvalidArgument if a field has the wrong type."""
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"peer info must be an object, got {type(data).__name__}")
        uuid = data.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            raise InvalidArgument("peer info needs a non-empty string 'uuid'")
        reb_raw = data.get("rebalance")
        if reb_raw is None:
            reb_raw = {}
        if not isinstance(reb_raw, Mapping):
            raise InvalidArgument(f"peer {uuid}: 'rebalance' must be an object")
        reb_kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(RebalanceInfo):
            if f.name in reb_raw:
                reb_kwargs[f.name] = _typed(uuid, f"rebalance.{f.name}", reb_raw[f.name], f.default)
        kwargs: dict[str, Any] = {}
        for name, default in (
            ("address", ""),
            ("last_seen", 0.0),
            ("total_blocks", 0),
            ("used_blocks", 0),
            ("block_size", 0),
            ("protocol_version", 0),
            ("boot_id", ""),
            ("role", "storage"),
            ("journal_address", ""),
            ("journal_bytes", 0),
        ):
            if name in data and data[name] is not None:
                kwargs[name] = _typed(uuid, name, data[name], default)
        return cls(uuid=uuid, rebalance=RebalanceInfo(**reb_kwargs), **kwargs)

    def is_client(self) -> bool:
        """A process without a peer RPC address (it stores nothing for others)."""
        return not self.address


def _typed(uuid: str, name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise InvalidArgument(f"peer {uuid}: field {name!r} has the wrong type ({type(value).__name__})")


def parse_peers(raw: list[dict[str, Any]]) -> dict[str, PeerInfo]:
    """Parse ``MetadataService.list_peers()`` output, skipping (not raising on) malformed entries."""
    out: dict[str, PeerInfo] = {}
    for item in raw:
        try:
            info = PeerInfo.from_dict(item)
        except InvalidArgument:
            continue
        out[info.uuid] = info
    return out
