# mypy: allow-untyped-defs
"""``torusblk tcmu`` on a machine without LIO: clear typed errors, and the volume is left unlocked.

The kernel side (configfs, uio, tcm_loop, /dev/sdX, a filesystem) is tested in the VM
(tests/vm/test_vm_tcmu.py); this host's kernel has no target_core_user."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from torus_core.cli.torusblk import cli as torusblk
from torus_core.cli.torusctl import cli as torusctl
from torus_core.tcmu.configfs import CONFIGFS_TARGET

pytestmark = pytest.mark.skipif(
    os.path.isdir(CONFIGFS_TARGET), reason="this kernel has LIO configured: the VM tests cover it"
)


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in [v for v in os.environ if v.startswith("TORUS_")]:
        monkeypatch.delenv(var)
    d = tmp_path / "data"
    d.mkdir()
    runner = CliRunner()
    for args in (("init", "--block-size", "64KiB"), ("volume", "create-block", "v", "8MiB")):
        res = runner.invoke(torusctl, ["--data-dir", str(d), *args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    return d


def test_missing_lio_is_an_error_naming_the_modules_and_the_volume_is_unlocked(data: Path) -> None:
    runner = CliRunner()
    for _ in range(2):  # the second run would say "locked" if the first left the lock behind
        res = runner.invoke(torusblk, ["tcmu", "--data-dir", str(data), "v"], catch_exceptions=False)
        assert res.exit_code == 1, res.output
        assert "target_core_user" in res.output and "configfs" in res.output
        assert "Traceback" not in res.output and "ocked" not in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("v", "--block-size", "1000"), "--block-size"),
        (("v", "--hba", "-1"), "--hba"),
        (("v", "--max-sectors", "0"), "--max-sectors"),
        (("v", "--cmd-timeout", "-1"), "--cmd-timeout"),
        (("nosuchvolume",), "nosuchvolume"),
    ],
)
def test_bad_arguments_are_one_line_errors(data: Path, args: tuple[str, ...], message: str) -> None:
    res = CliRunner().invoke(torusblk, ["tcmu", "--data-dir", str(data), *args], catch_exceptions=False)
    assert res.exit_code in (1, 2) and message in res.output and "Traceback" not in res.output
