"""``block dump`` and ``block load``: stream a volume to a file and a file into a new volume.

:func:`dump` reads a consistent image: a plain volume name is snapshotted first (temporary
snapshot ``temp-dump-<pid>``, deleted afterwards, like the original), ``VOL@SNAP`` is read
directly. Holes are skipped with ``seek`` when the output is a seekable regular file, so a dump
of a sparse volume stays sparse on disk.

:func:`load` creates the volume (size = the input's size, or ``size`` if larger), copies the
input in block-sized chunks and syncs. All-zero chunks are skipped, so loads stay sparse.

Both show a tqdm progress bar on stderr when asked.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from typing import BinaryIO

from tqdm import tqdm

from torus_core.block.snapshots import open_snapshot, parse_target
from torus_core.block.volume import DEFAULT_LEASE_TTL, BlockVolume
from torus_core.blockstore import BlockStore
from torus_core.errors import InvalidArgument, NotExist, TorusError
from torus_core.metadata import MetadataService, VolumeInfo
from torus_core.registry import Registry

#: Bytes read per step when dumping (a multiple of the block size is used).
_DUMP_CHUNK = 4 * 1024 * 1024


def _bar(total: int, progress: bool, desc: str) -> tqdm:
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        desc=desc,
        leave=False,
    )


def _is_regular_seekable(out: BinaryIO) -> bool:
    try:
        return stat.S_ISREG(os.fstat(out.fileno()).st_mode) and out.seekable()
    except (OSError, ValueError, AttributeError):
        return False


def dump_volume(vol: BlockVolume, out: BinaryIO, *, progress: bool = False) -> int:
    """Write every byte of an opened volume to ``out``; returns the byte count."""
    size = vol.size
    sparse = _is_regular_seekable(out)
    start = out.tell() if sparse else 0
    chunk = max(vol.block_size, _DUMP_CHUNK // vol.block_size * vol.block_size)
    zeros = bytes(chunk)
    with _bar(size, progress, f"dump {vol.name}") as bar:
        pos = 0
        while pos < size:
            n = min(chunk, size - pos)
            for length, hole in vol.extents(pos, n):
                if hole:
                    if sparse:
                        out.seek(length, os.SEEK_CUR)
                    else:
                        left = length
                        while left:
                            k = min(left, chunk)
                            out.write(zeros[:k])
                            left -= k
                else:
                    out.write(vol.read_at(pos, length))
                pos += length
                bar.update(length)
    if sparse:
        out.truncate(start + size)
        out.seek(start + size)
    out.flush()
    return size


def dump(
    md: MetadataService,
    store: BlockStore,
    target: str,
    out: BinaryIO,
    *,
    progress: bool = False,
    layer_registry: Registry,
) -> int:
    """Dump ``VOL`` (through a temporary snapshot) or ``VOL@SNAP`` to ``out``; returns bytes written."""
    vol, snap = parse_target(target)
    temp = None
    if snap is None:
        temp = snap = f"temp-dump-{os.getpid()}"
        md.save_snapshot(vol, temp)
    try:
        opened = open_snapshot(md, store, vol, snap, layer_registry=layer_registry)
        try:
            return dump_volume(opened, out, progress=progress)
        finally:
            opened.close()
    finally:
        if temp is not None:
            with contextlib.suppress(NotExist):
                md.delete_snapshot(vol, temp)


def _input_size(src: BinaryIO) -> int | None:
    try:
        st = os.fstat(src.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    if stat.S_ISREG(st.st_mode):
        return st.st_size - src.tell()
    if stat.S_ISBLK(st.st_mode) and src.seekable():
        here = src.tell()
        end = src.seek(0, os.SEEK_END)
        src.seek(here)
        return end - here
    return None


def load(
    md: MetadataService,
    store: BlockStore,
    src: BinaryIO,
    volume: str,
    size: int | None = None,
    *,
    progress: bool = False,
    owner: str | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
    layer_registry: Registry,
) -> VolumeInfo:
    """Create ``volume`` and copy ``src`` into it (sparse: all-zero blocks are skipped).

    The volume size is the input's size, or ``size`` if given (which must not be smaller).
    An input of unknown length (a pipe) needs ``size``. On failure the new volume is deleted.
    """
    length = _input_size(src)
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise InvalidArgument(f"volume size must be a positive integer, got {size!r}")
    if length is None and size is None:
        raise InvalidArgument("the input's length is unknown (a pipe?): give the volume SIZE")
    if length is not None and size is not None and size < length:
        raise InvalidArgument(f"SIZE {size} is smaller than the input ({length} bytes)")
    vsize = size if size is not None else length
    assert vsize is not None
    if vsize <= 0:
        raise InvalidArgument("the input is empty: give the volume SIZE")
    md.global_metadata()
    info = md.create_volume(volume, vsize)
    try:
        vol = BlockVolume.open(
            md, store, volume, owner=owner, lease_ttl=lease_ttl, layer_registry=layer_registry
        )
        try:
            bs = vol.block_size
            zeros = bytes(bs)
            with _bar(length if length is not None else vsize, progress, f"load {volume}") as bar:
                pos = 0
                while True:
                    chunk = src.read(bs)
                    if not chunk:
                        break
                    if pos + len(chunk) > vsize:
                        raise InvalidArgument(f"the input is longer than the volume size {vsize}")
                    if chunk != zeros[: len(chunk)]:
                        vol.write_at(pos, chunk)
                    pos += len(chunk)
                    bar.update(len(chunk))
            vol.sync()
        finally:
            vol.close()
    except BaseException:
        with contextlib.suppress(TorusError):
            md.delete_volume(volume)
        raise
    return info
