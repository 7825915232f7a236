"""The torus exception hierarchy.

Every error a user can see derives from :class:`TorusError`. Backends translate their client
library's exceptions into these types at one boundary, so callers and the conformance suites
only ever catch ``torus_core.errors`` types.

The Go original's sentinel errors map as follows:

=========================  ==========================================
Go                         Python
=========================  ==========================================
ErrBlockUnavailable        :class:`BlockUnavailable`
ErrINodeUnavailable        :class:`INodeUnavailable`
ErrBlockNotExist           :class:`BlockNotExist`
ErrClosed                  :class:`Closed`
ErrCompareFailed           :class:`CompareFailed`
ErrExists                  :class:`AlreadyExists`
ErrInvalid                 :class:`InvalidArgument`
ErrLocked                  :class:`Locked`
ErrNoGlobalMetadata        :class:`NoGlobalMetadata`
ErrNoPeer                  :class:`NoPeer`
ErrNotExist                :class:`NotExist`
ErrNotSupported            :class:`NotSupported`
ErrOutOfSpace              :class:`OutOfSpace`
ErrAgain                   :class:`Again`
ErrUsage                   :class:`UsageError`
ErrNonSequentialRing       :class:`NonSequentialRing`
ErrLeaseNotFound           :class:`LeaseNotFound`
ErrNoPeersBlock            :class:`NoPeersBlock`
ErrWrongVolumeType         :class:`WrongVolumeType`
ErrIsSymlink               :class:`IsSymlink`
ErrNotDir                  :class:`NotDir`
=========================  ==========================================
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


class TorusError(Exception):
    """Root of every error raised by torus and its plugins."""

    #: Whether retrying the same call later may succeed (outages, lost races).
    retryable: bool = False


# --- generic -------------------------------------------------------------------------------


class InvalidArgument(TorusError, ValueError):
    """An argument is malformed or out of range (Go: ErrInvalid)."""


class UsageError(InvalidArgument):
    """A command was used the wrong way (Go: ErrUsage)."""


class NotSupported(TorusError):
    """The operation is not supported by this implementation (Go: ErrNotSupported)."""


class Closed(TorusError):
    """The object was already closed (Go: ErrClosed)."""


class NotExist(TorusError, LookupError):
    """The named thing does not exist (Go: ErrNotExist)."""


class AlreadyExists(TorusError):
    """The named thing already exists (Go: ErrExists)."""


class Again(TorusError):
    """A transient conflict: re-read and try again (Go: ErrAgain)."""

    retryable = True


class WrongVolumeType(InvalidArgument):
    """The volume exists but is not of the type the operation needs (Go: ErrWrongVolumeType)."""


class IsSymlink(InvalidArgument):
    """A path names a symlink (Go: ErrIsSymlink; kept for the original's removed file layer)."""


class NotDir(InvalidArgument):
    """A path is not a directory (Go: ErrNotDir; kept for the original's removed file layer)."""


# --- configuration and plugins -------------------------------------------------------------


class ConfigError(TorusError):
    """Configuration is missing, malformed, or names an unusable value."""


class ForeignDataDir(ConfigError):
    """A data directory belongs to another cluster than the one the server was started for.

    ``bound_cluster`` is the cluster id recorded in the directory, ``cluster_id`` the id of the
    cluster the server serves (empty for a cluster formatted without one).
    """

    def __init__(self, message: str, *, bound_cluster: str, cluster_id: str) -> None:
        super().__init__(message)
        self.bound_cluster = bound_cluster
        self.cluster_id = cluster_id


class PluginError(TorusError):
    """Base class for plugin discovery and registration problems."""


class UnknownBackendError(PluginError, ConfigError):
    """A backend name was requested that no loaded plugin provides."""


class DuplicateBackendError(PluginError):
    """Two plugins registered the same name for the same kind."""


class PluginLoadError(PluginError):
    """A plugin's entry point failed to import."""


# --- metadata ------------------------------------------------------------------------------


class MetadataError(TorusError):
    """Base class for metadata-service errors."""


class CompareFailed(MetadataError):
    """An optimistic-concurrency check failed; nothing was written (Go: ErrCompareFailed).

    Raised by an event-log append whose expected stream version is stale, or that would
    duplicate a ``(stream, version)`` pair.
    """

    def __init__(self, message: str, *, stream_id: str | None = None, version: int | None = None):
        super().__init__(message)
        self.stream_id = stream_id
        self.version = version


class MetadataUnavailable(MetadataError):
    """The metadata backend could not be reached in time. Retry later."""

    retryable = True

    def __init__(self, message: str, *, backend: str | None = None):
        super().__init__(message)
        self.backend = backend


class NoGlobalMetadata(MetadataError):
    """The cluster has not been formatted (``torusctl init``) (Go: ErrNoGlobalMetadata)."""


class NonSequentialRing(MetadataError):
    """A new ring's version is not exactly the current version + 1 (Go: ErrNonSequentialRing)."""


class Locked(MetadataError):
    """A volume is locked by another holder, or the caller lost its lock (Go: ErrLocked)."""


class StaleEpoch(Locked):
    """A journal replica refused a write fenced with an older volume-lock epoch than one it has
    seen: another writer took the volume over."""


class LeaseNotFound(MetadataError):
    """The lease expired or was revoked (Go: ErrLeaseNotFound)."""


class DataLossDetected(MetadataError):
    """The backend no longer holds data it held before (e.g. a restarted empty Redis)."""


class SchemaError(MetadataError):
    """An event has an unknown topic or an unsupported schema version."""


# --- blocks and storage --------------------------------------------------------------------


class BlockStoreError(TorusError):
    """Base class for block-store errors."""


class BlockNotExist(BlockStoreError, NotExist):
    """The block is not present (Go: ErrBlockNotExist)."""


class BlockUnavailable(BlockStoreError):
    """The block cannot be read right now, or failed its checksum (Go: ErrBlockUnavailable)."""

    retryable = True


class INodeUnavailable(BlockUnavailable):
    """An INode cannot be read right now (Go: ErrINodeUnavailable)."""


class CorruptBlock(BlockUnavailable):
    """A stored block failed its integrity check; it was not returned."""


class WouldBlock(BlockUnavailable):
    """The read would have to wait for the network, inside
    :func:`torus_core.blockstore.nonblocking_reads` (an event loop's fast path): nothing was
    done; do the same read again where waiting is allowed."""


class OutOfSpace(BlockStoreError):
    """The block store is full (Go: ErrOutOfSpace)."""


class MetadataOutOfSpace(MetadataUnavailable, OutOfSpace):
    """The metadata backend cannot write because its disk is full (e.g. SQLite's
    ``SQLITE_FULL``). Retryable like any :class:`MetadataUnavailable` (space may be freed), and
    reported to NBD clients as ENOSPC like any :class:`OutOfSpace`."""


#: ``errno`` values meaning "the file system has no room for this": a full disk or a quota.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is an :class:`OSError` for a full disk or an exhausted quota."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


@contextmanager
def disk_full_is_out_of_space(what: str) -> Iterator[None]:
    """Turn an :class:`OSError` ``ENOSPC`` / ``EDQUOT`` raised inside into :class:`OutOfSpace`
    (``what`` names the file or store in the message); other errors pass unchanged.

    File-backed stores use it at their I/O calls, so a full disk reaches NBD clients as ENOSPC,
    not EIO.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
        raise OutOfSpace(f"{what}: {exc.strerror or exc}") from exc


class BlockExists(BlockStoreError, AlreadyExists):
    """A different block is already stored under this ref (blocks are immutable)."""


class BlockStoreLocked(BlockStoreError):
    """Another process (or open handle) already holds this persistent block store's directory."""


class NoPeer(TorusError):
    """No peer is available to serve the request (Go: ErrNoPeer)."""

    retryable = True


class NoPeersBlock(NoPeer):
    """No peer could provide the block (Go: ErrNoPeersBlock)."""


class PeerUnavailable(NoPeer):
    """A peer could not be reached, timed out, or refused the connection (transport failure)."""

    def __init__(self, message: str, *, address: str | None = None):
        super().__init__(message)
        self.address = address


class Unauthenticated(PeerUnavailable):
    """A peer refused a call or journal channel connection: the caller did not prove that it is
    a member of the cluster (no, a wrong or a replayed HMAC of the cluster key)."""


class PeerBusy(PeerUnavailable):
    """A peer refused a call because the caller already has as many calls (or streams) in
    flight there as one caller may; retry later or elsewhere."""


class ReplicaRefused(InvalidArgument):
    """A replica refused a request that no honest writer sends: a journal record or block for a
    volume that does not exist, a fence epoch that is not the volume's lock epoch, a journal
    record larger than the maximum. Nothing was stored."""


class ReplicationFailed(NoPeer):
    """A write was not acknowledged by as many owners as its write level requires.

    ``acked`` lists the peer UUIDs that acknowledged; ``failed`` maps the others to their error.
    Blocks are immutable, so retrying the same write is safe.
    """

    def __init__(
        self,
        message: str,
        *,
        acked: list[str] | None = None,
        failed: dict[str, BaseException] | None = None,
    ):
        super().__init__(message)
        self.acked = list(acked or [])
        self.failed = dict(failed or {})


class StaleRing(TorusError):
    """A ring older than the one in use was offered (ring versions never go backwards)."""


# --- NBD -----------------------------------------------------------------------------------


class ProtocolError(TorusError):
    """A peer violated a wire protocol (NBD, peer RPC)."""
