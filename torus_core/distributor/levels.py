"""Read and write levels: how many replicas a read tries and a write must reach."""

from __future__ import annotations

from enum import StrEnum

from torus_core.errors import ConfigError


class WriteLevel(StrEnum):
    """How many distinct peers must acknowledge a write before it succeeds (docs/cluster.md).

    * ``ALL`` -- R distinct peers: the owners P[:R], an owner that is down or fails replaced by
      the next peer of the permutation (hinted handoff; the rebalancer later moves the copy to
      the owner). Fewer than R reachable peers raises
      :class:`~torus_core.errors.ReplicationFailed`.
    * ``ONE`` -- at least one peer; the owners are attempted in parallel (the next peers if
      every owner fails), failures logged.
    * ``LOCAL`` -- the local store only (a client's write cache); the rebalancer pushes the
      block to its owners later. Falls back to ``ONE`` when the local store refuses it.
    """

    ALL = "all"
    ONE = "one"
    LOCAL = "local"

    @classmethod
    def parse(cls, value: str | WriteLevel) -> WriteLevel:
        """Parse a config string (case-insensitive); raises :class:`ConfigError`."""
        if isinstance(value, WriteLevel):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown write level {value!r}; choose one of {choices}") from None


class ReadLevel(StrEnum):
    """Where a read looks after the cache and the local store.

    * ``BLOCK`` -- sequential passes over the permutation P, with a few bounded retries.
    * ``SEQ`` -- one sequential pass over all of P.
    * ``SPREAD`` -- all owners in parallel, first success wins; then the rest of P in order.
    """

    BLOCK = "block"
    SEQ = "seq"
    SPREAD = "spread"

    @classmethod
    def parse(cls, value: str | ReadLevel) -> ReadLevel:
        """Parse a config string (case-insensitive); raises :class:`ConfigError`."""
        if isinstance(value, ReadLevel):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ConfigError(f"unknown read level {value!r}; choose one of {choices}") from None
