"""Plugin discovery through entry points: registration by name, duplicates, failures, blocking."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from torus_core.cli.torusctl import cli
from torus_core.errors import DuplicateBackendError, UnknownBackendError
from torus_core.plugins import make_plugin_manager


def _fake_distribution(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    info = root / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    eps = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[torus]\n{eps}\n")
    for mod, source in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(source))


GOOD_PLUGIN = """
    from torus_core import hookimpl
    from torus_core.blockstore import BlockStore

    class FakeStore:
        name = "fake"

    @hookimpl
    def torus_register_block_stores(registry):
        registry.register("fake", FakeStore)
"""


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TORUS_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("TORUS_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("TORUS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return tmp_path


def test_entry_point_plugin_registers_its_block_store_by_name(fake_site: Path) -> None:
    _fake_distribution(
        fake_site, "torus-fakestore", {"fakestore": "fake_store_plugin"}, {"fake_store_plugin": GOOD_PLUGIN}
    )
    pm = make_plugin_manager()
    regs = pm.collect_registries()
    assert "fake" in regs.block_stores
    assert regs.block_stores.get("fake").name == "fake"
    info = pm.plugin_info["fakestore"]
    assert info.distribution == "torus-fakestore"
    assert info.version == "9.9"
    assert info.registered == {"block_stores": ["fake"]}


def test_plugin_that_fails_to_import_is_isolated_and_reported(fake_site: Path) -> None:
    _fake_distribution(
        fake_site,
        "torus-broken",
        {"broken": "broken_plugin"},
        {"broken_plugin": "raise ImportError('needs libfoo')\n"},
    )
    _fake_distribution(
        fake_site, "torus-fakestore", {"fakestore": "fake_store_plugin2"}, {"fake_store_plugin2": GOOD_PLUGIN}
    )
    pm = make_plugin_manager()
    regs = pm.collect_registries()
    assert "needs libfoo" in pm.failed_plugins["broken"]
    assert "fake" in regs.block_stores  # the healthy plugin still loaded


def test_duplicate_name_from_two_plugins_is_an_error(fake_site: Path) -> None:
    _fake_distribution(fake_site, "torus-one", {"one": "dup_one"}, {"dup_one": GOOD_PLUGIN})
    _fake_distribution(fake_site, "torus-two", {"two": "dup_two"}, {"dup_two": GOOD_PLUGIN})
    pm = make_plugin_manager()
    with pytest.raises(DuplicateBackendError, match="'fake' registered twice"):
        pm.collect_registries()


def test_blocked_plugin_is_not_loaded(fake_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(
        fake_site, "torus-fakestore", {"fakestore": "fake_store_plugin3"}, {"fake_store_plugin3": GOOD_PLUGIN}
    )
    monkeypatch.setenv("TORUS_BLOCK_PLUGINS", "fakestore")
    regs = make_plugin_manager().collect_registries()
    assert "fake" not in regs.block_stores


def test_autoload_disabled_gives_only_builtins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = make_plugin_manager()
    regs = pm.collect_registries()
    assert set(pm.plugin_info) == {"builtin-ring", "builtin-blockset"}
    assert regs.metadata.names() == []
    assert regs.block_stores.names() == []


def test_unknown_backend_names_available_ones_and_the_distribution_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    regs = make_plugin_manager().collect_registries()
    with pytest.raises(UnknownBackendError, match=r"pip install torus-etcd"):
        regs.metadata.get("etcd")
    with pytest.raises(UnknownBackendError, match=r"unknown block store 'nosuch'; available"):
        regs.block_stores.get("nosuch")


def test_torusctl_plugins_lists_distributions_and_failures(fake_site: Path) -> None:
    _fake_distribution(
        fake_site,
        "torus-broken",
        {"broken2": "broken_plugin2"},
        {"broken_plugin2": "raise RuntimeError('boom')\n"},
    )
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "torus-core" in result.output
    assert "torus-broken" in result.output and "FAILED: RuntimeError: boom" in result.output
