"""torusctl against a real SQLite metadata file: the foundation's user story, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from torus_core.cli.torusctl import cli


@pytest.fixture
def run(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/meta.db"

    def invoke(*args: str, ok: bool = True, input: str | None = None) -> Result:
        result = CliRunner().invoke(cli, ["--metadata", url, *args], input=input)
        if ok:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code != 0, result.output
        return result

    return invoke


def test_init_stores_a_cluster_key_that_events_never_show(run, tmp_path: Path) -> None:
    from torus_sqlite.backend import SQLiteBackend

    from torus_core.metadata import CLUSTER_KEY

    run("init", "--block-size", "64KiB")
    backend = SQLiteBackend.from_url(f"sqlite:///{tmp_path}/meta.db")
    try:
        raw = backend.leases.get(CLUSTER_KEY)
    finally:
        backend.close()
    assert raw is not None and len(bytes.fromhex(raw.decode())) == 32
    assert raw.decode() not in run("events", "--json").output


def test_format_create_list_resize_delete_and_read_history(run) -> None:
    out = run("init", "--block-size", "64KiB").output
    assert "formatted" in out and "cluster key created" in out
    assert "already formatted" in run("init", ok=False).output
    assert "already formatted" in run("init", "--if-needed").output
    assert "block size: 65536" in run("init", "--view").output
    run("volume", "create-block", "alpha", "1GiB")
    run("volume", "create-block", "beta", "2G")
    listing = run("volume", "list", "--csv").output.splitlines()
    assert listing == ["alpha,1073741824,block,free", "beta,2000000000,block,free"]
    run("volume", "resize", "alpha", "3GiB")
    assert "shrinking" in run("volume", "resize", "alpha", "1GiB", ok=False).output
    run("volume", "delete", "beta")
    assert run("volume", "list", "--csv").output.splitlines() == ["alpha,3221225472,block,free"]
    events = [json.loads(line) for line in run("events", "--json").output.splitlines()]
    topics = [e["topic"] for e in events]
    assert topics[0] == "torus.cluster.formatted"
    assert "torus.volume.resized" in topics and "torus.volume.deleted" in topics
    assert [e["position"] for e in events] == list(range(1, len(events) + 1))
    ring_only = run("events", "--stream", "ring", "--json").output.splitlines()
    assert [json.loads(x)["topic"] for x in ring_only] == ["torus.ring.changed"]


def test_commands_on_an_unformatted_cluster_fail_with_a_clear_message(run) -> None:
    result = run("ring", "get", ok=False)
    assert "not formatted" in result.output and "Traceback" not in result.output


def test_bad_sizes_and_duplicate_names_are_reported_not_crashed(run) -> None:
    run("init")
    assert "cannot parse size" in run("volume", "create-block", "v", "lots", ok=False).output
    run("volume", "create-block", "v", "1MiB")
    assert "already exists" in run("volume", "create-block", "v", "1MiB", ok=False).output
    assert "already exists" in run("volume", "create-block", "v", "1MiB", "--if-missing").output
    assert "does not exist" in run("volume", "delete", "nope", ok=False).output


def test_ring_replication_change_is_a_new_ring_version(run) -> None:
    run("init", "--replication", "2")
    run("ring", "set-replication", "3")
    described = run("ring", "get").output
    assert "Version: 2" in described
    assert "aborted" in run("wipe", input="no\n", ok=False).output
    run("wipe", "--yes-i-am-sure")
    run("init")  # a wiped cluster can be formatted again


def test_replication_zero_is_a_usage_error_and_changes_nothing(run) -> None:
    run("init")
    before = run("ring", "get").output
    for args in (("ring", "set-replication", "0"), ("ring", "manual-change", "-r", "0"), ("init", "-r", "0")):
        result = run(*args, ok=False)
        assert result.exit_code == 2 and "x>=1" in result.output, (args, result.output)
    assert run("ring", "get").output == before


def test_unknown_metadata_scheme_lists_available_backends(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--metadata", "foo://x", "volume", "list"])
    assert result.exit_code == 1
    assert "unknown metadata URL scheme 'foo'; known schemes:" in result.output
    assert "sqlite" in result.output and "etcds" in result.output


def test_metadata_migrate_copies_history_and_refuses_a_non_empty_target(run, tmp_path: Path) -> None:
    run("init")
    run("volume", "create-block", "v", "1GiB")
    target = f"sqlite:///{tmp_path}/target.db"
    assert "projections match" in run("metadata", "migrate", "--to", target).output
    copied = CliRunner().invoke(cli, ["--metadata", target, "volume", "list", "--csv"])
    assert copied.output.splitlines() == ["v,1073741824,block,free"]
    again = run("metadata", "migrate", "--to", target, ok=False)
    assert "must be empty" in again.output


def test_events_follow_prints_new_events_of_the_stream_once(run, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    run("init")
    run("volume", "create-block", "v", "1MiB")
    url = f"sqlite:///{tmp_path}/meta.db"
    ctl = str(Path(sys.executable).parent / "torusctl")
    proc = subprocess.Popen(
        [ctl, "--metadata", url, "events", "--follow", "--stream", "volume-1", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["topic"] == "torus.volume.created"
        run("volume", "resize", "v", "2MiB")
        run("volume", "create-block", "other", "1MiB")  # another stream: not shown
        run("volume", "resize", "v", "3MiB")
        deadline = time.monotonic() + 20
        seen = []
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.append(json.loads(proc.stdout.readline()))
        assert [e["topic"] for e in seen] == ["torus.volume.resized", "torus.volume.resized"]
        assert [e["data"]["new_size"] for e in seen] == [2 << 20, 3 << 20]
    finally:
        proc.kill()
        proc.wait(10)
