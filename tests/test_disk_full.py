"""A full disk is an honest error: ENOSPC/EDQUOT become OutOfSpace in every file-backed store,
SQLite's SQLITE_FULL becomes MetadataOutOfSpace, and the disk health check reports it."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path

import pytest
from torus_blockstore_file import FileBlockStore
from torus_sqlite.backend import SQLiteBackend

from torus_core.block.nbd_export import SpaceGuard
from torus_core.blockstore import BlockStoreConfig
from torus_core.daemon.health import DiskSpaceCheck
from torus_core.errors import (
    InvalidArgument,
    MetadataOutOfSpace,
    MetadataUnavailable,
    OutOfSpace,
    disk_full_is_out_of_space,
)
from torus_core.eventlog import NewEvent
from torus_core.nbd.constants import Errno
from torus_core.nbd.errmap import errno_for
from torus_core.refs import BlockRef

BS = 4096


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_or_quota_becomes_out_of_space_and_nbd_enospc(code):
    with pytest.raises(OutOfSpace, match=r"^journal of volume 3: (No space left|Disk quota)") as err:
        with disk_full_is_out_of_space("journal of volume 3"):
            raise OSError(code, os.strerror(code))
    assert errno_for(err.value) == Errno.ENOSPC


def test_other_os_errors_pass_unchanged():
    with pytest.raises(PermissionError), disk_full_is_out_of_space("x"):
        raise PermissionError(errno.EACCES, "denied")


def test_sqlite_full_is_metadata_out_of_space_retryable_and_enospc(tmp_path):
    db = tmp_path / "meta.db"
    backend = SQLiteBackend.from_url(f"sqlite:///{db}")
    try:
        backend.log.append([NewEvent("s", 1, "t", b"x")])
        pages = sqlite3.connect(db).execute("PRAGMA page_count").fetchone()[0]
        with backend._db.raw_write() as conn:  # the shared writer connection: limit its file
            conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(MetadataOutOfSpace, match="disk is full") as err:
            for version in range(2, 200):
                backend.log.append([NewEvent("s", version, "t", os.urandom(4096))])
        assert isinstance(err.value, MetadataUnavailable) and err.value.retryable
        assert errno_for(err.value) == Errno.ENOSPC
    finally:
        backend.close()


def _store(path: Path, capacity: int = 16, **options: object) -> FileBlockStore:
    return FileBlockStore.open(
        BlockStoreConfig(block_size=BS, capacity_bytes=capacity * BS, path=str(path), options=options)
    )


def test_the_file_store_keeps_its_reserve_free_but_rewrites_backed_slots(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    store = _store(tmp_path / "s", reserve=0)
    store.write_block(BlockRef(1, 1, 1), b"a")
    store.delete_block(BlockRef(1, 1, 1))
    store.flush()  # slot 0 is free again, and backed by disk
    store.close()
    store = _store(tmp_path / "s", reserve=free * 2)  # more than the disk has: no new space
    try:
        store.write_block(BlockRef(1, 1, 2), b"b")  # slot 0: already on disk, takes nothing
        with pytest.raises(OutOfSpace, match=r"keeps .* for metadata and journals"):
            store.write_block(BlockRef(1, 1, 3), b"c")
        assert store.get_block(BlockRef(1, 1, 2))[:1] == b"b"
        assert not store.has_block(BlockRef(1, 1, 3))
        store.write_block(BlockRef(1, 1, 2), b"b")  # the refused write leaked no slot
    finally:
        store.close()


@pytest.mark.parametrize("bad", [-1, "lots", 1.5, True])
def test_a_bad_reserve_is_invalid_argument(tmp_path, bad):
    with pytest.raises(InvalidArgument):
        _store(tmp_path / "s", reserve=bad)


def test_disk_check_reports_low_free_space_and_recent_enospc(tmp_path):
    guard = SpaceGuard.__new__(SpaceGuard)
    guard.last_enospc = None
    check = DiskSpaceCheck(str(tmp_path), min_free_bytes=0, guard=lambda: guard, interval=0.05).start()
    try:
        deadline = time.monotonic() + 5
        while not check()[0]:
            assert time.monotonic() < deadline, check()
            time.sleep(0.02)
        guard.last_enospc = time.monotonic()
        ok, reason = check()
        assert not ok and "answered ENOSPC" in reason
        guard.last_enospc = time.monotonic() - 61
        assert check() == (True, "")
        check.min_free_bytes = 1 << 62
        ok, reason = check()
        assert not ok and "free, below the" in reason and str(tmp_path) in reason
    finally:
        check.stop()
