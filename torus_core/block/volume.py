"""Block volumes: a locked, lease-backed :class:`~torus_core.file.File` over one volume.

Life cycle of a writable volume (inventory §8.1, with the original's defects fixed):

1. :meth:`BlockVolume.open` grants a lease, starts a :class:`~torus_core.block.lease.LeaseKeeper`
   (keepalive every ttl/3), takes the single-writer lock (``MetadataService.lock_volume``), loads
   the current INode (the virtual INode 1 of a fresh volume) and builds a ``File`` whose
   ``allocate_inode`` reserves INode numbers in the metadata and whose ``commit`` is the fenced
   ``MetadataService.commit_inode``. Any failure releases the lock and revokes the lease.
2. Writes go to the file's write-back cache; :meth:`BlockVolume.sync` flushes the blocks, stores
   the new INode and commits it. A commit refused because the lock moved on (another holder took
   over after our lease expired) raises :class:`~torus_core.errors.Locked` and nothing is
   committed.
3. When the keeper learns the lease is gone, the volume is marked **lost**: every further
   mutation and sync raises ``Locked`` at once (the original only noticed at the next sync).
4. :meth:`BlockVolume.close` syncs, then always unlocks and revokes the lease.

Growing: :meth:`BlockVolume.resize` records the new size in the metadata and grows the open
file immediately; :func:`resize_volume` on an unmounted volume changes the metadata only and the
file is grown (holes) the next time the volume is opened. Shrinking is refused by the metadata.

Read-only volumes (opened snapshots, :func:`torus_core.block.snapshots.open_snapshot`) hold no
lock or lease; every mutation raises ``Locked``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from torus_core.block.journaled import VolumeJournal
from torus_core.block.lease import LeaseKeeper
from torus_core.blockstore import BlockStore
from torus_core.errors import AlreadyExists, Closed, InvalidArgument, Locked, TorusError
from torus_core.eventlog import Lease
from torus_core.file import DEFAULT_CACHE_BYTES, File
from torus_core.journal.replicas import JournalReplicas
from torus_core.metadata import MetadataService, VolumeInfo, VolumeLock
from torus_core.metrics import VOLUME_FLUSH_SECONDS
from torus_core.projection import GlobalMetadata
from torus_core.refs import BlockRef, INodeRef
from torus_core.registry import Registry

log = logging.getLogger(__name__)

#: Seconds between a writer's looks for snapshot requests (``torusctl block snapshot create``).
SNAPSHOT_REQUEST_POLL = 0.5

#: Default lease TTL in seconds (the original used 30 s). The keeper renews every ttl/3, so a
#: holder that dies loses its lock within 5 s; a restarted ``torusd`` takes over the locks of its
#: own dead previous incarnation at once (``take_over``, see ``MetadataService.take_over_volume``).
DEFAULT_LEASE_TTL = 5.0

Data = bytes | bytearray | memoryview


def default_owner() -> str:
    """A lock-owner string naming this process: ``host/pid/random``."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def check_store(store: BlockStore, gm: GlobalMetadata) -> None:
    """InvalidArgument unless ``store`` uses the cluster's block size."""
    if store.block_size != gm.block_size:
        raise InvalidArgument(
            f"block store uses {store.block_size}-byte blocks but the cluster was formatted "
            f"with {gm.block_size}-byte blocks"
        )


class BlockVolume:
    """One opened block volume: a ``File`` plus its lock, lease and keepalive thread.

    Thread-safe: the underlying ``File`` serialises its methods; the lost/closed checks are
    cheap flag reads.
    """

    def __init__(
        self,
        md: MetadataService,
        store: BlockStore,
        info: VolumeInfo,
        file: File,
        *,
        lock: VolumeLock | None = None,
        lease: Lease | None = None,
        keeper: LeaseKeeper | None = None,
    ) -> None:
        """Assemble an opened volume; use :meth:`open` or ``open_snapshot`` instead."""
        self.md = md
        self.store = store
        self.info = info
        self.file = file
        self.lock = lock
        self.lease = lease
        self.keeper = keeper
        self._lost = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        #: the write journal, for volumes opened with one
        self.journal: VolumeJournal | None = None
        self._requests: threading.Thread | None = None
        self._stop_requests = threading.Event()
        #: while a snapshot is being taken, superseded blocks wait here: the INode about to be
        #: saved may name them and the snapshot high-water mark does not know it yet
        self._free_lock = threading.Lock()
        self._snapshotting = 0
        self._deferred: list[BlockRef] = []

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        md: MetadataService,
        store: BlockStore,
        name: str,
        *,
        owner: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        layer_registry: Registry,
        staging_bytes: int | None = None,
        staging_dir: str | None = None,
        take_over: bool = False,
        reclaim_own: bool = False,
        journal: JournalReplicas | None = None,
        journal_options: Mapping[str, Any] | None = None,
    ) -> BlockVolume:
        """Lock volume ``name`` for writing and open its current INode.

        With ``take_over`` (``owner`` must then be a ``format_owner`` string whose peer identity
        the caller owns exclusively), a lock held by a dead earlier incarnation of the same peer
        is broken instead of waiting for its lease to expire
        (:meth:`~torus_core.metadata.MetadataService.take_over_volume`); with ``reclaim_own``
        as well, so is a lock naming this very process, which the caller vouches no open
        volume of it uses (its release failed, e.g. during a metadata outage).

        ``cache_bytes``, ``staging_bytes`` and ``staging_dir`` configure the file's write-back
        cache (see :class:`~torus_core.file.File`).

        With ``journal`` (the replicas of volume journals), FLUSH goes through the volume's
        write journal and checkpoints fold it in (:mod:`torus_core.block.journaled`;
        ``journal_options`` are :class:`~torus_core.block.journaled.VolumeJournal` keywords);
        opening first replays what a crashed writer left in the journal.

        Raises NotExist (no such volume), Locked (someone else holds it), NoGlobalMetadata
        (unformatted cluster), InvalidArgument (bad TTL or store block size).
        """
        if not isinstance(lease_ttl, int | float) or isinstance(lease_ttl, bool) or lease_ttl <= 0:
            raise InvalidArgument(f"lease TTL must be a positive number of seconds, got {lease_ttl!r}")
        gm = md.global_metadata()
        check_store(store, gm)
        md.get_volume(name)  # NotExist before granting anything
        leases = md.leases
        lease = leases.grant(float(lease_ttl))
        lock: VolumeLock | None = None
        keeper: LeaseKeeper | None = None
        try:
            who = owner or default_owner()
            if take_over:
                lock = md.take_over_volume(name, who, lease, reclaim_own=reclaim_own)
            else:
                lock = md.lock_volume(name, who, lease)
            held = lock
            holder: list[BlockVolume] = []

            def lost() -> None:
                if holder:
                    holder[0].mark_lost()

            # Renewed from the lock on: recovering a dead writer's journal (below) can take
            # longer than the TTL, and a lease expiring meanwhile would lose the lock.
            keeper = LeaseKeeper(leases, lease, on_lost=lost, name=f"lease-{name}").start()
            info = md.get_volume_by_id(lock.volume_id)
            ref = md.current_inode(lock.volume_id)
            vid = lock.volume_id

            def commit(r: INodeRef) -> None:
                try:
                    md.commit_inode(held, r)
                except Locked:
                    if holder:
                        holder[0].mark_lost()
                    raise

            def free_superseded(_ref: INodeRef, refs: list[BlockRef]) -> None:
                holder[0]._free_superseded(refs)  # no commit happens before the volume exists

            file = File.open(
                store,
                ref,
                volume_size=info.size,
                allocate_inode=lambda: md.allocate_inode_index(vid),
                commit=commit,
                on_commit=free_superseded,
                block_spec=gm.block_spec,
                layer_registry=layer_registry,
                cache_bytes=cache_bytes,
                staging_bytes=staging_bytes,
                staging_dir=staging_dir,
                journaled=journal is not None,
            )
            vol = cls(md, store, info, file, lock=lock, lease=lease)
            holder.append(vol)
            if file.size < info.size:
                file.truncate(info.size)  # grown while unmounted
            if journal is not None:
                vj = VolumeJournal(
                    file, store, journal, vid, lock.epoch, name=name, **dict(journal_options or {})
                )
                vj.recover()
                vol.journal = vj.start()
            vol.serve_snapshot_requests()  # a request a dead writer left pending
            vol._requests = threading.Thread(
                target=vol._watch_requests, name=f"snapshot-requests-{name}", daemon=True
            )
            vol._requests.start()
            vol.keeper = keeper
            if keeper.lost:
                vol.mark_lost()
            return vol
        except BaseException:
            if keeper is not None:
                keeper.stop()
            if lock is not None:
                with contextlib.suppress(TorusError):
                    md.unlock(lock)
            with contextlib.suppress(TorusError):
                leases.revoke(lease)
            raise

    # --- properties ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Volume name."""
        return self.info.name

    @property
    def volume_id(self) -> int:
        """Volume id."""
        return self.info.id

    @property
    def size(self) -> int:
        """Current size in bytes."""
        return self.file.size

    @property
    def block_size(self) -> int:
        """Cluster block size."""
        return self.file.block_size

    @property
    def read_only(self) -> bool:
        """True for opened snapshots."""
        return self.file.read_only

    @property
    def lost(self) -> bool:
        """True once the lease or lock was lost: mutations and syncs now raise Locked."""
        return self._lost.is_set()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def mark_lost(self) -> None:
        """Refuse further mutations (called when the lease or the lock is found gone)."""
        self._lost.set()

    def _check_writable(self) -> None:
        if self._closed:
            raise Closed(f"volume {self.name!r} is closed")
        if self._lost.is_set():
            raise Locked(f"volume {self.name!r}: the lock was lost (lease expired or taken over)")

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"volume {self.name!r} is closed")

    # --- data ------------------------------------------------------------------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short at the end)."""
        self._check_open()
        return self.file.read_at(offset, length)

    def write_at(self, offset: int, data: Data) -> int:
        """Write ``data`` at ``offset`` (within the volume size); returns the byte count."""
        self._check_writable()
        n = len(memoryview(data).cast("B"))
        if offset + n > self.file.size:
            raise InvalidArgument(
                f"write of {n} bytes at {offset} exceeds volume {self.name!r} ({self.file.size} bytes)"
            )
        n = self.file.write_at(offset, data)
        if self.journal is not None:
            self.journal.space_wait()
        return n

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """:meth:`read_at` if it can run without waiting for the file's lock, else None."""
        self._check_open()
        return self.file.read_nowait(offset, length)

    def write_nowait(self, offset: int, data: Data) -> bool:
        """:meth:`write_at` if it needs no waiting and no metadata or store I/O, else False."""
        self._check_writable()
        return self.file.write_nowait(offset, data)

    def trim(self, offset: int, length: int) -> None:
        """Discard a range (whole blocks become holes, edges are zeroed)."""
        self._check_writable()
        self.file.trim(offset, length)
        if self.journal is not None:
            self.journal.space_wait()

    def write_zeroes(self, offset: int, length: int, *, punch_hole: bool = True) -> None:
        """Make a range read as zeros (within the volume size)."""
        self._check_writable()
        if offset + length > self.file.size:
            raise InvalidArgument(f"zeroing past the end of volume {self.name!r}")
        self.file.write_zeroes(offset, length, punch_hole=punch_hole)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``(length, is_hole)`` runs from ``offset``."""
        self._check_open()
        return self.file.extents(offset, length)

    def flush_blocks(self) -> None:
        """Write dirty blocks to the store (no INode commit)."""
        self._check_writable()
        self.file.flush_blocks()

    def sync(self) -> INodeRef | None:
        """Make every completed write durable: flush blocks, store and commit a new INode.

        Returns the committed ref (None if nothing changed). Raises Locked if the lock was lost.
        A read-only volume has nothing to sync and returns None.
        """
        if self.read_only:
            self._check_open()
            return None
        self._check_writable()
        with VOLUME_FLUSH_SECONDS.time():
            if self.journal is None:
                return self.file.sync()
            try:
                self.journal.flush()
            except Locked:
                self.mark_lost()
                raise
            return None

    def checkpoint(self) -> INodeRef | None:
        """Fold everything flushed into a committed INode (for a journaled volume; otherwise the
        same as :meth:`sync`)."""
        self._check_writable()
        if self.journal is not None:
            return self.journal.checkpoint()
        return self.file.sync()

    def resize(self, new_size: int) -> None:
        """Grow the volume to ``new_size`` bytes (metadata first, then the open file)."""
        self._check_writable()
        self.info = self.md.resize_volume(self.name, new_size)
        if self.file.size < new_size:
            self.file.truncate(new_size)

    def _free_superseded(self, refs: list[BlockRef]) -> None:
        with self._free_lock:
            if self._snapshotting:
                self._deferred.extend(refs)
                return
        free_superseded_blocks(self.md, self.store, self.volume_id, refs)

    def snapshot(self, snap: str) -> None:
        """Sync and fold in the journal, then save snapshot ``snap`` of what was just committed."""
        with self._free_lock:
            self._snapshotting += 1
        try:
            self.sync()
            self.checkpoint()
            self.md.save_snapshot(self.name, snap)
        finally:
            with self._free_lock:
                self._snapshotting -= 1
                deferred = [] if self._snapshotting else self._deferred
                if deferred:
                    self._deferred = []
            if deferred:
                try:
                    free_superseded_blocks(self.md, self.store, self.volume_id, deferred)
                except TorusError as exc:
                    log.warning("volume %r: freeing superseded blocks: %s", self.name, exc)

    def serve_snapshot_requests(self) -> int:
        """Save every snapshot asked of this writer (``SnapshotRequested``) after folding in the
        journal, so it holds every acknowledged write; returns how many were saved."""
        names = self.md.snapshot_requests(self.volume_id)
        for snap in names:
            try:
                self.snapshot(snap)
                log.info("volume %r: saved requested snapshot %r", self.name, snap)
            except AlreadyExists:
                pass
        return len(names)

    def _save_requested_snapshots(self) -> None:
        """At close, after the final fold: save snapshots asked for since the watcher stopped."""
        try:
            names = self.md.snapshot_requests(self.volume_id)
        except TorusError as exc:
            log.warning("volume %r: reading snapshot requests at close: %s", self.name, exc)
            return
        for snap in names:
            try:
                self.md.save_snapshot(self.name, snap)
            except AlreadyExists:
                pass
            except TorusError as exc:
                log.warning("volume %r: saving requested snapshot %r at close: %s", self.name, snap, exc)

    def _watch_requests(self) -> None:
        while not self._stop_requests.wait(SNAPSHOT_REQUEST_POLL):
            if self._closed or self._lost.is_set():
                return
            try:
                self.serve_snapshot_requests()
            except (Closed, Locked):
                return
            except TorusError as exc:
                log.warning("volume %r: serving snapshot requests: %s", self.name, exc)

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Sync (writable volumes), then always stop the keeper, unlock and revoke the lease.

        Idempotent. A failed sync is raised after the lock and lease were released.
        """
        with self._close_lock:
            if self._closed:
                return
            self._stop_requests.set()
            if self._requests is not None and self._requests is not threading.current_thread():
                self._requests.join(30.0)
            try:
                if self.journal is not None:
                    self.journal.close()
                if not self.read_only and not self._lost.is_set():
                    if self.journal is not None:
                        self.journal.checkpoint()  # folds everything and trims the journal
                        self.file.release_held()
                    else:
                        self.file.sync()
                    self._save_requested_snapshots()
            finally:
                self._closed = True
                self.file.close()
                self._release()

    def _release(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        if self.lock is not None:
            try:
                self.md.unlock(self.lock)
            except TorusError as exc:
                log.warning("unlocking volume %r: %s", self.name, exc)
        if self.lease is not None:
            try:
                self.md.leases.revoke(self.lease)
            except TorusError as exc:
                log.warning("revoking the lease of volume %r: %s", self.name, exc)

    def __enter__(self) -> BlockVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "lost" if self.lost else "ro" if self.read_only else "rw"
        return f"<BlockVolume {self.name!r} id={self.volume_id} size={self.size} {state}>"


def free_superseded_blocks(
    md: MetadataService, store: BlockStore, volume_id: int, refs: list[BlockRef]
) -> int:
    """Delete the blocks of ``refs`` (superseded by a commit of volume ``volume_id``) that no
    snapshot or clone can name: the volume's own blocks minted under an INode number above
    every INode ever saved in a snapshot. Others are left to GC. Returns the number deleted."""
    high = md.snapshot_highwater(volume_id)
    doomed = [r for r in refs if r.volume == volume_id and r.inode > high]
    if not doomed:
        return 0
    # not flushed: a delete lost in a crash only leaves garbage for GC
    return store.discard_blocks(doomed)


def resize_volume(md: MetadataService, name: str, new_size: int) -> VolumeInfo:
    """Grow an (unmounted or mounted) volume in the metadata; the file grows at its next open."""
    return md.resize_volume(name, new_size)
