"""Snapshots of block volumes: ``VOL@SNAP`` names, read-only opening, and clones.

A snapshot is a saved INode pointer (inventory §8.2): creating one records the volume's last
committed INode (works while the volume is mounted); restoring points the volume back at it and
is refused while the volume is locked. :func:`open_snapshot` opens a snapshot read-only without a
lock. :func:`clone` makes a new volume whose first INode reuses the snapshot's blockset, so no
data block is copied (the GC must keep blocks referenced by any volume's INodes, not only those
minted under the volume's own id).
"""

from __future__ import annotations

import contextlib
import time

from torus_core.block.volume import DEFAULT_LEASE_TTL, BlockVolume, check_store, default_owner
from torus_core.blockstore import BlockStore
from torus_core.errors import Again, AlreadyExists, InvalidArgument, NotExist, TorusError
from torus_core.file import File
from torus_core.inode import VIRTUAL_INODE, INode, INodeStore
from torus_core.metadata import MetadataService, SnapshotInfo, VolumeInfo
from torus_core.refs import INodeRef
from torus_core.registry import Registry


def parse_target(target: str) -> tuple[str, str | None]:
    """Split ``"VOL"`` or ``"VOL@SNAP"`` into ``(volume, snapshot or None)``."""
    if not isinstance(target, str) or not target:
        raise InvalidArgument("expected VOLUME or VOLUME@SNAPSHOT")
    vol, sep, snap = target.partition("@")
    if not vol or (sep and not snap) or "@" in snap:
        raise InvalidArgument(f"{target!r} is not of the form VOLUME or VOLUME@SNAPSHOT")
    return vol, (snap if sep else None)


def parse_snapshot(target: str) -> tuple[str, str]:
    """Split ``"VOL@SNAP"``; InvalidArgument if the snapshot part is missing."""
    vol, snap = parse_target(target)
    if snap is None:
        raise InvalidArgument(f"{target!r} names no snapshot (expected VOLUME@SNAPSHOT)")
    return vol, snap


#: Seconds ``create_snapshot`` waits for a volume's writer to save a requested snapshot.
SNAPSHOT_WAIT = 30.0


def create_snapshot(md: MetadataService, target: str, *, wait: float = SNAPSHOT_WAIT) -> SnapshotInfo:
    """Save ``VOL@SNAP`` holding every write acknowledged (flushed) before the call.

    A volume nobody holds is saved at once (its last writer folded its journal in when it
    closed). A volume held by a writer may have flushed writes still in its journal only: the
    writer is asked (``SnapshotRequested``) to fold them in and save the snapshot itself, and
    this waits up to ``wait`` seconds for it; Again if it did not (the request stays pending and
    the writer saves it when it can; a writer that died leaves it to the next one to open the
    volume).
    """
    vol, snap = parse_snapshot(target)
    if not md.lock_status(vol).locked:
        return md.save_snapshot(vol, snap)
    md.request_snapshot(vol, snap)
    deadline = time.monotonic() + wait
    while True:
        for info in md.list_snapshots(vol):
            if info.name == snap:
                return info
        if not md.lock_status(vol).locked:
            # the writer closed meanwhile (folding its journal in): save it from here
            try:
                return md.save_snapshot(vol, snap)
            except AlreadyExists:
                continue  # the writer saved it after all
        if time.monotonic() >= deadline:
            raise Again(
                f"snapshot {target} requested, but the volume's writer has not saved it within "
                f"{wait:g} s; it stays pending and is saved when the volume is next open"
            )
        time.sleep(0.1)


def list_snapshots(md: MetadataService, volume: str) -> list[SnapshotInfo]:
    """Snapshots of ``volume``, oldest first."""
    return md.list_snapshots(volume)


def delete_snapshot(md: MetadataService, target: str) -> None:
    """Delete the snapshot record ``VOL@SNAP`` (blocks are left to the GC)."""
    vol, snap = parse_snapshot(target)
    md.delete_snapshot(vol, snap)


def restore_snapshot(md: MetadataService, target: str) -> INodeRef:
    """Point ``VOL`` back at snapshot ``SNAP``; Locked while the volume is mounted."""
    vol, snap = parse_snapshot(target)
    return md.restore_snapshot(vol, snap)


def _load_inode(istore: INodeStore, ref: INodeRef, size: int) -> INode:
    if ref.inode == VIRTUAL_INODE:
        return INode(ref.volume, VIRTUAL_INODE, size)
    return istore.get_inode(ref)


def open_snapshot(
    md: MetadataService,
    store: BlockStore,
    volume: str,
    snap: str,
    *,
    layer_registry: Registry,
) -> BlockVolume:
    """Open ``volume@snap`` read-only (no lock, no lease); mutations raise Locked."""
    gm = md.global_metadata()
    check_store(store, gm)
    info = md.get_volume(volume)
    snapinfo = md.get_snapshot(volume, snap)
    inode = _load_inode(INodeStore(store), snapinfo.inode_ref, info.size)
    file = File(
        inode,
        store,
        read_only=True,
        block_spec=gm.block_spec,
        layer_registry=layer_registry,
        cache_bytes=0,
    )
    return BlockVolume(md, store, VolumeInfo(info.id, f"{volume}@{snap}", inode.filesize), file)


def open_target(
    md: MetadataService,
    store: BlockStore,
    target: str,
    *,
    owner: str | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
    layer_registry: Registry,
) -> BlockVolume:
    """Open ``VOL`` for writing (locked) or ``VOL@SNAP`` read-only."""
    vol, snap = parse_target(target)
    if snap is not None:
        return open_snapshot(md, store, vol, snap, layer_registry=layer_registry)
    return BlockVolume.open(md, store, vol, owner=owner, lease_ttl=lease_ttl, layer_registry=layer_registry)


def clone(
    md: MetadataService,
    store: BlockStore,
    source: str,
    new_name: str,
    *,
    owner: str | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
) -> VolumeInfo:
    """Create volume ``new_name`` from snapshot ``source`` (``VOL@SNAP``) without copying data.

    The new volume's first INode (a fresh index under the new volume id) carries the snapshot's
    blockset layers, so it points at the very blocks of the snapshot; later writes to either
    volume mint new blocks. The INode is committed under a lock on the new volume. If anything
    fails after the volume was created, the new volume is deleted again.
    """
    vol, snap = parse_snapshot(source)
    gm = md.global_metadata()
    check_store(store, gm)
    src = md.get_volume(vol)
    snapinfo = md.get_snapshot(vol, snap)
    istore = INodeStore(store)
    src_inode = _load_inode(istore, snapinfo.inode_ref, src.size)
    size = src_inode.filesize or src.size
    created = md.create_volume(new_name, size)
    try:
        if not src_inode.blocks:
            return created  # the snapshot is an empty volume: the new one starts empty too
        lease = md.leases.grant(float(lease_ttl))
        try:
            lock = md.lock_volume(new_name, owner or default_owner(), lease)
            try:
                index = md.allocate_inode_index(created.id)
                inode = INode(
                    created.id, index, src_inode.filesize, dict(src_inode.attrs), list(src_inode.blocks)
                )
                istore.write_inode(inode)
                store.flush()
                md.commit_inode(lock, inode.ref)
            finally:
                md.unlock(lock)
        finally:
            with contextlib.suppress(TorusError):
                md.leases.revoke(lease)
    except BaseException:
        with contextlib.suppress(TorusError, NotExist):
            md.delete_volume(new_name)
        raise
    return created
