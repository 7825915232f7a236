# mypy: allow-untyped-defs
"""The NBD server checked with independent real clients: libnbd (nbdinfo, nbdcopy, nbdsh),
qemu-img/qemu-io and fio's nbd engine. Everything runs on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.nbd import MemoryExportProvider, NBDServer, ServerThread
from torus_core.nbd.memory import MemoryStore

pytestmark = pytest.mark.nbd_clients

SIZE = 64 * 1024 * 1024
TIMEOUT = 60
SYSTEM_PYTHON = "/usr/bin/python3"


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (see /work/shared/env-notes.md)")


def run(*cmd: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a client with a bounded time; fail the test with its output on error."""
    _need(cmd[0])
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def nbdsh(uri: str, script: str) -> str:
    """Run a libnbd Python script (``h`` is connected to ``uri``) under the system Python."""
    prog = "import nbd\nh = nbd.NBD()\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
    prog += f"h.connect_uri({uri!r})\n" + textwrap.dedent(script)
    return run(SYSTEM_PYTHON, "-c", prog).stdout


@pytest.fixture
def provider() -> MemoryExportProvider:
    p = MemoryExportProvider()
    p.add("disk", SIZE, description="client test disk")
    p.add("ro", 1024 * 1024, read_only=True)
    return p


@pytest.fixture
def server(provider) -> Iterator[ServerThread]:
    st = ServerThread(NBDServer(provider, port=0)).start()
    yield st
    st.stop()


@pytest.fixture
def uri(server) -> str:
    return f"nbd://127.0.0.1:{server.port}/disk"


@pytest.fixture
def store(provider) -> MemoryStore:
    return provider.open_export("disk").store


def test_nbdinfo_json_shows_size_flags_block_sizes_and_allocation_context(uri):
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (exp,) = info["exports"]
    assert exp["export-size"] == SIZE and exp["export-name"] == "disk"
    for key in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"):
        assert exp[key] is True, key
    assert exp["is_read_only"] is False
    assert (exp["block_size_minimum"], exp["block_size_preferred"]) == (1, 4096)
    assert exp["block_size_maximum"] == 32 * 1024 * 1024
    assert exp["contexts"] == ["base:allocation"]


def test_nbdinfo_reports_read_only_exports(server):
    info = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{server.port}/ro").stdout)
    (exp,) = info["exports"]
    assert exp["is_read_only"] is True and exp["can_trim"] is False


def test_nbdinfo_list_names_all_exports(server):
    out = json.loads(run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{server.port}").stdout)
    assert sorted(e["export-name"] for e in out["exports"]) == ["disk", "ro"]


def test_nbdcopy_round_trips_random_data(uri, tmp_path: Path):
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(8 * 1024 * 1024))
    run("nbdcopy", str(src), uri)
    run("nbdcopy", uri, str(back))
    assert back.stat().st_size == SIZE
    with back.open("rb") as f:
        assert f.read(8 * 1024 * 1024) == src.read_bytes()
        assert f.read() == bytes(SIZE - 8 * 1024 * 1024)


def test_nbdcopy_keeps_a_sparse_image_sparse(uri, tmp_path: Path, store):
    src = tmp_path / "sparse.img"
    with src.open("wb") as f:
        f.truncate(SIZE)
        f.seek(5 * 1024 * 1024)
        f.write(os.urandom(1024 * 1024))
    run("nbdcopy", str(src), uri)
    assert store.allocated_bytes() == 1024 * 1024
    mapping = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    runs = [(m["offset"], m["length"], m["type"]) for m in mapping]
    assert runs == [(0, 5 << 20, 3), (5 << 20, 1 << 20, 0), (6 << 20, SIZE - (6 << 20), 3)]
    run("nbdcopy", uri, str(tmp_path / "back.img"))
    assert (tmp_path / "back.img").read_bytes() == src.read_bytes()


def test_qemu_img_convert_and_compare(uri, tmp_path: Path):
    src = tmp_path / "q.raw"
    src.write_bytes(os.urandom(2 * 1024 * 1024) + bytes(SIZE - 2 * 1024 * 1024))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    src.write_bytes(b"\x01" + src.read_bytes()[1:])
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri, check=False).returncode == 1


def test_qemu_io_pattern_write_then_read(uri):
    run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 256k", uri)
    ok = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 256k", uri)
    assert "read 262144/262144 bytes" in ok.stdout
    bad = run("qemu-io", "-f", "raw", "-c", "read -P 0xcd 1M 256k", uri, check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_fio_random_writes_verify_with_crc32c(uri):
    out = run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
        "--iodepth=16", "--size=8M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    )  # fmt: skip
    report = json.loads(out.stdout[out.stdout.index("{") :])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 8 * 1024 * 1024 and job["read"]["io_bytes"] == 8 * 1024 * 1024


def test_nbdsh_fua_trim_zero_and_block_status(uri, store):
    out = nbdsh(
        uri,
        """
        assert h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
        h.pwrite(b"\\x5a" * 65536, 0, nbd.CMD_FLAG_FUA)
        h.trim(16384, 0)
        h.zero(16384, 16384, nbd.CMD_FLAG_NO_HOLE)
        h.zero(16384, 32768)
        h.flush()
        got = []
        def cb(meta, offset, entries, err):
            got.append((meta, offset, list(entries)))
            return 0
        h.block_status(65536 * 2, 0, cb)
        assert h.pread(65536, 0) == bytes(49152) + b"\\x5a" * 16384
        print(got)
        """,
    )
    ((meta, offset, entries),) = eval(out)
    assert (meta, offset) == ("base:allocation", 0)
    assert entries == [16384, 3, 16384, 0, 16384, 3, 16384, 0, 65536, 3]
    assert store.allocated_bytes() == 32768


def test_nbdsh_parallel_aio_reads_all_complete_with_right_data(uri):
    out = nbdsh(
        uri,
        """
        import os
        blobs = [os.urandom(65536) for _ in range(32)]
        for i, b in enumerate(blobs):
            h.pwrite(b, i * 65536)
        bufs = [nbd.Buffer(65536) for _ in blobs]
        cookies = [h.aio_pread(buf, i * 65536) for i, buf in enumerate(bufs)]
        assert h.aio_in_flight() > 1
        for _ in range(1000):
            if h.aio_in_flight() == 0:
                break
            h.poll(100)
        assert all(h.aio_command_completed(c) for c in cookies)
        assert all(bytes(buf.to_bytearray()) == b for buf, b in zip(bufs, blobs))
        print("ALL", len(cookies))
        """,
    )
    assert out.strip() == "ALL 32"


def test_nbdsh_write_to_read_only_export_fails_with_eperm(server):
    out = nbdsh(
        f"nbd://127.0.0.1:{server.port}/ro",
        """
        assert h.is_read_only()
        h.set_strict_mode(0)  # send the write anyway: the server must refuse it
        try:
            h.pwrite(b"x", 0)
        except nbd.Error as e:
            print("ERRNO", e.errno)
        """,
    )
    assert out.strip() == "ERRNO EPERM"


def test_libnbd_upgrades_to_tls_when_the_server_requires_it(provider, tmp_path: Path):
    import ssl

    run(
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
        "-days", "1", "-subj", "/CN=localhost",
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with ServerThread(NBDServer(provider, port=0, tls=ctx, tls_required=True)) as st:
        prog = textwrap.dedent(
            f"""
            import nbd
            h = nbd.NBD()
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_verify_peer(False)
            h.set_export_name("disk")
            h.connect_tcp("127.0.0.1", "{st.port}")
            assert h.get_tls_negotiated()
            h.pwrite(b"secret", 4096)
            print(h.pread(6, 4096).decode())
            """
        )
        assert run(SYSTEM_PYTHON, "-c", prog).stdout.strip() == "secret"
        plain = run(SYSTEM_PYTHON, "-c", prog.replace("TLS_REQUIRE", "TLS_DISABLE"), check=False)
        assert plain.returncode != 0  # without TLS the server refuses to serve
        assert "connect_tcp" in plain.stderr and "TLS" in plain.stderr.upper(), plain.stderr
