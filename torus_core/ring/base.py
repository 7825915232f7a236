"""The ring contract: a pure function from a BlockRef to an ordered list of peer UUIDs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from torus_core.refs import BlockRef

if TYPE_CHECKING:
    from torus_core.registry import Registry


@dataclass(frozen=True)
class PeerPermutation:
    """Placement of one block: every member exactly once; the first ``replication`` own it."""

    peers: list[str]
    replication: int

    @property
    def owners(self) -> list[str]:
        """The peers that must hold the block."""
        return self.peers[: self.replication]


@dataclass(frozen=True)
class RingMember:
    """A ring member as stored in the ring: its UUID and capacity (for ketama weights)."""

    uuid: str
    total_blocks: int = 1
    address: str = ""


@dataclass(frozen=True)
class RingSpec:
    """The serialisable description of a ring (what a ``ring-changed`` event carries)."""

    type: str
    version: int
    replication: int
    members: tuple[RingMember, ...] = ()
    attrs: dict[str, bytes] = field(default_factory=dict)


class Ring(ABC):
    """Maps blocks to peers. Every modification returns a new ring with version + 1."""

    #: Registered, persisted name (``empty``, ``single``, ``mod``, ``ketama``, ``union``).
    name: ClassVar[str]
    #: The original's numeric type id (0 empty, 1 single, 2 mod, 3 union, 4 ketama).
    type_id: ClassVar[int]

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: RingSpec, ring_types: Registry) -> Ring:
        """Build a ring from its serialisable spec; raises InvalidArgument if malformed.

        :param ring_types: the process's ring registry; a ring that nests others (``union``)
            builds them through it, so nested rings may be plugin ring types too.
        """

    @abstractmethod
    def to_spec(self) -> RingSpec:
        """The serialisable spec of this ring."""

    @property
    @abstractmethod
    def version(self) -> int:
        """Ring version (monotonic, +1 per change)."""

    @abstractmethod
    def get_peers(self, ref: BlockRef) -> PeerPermutation:
        """The ordered placement of ``ref``."""

    @abstractmethod
    def members(self) -> list[str]:
        """Member UUIDs in ring order."""

    @abstractmethod
    def describe(self) -> str:
        """Human-readable description (``torusctl ring get``)."""

    def change_replication(self, replication: int) -> Ring:
        """A new ring (version + 1) with another replication; NotSupported by default."""
        from torus_core.errors import NotSupported

        raise NotSupported(f"ring type {self.name!r} cannot change replication")

    def add_peers(self, peers: Sequence[RingMember]) -> Ring:
        """A new ring (version + 1) with ``peers`` added; NotSupported by default."""
        from torus_core.errors import NotSupported

        raise NotSupported(f"ring type {self.name!r} cannot add peers")

    def remove_peers(self, uuids: Sequence[str]) -> Ring:
        """A new ring (version + 1) without ``uuids``; NotSupported by default."""
        from torus_core.errors import NotSupported

        raise NotSupported(f"ring type {self.name!r} cannot remove peers")
