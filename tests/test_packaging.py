"""Packaging proof: each distribution builds, installs alone next to torus-core, and is discovered.

Builds wheels of all six distributions from this checkout, fills a wheelhouse with their
dependencies, then creates fresh virtual environments and installs ``torus-core`` plus one
plugin at a time with ``--no-index`` (only the wheelhouse).
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = {
    "torus-sqlite": ("plugins/torus_sqlite", "metadata", "sqlite"),
    "torus-etcd": ("plugins/torus_etcd", "metadata", "etcd"),
    "torus-redis": ("plugins/torus_redis", "metadata", "redis"),
    "torus-blockstore-file": ("plugins/torus_blockstore_file", "block_stores", "file"),
    "torus-blockstore-mem": ("plugins/torus_blockstore_mem", "block_stores", "mem"),
}
PIP = [sys.executable, "-m", "pip"]
TIMEOUT = 300

pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wh = tmp_path_factory.mktemp("wheelhouse")
    sources = [str(ROOT)] + [str(ROOT / path) for path, _, _ in PLUGINS.values()]
    _run([*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wh), *sources])
    own = sorted(str(p) for p in wh.glob("torus_*.whl"))
    assert len(own) == 6, own
    # Dependencies of all six (resolved once; pip's cache keeps this cheap).
    _run([*PIP, "download", "-q", "-d", str(wh), "--find-links", str(wh), *own])
    return wh


def _fresh_env(tmp: Path, wheelhouse: Path, dists: list[str]) -> Path:
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    _run([*PIP, "--python", str(py), "install", "-q", "--no-index", "--find-links", str(wheelhouse), *dists])
    return py


_PROBE = (
    "import json; from torus_core.plugins import make_plugin_manager; "
    "pm = make_plugin_manager(); r = pm.collect_registries(); "
    "print(json.dumps({'metadata': r.metadata.names(), 'block_stores': r.block_stores.names(), "
    "'rings': r.ring_types.names(), 'layers': r.blockset_layers.names(), "
    "'plugins': sorted(pm.plugin_info), 'failed': pm.failed_plugins}))"
)


def test_core_alone_lists_only_its_builtins(tmp_path: Path, wheelhouse: Path) -> None:
    py = _fresh_env(tmp_path, wheelhouse, ["torus-core"])
    found = json.loads(_run([str(py), "-c", _PROBE], cwd=tmp_path).stdout)
    assert found["plugins"] == ["builtin-blockset", "builtin-ring"]
    assert found["metadata"] == [] and found["block_stores"] == []
    assert found["failed"] == {}
    out = _run([str(py.parent / "torusctl"), "plugins"], cwd=tmp_path).stdout
    assert "torus-core" in out and "sqlite" not in out


@pytest.mark.parametrize("dist", sorted(PLUGINS))
def test_plugin_installed_alone_with_core_is_discovered(tmp_path: Path, wheelhouse: Path, dist: str) -> None:
    _, kind, name = PLUGINS[dist]
    py = _fresh_env(tmp_path, wheelhouse, ["torus-core", dist])
    found = json.loads(_run([str(py), "-c", _PROBE], cwd=tmp_path).stdout)
    assert found["failed"] == {}, found["failed"]
    assert found[kind] == [name]
    other_kind = "block_stores" if kind == "metadata" else "metadata"
    assert found[other_kind] == []


def test_user_story_with_sqlite_and_file_installed_from_wheels(tmp_path: Path, wheelhouse: Path) -> None:
    """`pip install torus-core torus-sqlite torus-blockstore-file`, then format and manage volumes."""
    py = _fresh_env(tmp_path, wheelhouse, ["torus-core", "torus-sqlite", "torus-blockstore-file"])
    ctl = [str(py.parent / "torusctl"), "--metadata", f"sqlite:///{tmp_path}/meta.db"]
    _run([*ctl, "init"], cwd=tmp_path)
    _run([*ctl, "volume", "create-block", "vol1", "1GiB"], cwd=tmp_path)
    _run([*ctl, "volume", "resize", "vol1", "2GiB"], cwd=tmp_path)
    _run([*ctl, "volume", "create-block", "vol2", "512MiB"], cwd=tmp_path)
    _run([*ctl, "volume", "delete", "vol2"], cwd=tmp_path)
    assert _run([*ctl, "volume", "list", "--csv"], cwd=tmp_path).stdout.splitlines() == [
        "vol1,2147483648,block,free"
    ]
    history = _run([*ctl, "events"], cwd=tmp_path).stdout
    assert "torus.volume.resized" in history and "torus.volume.deleted" in history
    plugins = _run([str(py.parent / "torusctl"), "plugins"], cwd=tmp_path).stdout
    assert "torus-sqlite" in plugins and "torus-blockstore-file" in plugins and "FAILED" not in plugins
