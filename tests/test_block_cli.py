# mypy: allow-untyped-defs
"""``torusctl block ...`` through click's runner on a temp data dir (SQLite + file store)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from torus_core.cli.torusctl import cli

MiB = 1 << 20


@pytest.fixture
def tctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for var in [v for v in os.environ if v.startswith("TORUS_")]:
        monkeypatch.delenv(var)
    data = tmp_path / "data"
    data.mkdir()
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True, stdin: bytes | None = None):
        res = runner.invoke(cli, ["--data-dir", str(data), *args], input=stdin, catch_exceptions=False)
        if ok:
            assert res.exit_code == 0, res.output
        return res

    invoke("init", "--block-size", "64KiB")
    return invoke


def test_snapshot_create_list_restore_delete(tctl, tmp_path):
    src = tmp_path / "a.img"
    src.write_bytes(os.urandom(MiB))
    tctl("block", "load", str(src), "v", "2MiB")
    tctl("block", "snapshot", "create", "v@one")
    listed = tctl("block", "snapshot", "list", "v", "--csv").output.splitlines()
    assert [line.split(",")[0] for line in listed] == ["one"]
    tctl("block", "snapshot", "restore", "v@one")
    tctl("block", "snapshot", "delete", "v@one")
    assert tctl("block", "snapshot", "list", "v", "--csv").output == ""


def test_clone_then_dump_to_stdout_equals_the_source(tctl, tmp_path):
    src = tmp_path / "a.img"
    src.write_bytes(os.urandom(MiB + 5))
    tctl("block", "load", str(src), "v")
    tctl("block", "snapshot", "create", "v@s")
    assert "cloned" in tctl("block", "clone", "v@s", "copy").output
    out = tctl("block", "dump", "copy", "-").stdout_bytes
    assert out == src.read_bytes()


def test_load_from_stdin_needs_a_size(tctl):
    res = tctl("block", "load", "-", "v", ok=False, stdin=b"abc")
    assert res.exit_code == 1 and "SIZE" in res.output
    tctl("block", "load", "-", "v", "1MiB", stdin=b"abc" * 1000)
    assert tctl("block", "dump", "v", "-").stdout_bytes[:3000] == b"abc" * 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("block", "snapshot", "create", "novolume@s"), "does not exist"),
        (("block", "snapshot", "create", "justavolume"), "VOLUME@SNAPSHOT"),
        (("block", "snapshot", "restore", "v@missing"), "does not exist"),
        (("block", "dump", "v", "/nonexistent-dir/x.img"), "cannot open"),
        (("block", "load", "/nonexistent-file", "w"), "cannot open"),
        (("block", "clone", "v@missing", "w"), "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error_not_a_traceback(tctl, args, message):
    tctl("volume", "create-block", "v", "1MiB")
    res = tctl(*args, ok=False)
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
