"""Per-volume write journal: durable small writes without rewriting blocks (docs/durability.md).

* :mod:`~torus_core.journal.record` — the versioned, checksummed record format.
* :mod:`~torus_core.journal.store` — one node's durable journal files (segments, epoch fence).
* :mod:`~torus_core.journal.replicas` — where a writer's records go: the local store (single
  node) or R peers (a cluster), behind one :class:`JournalReplicas` interface.
* :mod:`~torus_core.journal.writer` — group commit of records from many flushes.
"""

from torus_core.journal.record import Extent, JournalRecord, decode_records, encode_record
from torus_core.journal.replicas import JournalReplicas, LocalJournalReplicas, select_replay
from torus_core.journal.store import JournalStore

__all__ = [
    "Extent",
    "JournalRecord",
    "JournalReplicas",
    "JournalStore",
    "LocalJournalReplicas",
    "decode_records",
    "encode_record",
    "select_replay",
]
