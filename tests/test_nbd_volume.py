# mypy: allow-untyped-defs
"""Torus volumes served over NBD (VolumeExportProvider in-process, SQLite + file store, 64 KiB
blocks), checked with real clients: nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io, fio."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from torus_blockstore_file.store import FileBlockStore
from torus_sqlite.backend import SQLiteBackend

from torus_core.block import BlockVolume, VolumeExportProvider, create_snapshot, dump, restore_snapshot
from torus_core.blockset import default_layer_registry
from torus_core.blockstore import BlockStore, BlockStoreConfig
from torus_core.metadata import MetadataService
from torus_core.nbd import NBDServer, ServerThread
from torus_core.refs import BlockType
from torus_core.ring.builtin import builtin_ring_types

#: the built-in ring types (no plugins loaded)
RING_TYPES = builtin_ring_types()

#: the built-in blockset layers (tests use no plugin layers)
LAYERS = default_layer_registry()

pytestmark = pytest.mark.nbd_clients

BS = 64 * 1024
MiB = 1 << 20
SIZE = 16 * MiB
TIMEOUT = 60
SYSTEM_PYTHON = "/usr/bin/python3"


def run(*cmd: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a client with a bounded time; fail the test with its output on error."""
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} is not installed (see /work/shared/env-notes.md)")
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def nbd_prog(uri: str, script: str) -> str:
    prog = "import nbd\nh = nbd.NBD()\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
    return prog + f"h.connect_uri({uri!r})\n" + textwrap.dedent(script)


def nbdsh(uri: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a libnbd Python script (``h`` connected to ``uri``) under the system Python."""
    return run(SYSTEM_PYTHON, "-c", nbd_prog(uri, script), check=check)


def wait_until(pred: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def md(tmp_path: Path) -> Iterator[MetadataService]:
    backend = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/meta.db")
    m = MetadataService(backend, ring_types=RING_TYPES)
    m.format(BS, "crc,base")
    m.create_volume("vol", SIZE)
    yield m
    backend.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlockStore]:
    s = FileBlockStore.open(BlockStoreConfig(BS, 256 * MiB, str(tmp_path / "block")))
    yield s
    s.close()


@pytest.fixture
def provider(md, store) -> Iterator[VolumeExportProvider]:
    p = VolumeExportProvider(md, store, owner="test-server", lease_ttl=5.0, layer_registry=LAYERS)
    yield p
    p.close()


@pytest.fixture
def server(provider) -> Iterator[ServerThread]:
    st = ServerThread(NBDServer(provider, port=0)).start()
    yield st
    st.stop()


@pytest.fixture
def uri(server) -> str:
    return f"nbd://127.0.0.1:{server.port}/vol"


def data_blocks(store: BlockStore) -> int:
    return sum(1 for r in store.iter_refs() if r.type == BlockType.DATA)


def released(md: MetadataService, provider: VolumeExportProvider) -> Callable[[], bool]:
    return lambda: not provider.open_names() and not md.lock_status("vol").locked


def test_nbdinfo_shows_volume_size_features_and_block_sizes(uri, md, provider):
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    (exp,) = info["exports"]
    assert exp["export-name"] == "vol" and exp["export-size"] == SIZE
    for key in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"):
        assert exp[key] is True, key
    assert exp["is_read_only"] is False
    assert (exp["block_size_minimum"], exp["block_size_preferred"]) == (1, BS)
    wait_until(released(md, provider), what="nbdinfo's connection to release the volume")


def test_nbdinfo_list_names_every_volume(server, md):
    md.create_volume("other", MiB)
    out = json.loads(run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{server.port}").stdout)
    assert sorted(e["export-name"] for e in out["exports"]) == ["other", "vol"]


def test_nbdcopy_round_trips_random_data_and_commits_it(uri, tmp_path, md, store, provider):
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(4 * MiB))
    run("nbdcopy", str(src), uri)
    wait_until(released(md, provider), what="the volume to be released")
    run("nbdcopy", uri, str(back))
    data = back.read_bytes()
    assert (
        len(data) == SIZE and data[: 4 * MiB] == src.read_bytes() and data[4 * MiB :] == bytes(SIZE - 4 * MiB)
    )
    wait_until(released(md, provider), what="the volume to be released")
    with BlockVolume.open(
        md, store, "vol", layer_registry=LAYERS
    ) as vol:  # committed to the metadata, not only cached
        assert vol.read_at(0, 4 * MiB) == src.read_bytes()


def test_nbdcopy_keeps_a_sparse_image_sparse(uri, tmp_path, store, md, provider):
    src = tmp_path / "sparse.img"
    with src.open("wb") as f:
        f.truncate(SIZE)
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    run("nbdcopy", str(src), uri)
    wait_until(released(md, provider), what="the volume to be released")
    assert data_blocks(store) == MiB // BS
    mapping = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    runs = [(m["offset"], m["length"], m["type"]) for m in mapping]
    assert runs == [(0, 5 * MiB, 3), (5 * MiB, MiB, 0), (6 * MiB, SIZE - 6 * MiB, 3)]
    run("nbdcopy", uri, str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == src.read_bytes()


def test_qemu_img_convert_and_compare_round_trip(uri, tmp_path):
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(3 * MiB))
        f.seek(11 * MiB + 123)
        f.write(os.urandom(200_000))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)


def test_qemu_io_pattern_writes_read_back(uri):
    writes = ["write -P 0xab 0 128k", "write -P 0xcd 1000000 4k", "write -z 64k 64k", "flush"]
    run("qemu-io", "-f", "raw", *[a for c in writes for a in ("-c", c)], uri)
    reads = ["read -P 0xab 0 64k", "read -P 0 64k 64k", "read -P 0xcd 1000000 4k", "read -P 0 2M 1M"]
    out = run("qemu-io", "-f", "raw", *[a for c in reads for a in ("-c", c)], uri).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == 4


def test_fio_random_write_verify_crc32c(uri, tmp_path):
    out = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--size=4M",
        "--iodepth=8",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
        timeout=120,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 4 * MiB


class Holder:
    """A libnbd client process that runs ``script``, prints ``up`` and keeps its connection open."""

    def __init__(self, uri: str, script: str) -> None:
        body = textwrap.dedent(script) + "\nprint('up', flush=True)\nimport time\ntime.sleep(30)\n"
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", nbd_prog(uri, body)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __enter__(self) -> Holder:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "up":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            pytest.fail(f"nbd client failed: {err}")
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.communicate(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.kill()


def test_flush_returns_only_after_the_new_inode_is_committed(uri, md):
    vid = md.get_volume("vol").id
    before = md.current_inode(vid)
    with Holder(uri, "h.pwrite(b'F' * 70000, 5000)\nh.flush()"):
        # the connection is still open: only FLUSH can have committed
        assert md.current_inode(vid).inode > before.inode


def test_fua_write_commits_without_a_flush(uri, md):
    vid = md.get_volume("vol").id
    with Holder(uri, "h.pwrite(b'U' * 4096, 0, nbd.CMD_FLAG_FUA)"):
        assert md.current_inode(vid).inode > 1


def test_plain_write_is_not_committed_before_flush(uri, md):
    vid = md.get_volume("vol").id
    with Holder(uri, "h.pwrite(b'P' * 4096, 0)"):
        assert md.current_inode(vid).inode == 1


def test_two_connections_share_the_volume_and_one_flush_covers_both(server, md, store, provider):
    uri = f"nbd://127.0.0.1:{server.port}/vol"
    nbdsh(
        uri,
        f"""
        h2 = nbd.NBD()
        h2.connect_uri({uri!r})
        assert h.can_multi_conn() and h2.can_multi_conn()
        h.pwrite(b"A" * 65536, 0)
        h2.pwrite(b"B" * 65536, 65536)
        h2.flush()
        assert h.pread(65536, 65536) == b"B" * 65536
        h2.shutdown()
    """,
    )
    wait_until(released(md, provider), what="both connections to close")
    with BlockVolume.open(md, store, "vol", layer_registry=LAYERS) as vol:
        assert vol.read_at(0, 2 * 65536) == b"A" * 65536 + b"B" * 65536


def test_a_second_server_is_refused_while_the_volume_is_open(server, md, store, provider):
    other = VolumeExportProvider(md, store, owner="intruder", layer_registry=LAYERS)
    second = ServerThread(NBDServer(other, port=0)).start()
    try:
        with Holder(f"nbd://127.0.0.1:{server.port}/vol", "pass"):
            proc = nbdsh(f"nbd://127.0.0.1:{second.port}/vol", "print('connected')", check=False)
            # the handshake refuses the export with NBD_REP_ERR_POLICY and the holder's name
            assert proc.returncode != 0 and "server policy prevents NBD_OPT_GO" in proc.stderr
            assert md.lock_status("vol").owner == "test-server" and other.open_names() == {}
    finally:
        second.stop()
        other.close()


def test_abrupt_client_death_releases_the_lock(uri, md, provider):
    with Holder(uri, "h.pwrite(b'x' * 4096, 0)") as holder:
        assert md.lock_status("vol").locked
        holder.kill()
    wait_until(released(md, provider), timeout=15, what="the lock to be released after SIGKILL")
    assert md.current_inode(md.get_volume("vol").id).inode > 1, "the close after disconnect syncs"


def test_snapshot_export_is_read_only_and_shows_the_snapshot(server, uri, md, provider, tmp_path):
    nbdsh(uri, "h.pwrite(b'S' * 1000, 0)\nh.flush()")
    create_snapshot(md, "vol@s1")
    nbdsh(uri, "h.pwrite(b'T' * 1000, 0)\nh.flush()")
    snap_uri = f"nbd://127.0.0.1:{server.port}/vol@s1"
    info = json.loads(run("nbdinfo", "--json", snap_uri).stdout)
    assert info["exports"][0]["is_read_only"] is True
    out = nbdsh(
        snap_uri,
        "print(h.pread(1000, 0) == b'S' * 1000)\ntry:\n    h.pwrite(b'x', 0)\n"
        "except nbd.Error:\n    print('refused')",
    ).stdout.split()
    assert out == ["True", "refused"]


def test_snapshot_keep_writing_restore_then_dump_equals_snapshot(uri, md, store, provider, tmp_path):
    first = tmp_path / "first.img"
    first.write_bytes(os.urandom(2 * MiB))
    run("nbdcopy", str(first), uri)
    wait_until(released(md, provider), what="the volume to be released")
    create_snapshot(md, "vol@before")
    second = tmp_path / "second.img"
    second.write_bytes(os.urandom(3 * MiB))
    run("nbdcopy", str(second), uri)
    wait_until(released(md, provider), what="the volume to be released")
    restore_snapshot(md, "vol@before")
    out = tmp_path / "dump.img"
    with out.open("wb") as f:
        dump(md, store, "vol", f, layer_registry=LAYERS)
    data = out.read_bytes()
    assert data[: 2 * MiB] == first.read_bytes() and data[2 * MiB :] == bytes(SIZE - 2 * MiB)
