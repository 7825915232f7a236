"""SQLite-specific behaviour: URLs, plugin registration, lock timeouts, processes, SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torus_sqlite.backend import SQLiteBackend, parse_url

from torus_core.errors import Closed, CompareFailed, ConfigError, InvalidArgument, MetadataUnavailable
from torus_core.eventlog import NewEvent
from torus_core.plugins import make_plugin_manager

APPENDER = str(Path(__file__).with_name("_appender.py"))


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, APPENDER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- URLs and registration ----------------------------------------------------------------------


def test_url_with_four_slashes_is_an_absolute_path(tmp_path: Path) -> None:
    path, opts = parse_url(f"sqlite:///{tmp_path}/meta.db")
    assert path == f"{tmp_path}/meta.db" and os.path.isabs(path)
    assert opts == {}


def test_url_with_three_slashes_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with SQLiteBackend.from_url("sqlite:///relative.db") as backend:
        backend.log.append([NewEvent("s", 1, "t", b"")])
    assert (tmp_path / "relative.db").exists()


def test_url_options_are_parsed_and_validated() -> None:
    assert parse_url("sqlite:///m.db?busy_timeout=2&poll_interval=0.01")[1] == {
        "busy_timeout": 2.0,
        "poll_interval": 0.01,
    }


@pytest.mark.parametrize(
    "url",
    [
        "etcd://127.0.0.1:2379",
        "sqlite://host/meta.db",
        "sqlite:meta.db",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite:///dir/",
        "sqlite:///m.db?nope=1",
        "sqlite:///m.db?busy_timeout=-1",
        "sqlite:///m.db?busy_timeout=abc",
        "",
    ],
)
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        SQLiteBackend.from_url(url)


def test_missing_directory_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SQLiteBackend.from_url(f"sqlite:///{tmp_path}/no/such/dir/meta.db")


def test_plugin_registers_the_sqlite_backend() -> None:
    regs = make_plugin_manager().collect_registries()
    assert regs.metadata.get("sqlite") is SQLiteBackend


def test_pragmas_give_wal_and_full_sync(tmp_path: Path) -> None:
    with SQLiteBackend.from_url(f"sqlite:///{tmp_path}/m.db") as backend:
        with backend._db.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_closed_backend_raises_closed_and_close_is_idempotent(tmp_path: Path) -> None:
    backend = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/m.db")
    backend.close()
    backend.close()
    with pytest.raises(Closed):
        backend.log.head_position()


def test_malformed_events_raise_invalid_argument_and_write_nothing(tmp_path: Path) -> None:
    with SQLiteBackend.from_url(f"sqlite:///{tmp_path}/m.db") as backend:
        for bad in (
            NewEvent("", 1, "t", b""),
            NewEvent("s", 0, "t", b""),
            NewEvent("s", 1, "", b""),
            NewEvent("s", 1, "t", "not-bytes"),  # type: ignore[arg-type]
        ):
            with pytest.raises(InvalidArgument):
                backend.log.append([NewEvent("ok", 1, "t", b""), bad])
        with pytest.raises(InvalidArgument):
            backend.log.read_all(after=-1)
        assert backend.log.head_position() == 0


def test_write_lock_held_too_long_raises_metadata_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with SQLiteBackend.from_url(f"sqlite:///{path}?busy_timeout=0.3") as backend:
        backend.log.append([NewEvent("s", 1, "t", b"")])
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            start = time.monotonic()
            with pytest.raises(MetadataUnavailable) as info:
                backend.log.append([NewEvent("s", 2, "t", b"")])
            assert info.value.retryable
            assert time.monotonic() - start < 10
            assert backend.log.read_stream("s")[-1].version == 1  # readers are not blocked (WAL)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert backend.log.append([NewEvent("s", 2, "t", b"")]) == [2]


def test_unique_constraint_backstop_translates_to_compare_failed(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with SQLiteBackend.from_url(f"sqlite:///{path}") as backend:
        backend.log.append([NewEvent("s", 1, "t", b"")])
        with pytest.raises(CompareFailed), backend._db.write() as conn:
            conn.exec_driver_sql(
                "INSERT INTO events (position, stream_id, version, topic, state, timestamp) "
                "VALUES (99, 's', 1, 't', x'', 0)"
            )


# --- processes ----------------------------------------------------------------------------------


def test_processes_appending_concurrently_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    SQLiteBackend.from_url(url).close()  # create the schema once, up front
    n_procs, count = 3, 20
    procs = [_spawn("shared", url, str(i), str(count)) for i in range(n_procs)]
    acked: set[tuple[str, int, int]] = set()
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            for line in out.splitlines():
                stream, version, position = line.split()
                acked.add((stream, int(version), int(position)))
    finally:
        for p in procs:
            _stop(p)
    assert len(acked) == 2 * n_procs * count
    with SQLiteBackend.from_url(url) as backend:
        stored = backend.log.read_all()
        assert {(e.stream_id, e.version, e.position) for e in stored} == acked
        assert [e.position for e in stored] == list(range(1, len(stored) + 1))
        assert [e.version for e in backend.log.read_stream("shared")] == list(range(1, n_procs * count + 1))
        for i in range(n_procs):
            assert [e.state for e in backend.log.read_stream(f"own-{i}")] == [
                f"{i}:{j}".encode() for j in range(count)
            ]


def test_sigkill_mid_append_loses_no_acknowledged_event(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    proc = _spawn("forever", url, "1000000")
    acked: list[tuple[int, int]] = []
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            _, v_text, p_text = line.split()
            acked.append((int(v_text), int(p_text)))
        assert len(acked) >= 40, proc.stderr.read() if proc.stderr else ""
    finally:
        _stop(proc)
    # Lines printed before the kill are still in the pipe: they were acknowledged too.
    rest = proc.stdout.read()
    for line in rest.splitlines():
        parts = line.split()
        if len(parts) == 3:
            acked.append((int(parts[1]), int(parts[2])))
    assert proc.returncode == -signal.SIGKILL
    with SQLiteBackend.from_url(url) as backend:
        stored = backend.log.read_stream("kill")
        by_version = {e.version: e.position for e in stored}
        for version, position in acked:
            assert by_version.get(version) == position
        assert [e.version for e in stored] == list(range(1, len(stored) + 1))
        assert len(stored) % 2 == 0  # batches of two are never torn
        assert [e.position for e in backend.log.read_all()] == list(range(1, len(stored) + 1))
        with backend._db.read() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        assert backend.log.append([NewEvent("kill", len(stored) + 1, "t", b"")]) == [len(stored) + 1]


def test_pooled_plain_reads_see_other_connections_commits_at_once(tmp_path: Path) -> None:
    """The hot reads use pooled sqlite3 connections in autocommit: no stale read snapshot is kept."""
    url = f"sqlite:///{tmp_path}/m.db"
    with SQLiteBackend.from_url(url) as reader, SQLiteBackend.from_url(url) as writer:
        assert reader.log.head_position() == 0
        assert reader.leases.get("k") is None
        lease = writer.leases.grant(30)
        for version in (1, 2):
            writer.log.append([NewEvent("s", version, "t", b"x")])
            assert reader.log.head_position() == version
            assert reader.log.stream_version("s") == version
            assert [e.version for e in reader.log.read_stream("s")] == list(range(1, version + 1))
        writer.leases.put("k", b"v", lease)
        assert reader.leases.get("k") == b"v"
        writer.leases.revoke(lease)
        assert reader.leases.get("k") is None


def test_pooled_reads_from_many_threads_agree_and_fail_closed_after_close(tmp_path: Path) -> None:
    import threading

    backend = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/m.db")
    backend.log.append([NewEvent("s", v, "t", b"x") for v in range(1, 11)])
    results: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(50):
                results.append(len(backend.log.read_all(after=0)))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and results == [10] * 200
    backend.close()
    for call in (backend.log.head_position, lambda: backend.leases.get("k"), lambda: backend.log.read_all()):
        with pytest.raises(Closed):
            call()
