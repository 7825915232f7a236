"""Data directories: private permissions whatever the umask, and the binding to one cluster.

Every store that writes into a data directory (file block store, journal segments, SQLite
metadata, identity files) is opened for real under a permissive umask, and every file and
directory it leaves must be private to the user (0600 / 0700), as etcd's data dir is.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from torus_blockstore_file import FileBlockStore
from torus_sqlite.backend import SQLiteBackend

from torus_core.block.identity import DataDirClaim
from torus_core.blockstore import BlockStoreConfig
from torus_core.datadir import (
    bind_cluster,
    load_or_create_uuid,
    open_private,
    private_dir,
    unbind_cluster,
)
from torus_core.errors import ConfigError, ForeignDataDir
from torus_core.eventlog import NewEvent
from torus_core.journal.record import Extent, encode_record
from torus_core.journal.store import JournalStore
from torus_core.refs import BlockRef


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 000: nothing may rely on the umask to keep data private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything below it, by relative path."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def assert_private(root: Path) -> None:
    found = modes(root)
    loose = {name: oct(mode) for name, mode in found.items() if mode & 0o077}
    assert not loose, f"readable by other users: {loose}"
    for name in found:
        path = root / name
        want = 0o700 if path.is_dir() else 0o600
        assert found[name] == want, (name, oct(found[name]))


def test_file_block_store_files_and_directory_are_private_under_umask_0(tmp_path, open_umask):
    store_dir = tmp_path / "data" / "block"
    store = FileBlockStore.open(
        BlockStoreConfig(block_size=512, capacity_bytes=8 * 512, path=str(store_dir), options={})
    )
    try:
        store.write_block(BlockRef(1, 1, 1), b"x" * 512)
        store.flush()
    finally:
        store.close()
    assert {"data.blk", "index.blk"} <= set(os.listdir(store_dir))
    assert_private(tmp_path / "data")


def test_journal_segments_epoch_files_and_directories_are_private_under_umask_0(tmp_path, open_umask):
    root = tmp_path / "journal" / "cluster-id"
    js = JournalStore(root)
    try:
        js.fence(3, 1)
        js.append(3, 1, [encode_record(3, 1, 1, [Extent(0, 1, b"x")])])
    finally:
        js.close()
    assert any(p.suffix == ".seg" for p in (root / "3").iterdir())
    assert_private(tmp_path / "journal")


def test_sqlite_database_and_its_wal_and_shm_files_are_private_under_umask_0(tmp_path, open_umask):
    db = tmp_path / "meta" / "metadata.db"
    SQLiteBackend.prepare_local(f"sqlite:///{db}")
    backend = SQLiteBackend.from_url(f"sqlite:///{db}")
    try:
        backend.log.append([NewEvent("s", 1, "t", b"x")])
        names = set(os.listdir(db.parent))
        assert {"metadata.db", "metadata.db-wal", "metadata.db-shm"} <= names, names
        assert_private(tmp_path / "meta")
    finally:
        backend.close()


def test_identity_files_are_private_under_umask_0(tmp_path, open_umask):
    data = tmp_path / "data"
    load_or_create_uuid(str(data))
    claim = DataDirClaim.acquire(str(data))
    assert claim is not None
    try:
        bind_cluster(str(data), "c1")
        assert_private(data / "metadata")
    finally:
        claim.release()


def test_files_and_directories_of_an_older_torus_are_restricted_on_open_and_logged(tmp_path, caplog):
    """A store written with the old hard-coded 0755/0644 is tightened when it is opened."""
    store_dir = tmp_path / "block"
    cfg = BlockStoreConfig(block_size=512, capacity_bytes=8 * 512, path=str(store_dir), options={})
    FileBlockStore.open(cfg).close()
    os.chmod(store_dir, 0o755)
    for name in ("data.blk", "index.blk"):
        os.chmod(store_dir / name, 0o644)
    db = tmp_path / "metadata.db"
    SQLiteBackend.from_url(f"sqlite:///{db}").close()
    for path in tmp_path.glob("metadata.db*"):
        os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="torus_core.datadir"):
        FileBlockStore.open(cfg).close()
        SQLiteBackend.from_url(f"sqlite:///{db}").close()
    assert_private(store_dir)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.glob("metadata.db*"))
    assert "restricted it to 0600" in caplog.text and "restricted it to 0700" in caplog.text


def test_a_user_chosen_directory_is_created_private_but_an_existing_one_only_warned_about(
    tmp_path, caplog, open_umask
):
    fresh = tmp_path / "a" / "b"
    private_dir(fresh, fix_existing=False)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(0o755)
    with caplog.at_level(logging.WARNING, logger="torus_core.datadir"):
        private_dir(shared, fix_existing=False)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # not ours to change
    assert "other users can look into it" in caplog.text


def test_open_private_keeps_a_stricter_mode(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    os.chmod(path, 0o400)
    os.close(open_private(path, os.O_RDONLY))
    assert stat.S_IMODE(path.stat().st_mode) == 0o400


# --- cluster binding --------------------------------------------------------------------------


def test_a_data_dir_is_bound_to_the_first_cluster_and_refuses_another_naming_the_owner(tmp_path):
    data = str(tmp_path)
    bind_cluster(data, "cluster-a")
    bind_cluster(data, "cluster-a")  # the same cluster again: fine
    with pytest.raises(ForeignDataDir) as err:
        bind_cluster(data, "cluster-c")
    assert isinstance(err.value, ConfigError)
    assert err.value.bound_cluster == "cluster-a" and err.value.cluster_id == "cluster-c"
    assert "belongs to cluster cluster-a" in str(err.value) and "cluster-c" in str(err.value)
    assert (tmp_path / "metadata" / "cluster").read_text() == "cluster-a\n"


def test_a_cluster_without_an_id_binds_nothing_but_cannot_use_a_bound_dir(tmp_path):
    bind_cluster(str(tmp_path / "legacy"), "")
    assert not (tmp_path / "legacy" / "metadata" / "cluster").exists()
    bind_cluster(str(tmp_path / "bound"), "cluster-a")
    with pytest.raises(ForeignDataDir, match="belongs to cluster cluster-a"):
        bind_cluster(str(tmp_path / "bound"), "")


def test_unbinding_only_releases_the_named_cluster(tmp_path):
    data = str(tmp_path)
    bind_cluster(data, "cluster-a")
    assert not unbind_cluster(data, "cluster-c")
    with pytest.raises(ForeignDataDir):
        bind_cluster(data, "cluster-c")
    assert unbind_cluster(data, "cluster-a")
    bind_cluster(data, "cluster-c")
