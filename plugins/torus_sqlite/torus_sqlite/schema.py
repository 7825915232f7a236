"""Tables of the SQLite metadata store (SQLAlchemy Core) and their idempotent creation."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.schema import CreateIndex, CreateTable

#: Bumped when the layout changes; stored in ``torus_meta``.
SCHEMA_VERSION = 1

metadata = MetaData()

#: The event log. ``position`` is assigned explicitly as ``max + 1`` under the write lock.
events = Table(
    "events",
    metadata,
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("stream_id", String, nullable=False),
    Column("version", Integer, nullable=False),
    Column("topic", String, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("timestamp", Float, nullable=False),
    UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
)

#: Projection snapshots: one row per name, replaced on save.
snapshots = Table(
    "snapshots",
    metadata,
    Column("name", String, primary_key=True),
    Column("position", Integer, nullable=False),
    Column("state", LargeBinary, nullable=False),
)

#: Leases with a wall-clock expiry (``time.time()`` seconds).
leases = Table(
    "leases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("ttl", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

#: Ephemeral keys; a key with a ``lease_id`` lives only as long as that lease.
lease_keys = Table(
    "lease_keys",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", LargeBinary, nullable=False),
    Column("lease_id", Integer, nullable=True),
)
Index("ix_lease_keys_lease", lease_keys.c.lease_id)
Index("ix_leases_expires", leases.c.expires_at)

#: Store-wide facts (schema version).
torus_meta = Table(
    "torus_meta",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", String, nullable=False),
)


def create_schema(conn: Connection) -> None:
    """Create every table and index if missing (safe when several processes race)."""
    for table in metadata.sorted_tables:
        conn.execute(CreateTable(table, if_not_exists=True))
        for index in table.indexes:
            conn.execute(CreateIndex(index, if_not_exists=True))
    conn.exec_driver_sql(
        "INSERT OR IGNORE INTO torus_meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
    )
