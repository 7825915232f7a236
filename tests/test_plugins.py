"""Plugin discovery through entry points: registration by name, duplicates, failures, blocking."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from torus_core.cli.torusctl import cli
from torus_core.errors import DuplicateBackendError, PluginError, UnknownBackendError
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


# A plugin that exists only in this test: a metadata backend reached through two URL schemes
# of its own (declared through torus_declare_backends, nothing in core knows them) and a ring
# type with a type id no built-in uses, which must also work nested inside a union ring.
SCHEME_AND_RING_PLUGIN = """
    from torus_core import hookimpl
    from torus_core.registry import BackendDeclaration
    from torus_core.ring.base import PeerPermutation
    from torus_core.ring.mod import ModRing
    from torus_sqlite.backend import SQLiteBackend

    class OtterBackend(SQLiteBackend):
        name = "otter"

        @classmethod
        def from_url(cls, url, options=None):
            scheme, rest = url.split("://", 1)
            assert scheme in ("otter", "otters"), url
            return super().from_url("sqlite://" + rest, options)

    class ReverseModRing(ModRing):
        name = "reverse-mod"
        type_id = 9

        def get_peers(self, ref):
            perm = super().get_peers(ref)
            return PeerPermutation(list(reversed(perm.peers)), perm.replication)

    @hookimpl
    def torus_register_metadata_backends(registry):
        registry.register(OtterBackend.name, OtterBackend)

    @hookimpl
    def torus_register_ring_types(registry):
        registry.register(ReverseModRing.name, ReverseModRing)

    @hookimpl
    def torus_declare_backends():
        return [
            BackendDeclaration(
                kind="metadata",
                name="otter",
                url_schemes=("otter", "otters"),
                config_keys=("busy_timeout",),
                install_hint="pip install torus-otter",
            )
        ]
"""


def test_plugin_declared_url_schemes_and_a_plugin_ring_inside_a_union_work_end_to_end(
    fake_site: Path, tmp_path: Path
) -> None:
    from torus_core.config import load_config
    from torus_core.metadata import MetadataService
    from torus_core.opener import Opener
    from torus_core.ring.base import RingMember
    from torus_core.ring.codec import make_ring, marshal_ring, unmarshal_ring
    from torus_core.ring.union import UnionRing

    _fake_distribution(
        fake_site, "torus-otter", {"otter": "otter_plugin"}, {"otter_plugin": SCHEME_AND_RING_PLUGIN}
    )
    db = tmp_path / "meta.db"
    url = f"otters:///{db}"  # the plugin's second scheme, like etcds:// or rediss://
    runner = CliRunner()

    result = runner.invoke(cli, ["--metadata", url, "init", "--ring-type", "reverse-mod", "-r", "1"])
    assert result.exit_code == 0, result.output
    assert "ring reverse-mod" in result.output
    result = runner.invoke(cli, ["--metadata", f"otter:///{db}", "volume", "create-block", "v1", "1MiB"])
    assert result.exit_code == 0, result.output

    # A union whose new side is the plugin's ring, committed and read back through the CLI.
    regs = make_plugin_manager().collect_registries()
    members = [RingMember("a"), RingMember("b")]
    with Opener(regs, load_config(overrides={"metadata": url}, environ={})).open_metadata() as backend:
        md = MetadataService(backend, ring_types=regs.ring_types)
        old = make_ring("mod", members, replication=1, version=2, registry=regs.ring_types)
        md.set_ring(old.to_spec())
        new = make_ring("reverse-mod", members, replication=1, version=3, registry=regs.ring_types)
        md.set_ring(UnionRing(old, new).to_spec())
        again = unmarshal_ring(marshal_ring(UnionRing(old, new)), regs.ring_types)
        assert isinstance(again, UnionRing) and type(again.new).__name__ == "ReverseModRing"
    result = runner.invoke(cli, ["--metadata", url, "ring", "get"])
    assert result.exit_code == 0, result.output
    assert "Union Ring" in result.output
    result = runner.invoke(cli, ["--metadata", url, "volume", "list"])
    assert result.exit_code == 0 and "v1" in result.output, result.output

    result = runner.invoke(cli, ["plugins"])
    assert "declares metadata otter; schemes otter://, otters://" in result.output, result.output


def test_a_scheme_no_plugin_declares_names_the_known_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORUS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    regs = make_plugin_manager().collect_registries()
    assert regs.metadata.get_for_url("etcds://127.0.0.1:2379").name == "etcd"
    assert regs.metadata.get_for_url("rediss://127.0.0.1:6379/0").name == "redis"
    with pytest.raises(
        UnknownBackendError, match=r"unknown metadata URL scheme 'nosuch'; known schemes: .*etcds"
    ):
        regs.metadata.get_for_url("nosuch://x")


def test_two_plugins_claiming_one_url_scheme_is_an_error(fake_site: Path) -> None:
    clash = """
        from torus_core import hookimpl
        from torus_core.registry import BackendDeclaration

        class Clash:
            name = "clash"

        @hookimpl
        def torus_register_metadata_backends(registry):
            registry.register("clash", Clash)

        @hookimpl
        def torus_declare_backends():
            return [BackendDeclaration(kind="metadata", name="clash", url_schemes=("etcds",))]
    """
    _fake_distribution(fake_site, "torus-clash", {"clash": "clash_plugin"}, {"clash_plugin": clash})
    with pytest.raises(DuplicateBackendError, match="URL scheme 'etcds' claimed by"):
        make_plugin_manager().collect_registries()


def test_declaring_a_backend_the_plugin_did_not_register_is_an_error(fake_site: Path) -> None:
    liar = """
        from torus_core import hookimpl
        from torus_core.registry import BackendDeclaration

        @hookimpl
        def torus_declare_backends():
            return [BackendDeclaration(kind="metadata", name="etcd", url_schemes=("mine",))]
    """
    _fake_distribution(fake_site, "torus-liar", {"liar": "liar_plugin"}, {"liar_plugin": liar})
    with pytest.raises(PluginError, match="declares metadata 'etcd' but did not register it"):
        make_plugin_manager().collect_registries()


def test_undeclared_metadata_options_and_missing_client_libraries_are_config_errors(
    fake_site: Path, tmp_path: Path
) -> None:
    from torus_core.config import load_config
    from torus_core.errors import ConfigError
    from torus_core.opener import Opener

    _fake_distribution(
        fake_site, "torus-otter", {"otter": "otter_plugin2"}, {"otter_plugin2": SCHEME_AND_RING_PLUGIN}
    )
    regs = make_plugin_manager().collect_registries()
    cfg = load_config(overrides={"metadata": f"otter:///{tmp_path}/m.db"}, environ={})
    bad = Opener(regs, cfg.__class__(metadata=cfg.metadata, metadata_options={"nope": 1}))
    with pytest.raises(
        ConfigError, match=r"unknown \[metadata_options\] key\(s\) for metadata 'otter': nope"
    ):
        bad.open_metadata()

    class NeedsLib:
        @classmethod
        def from_url(cls, url: str, options: object = None) -> None:
            raise ModuleNotFoundError("No module named 'otterclient'")

    regs.metadata._entries["otter"].impl = NeedsLib
    with pytest.raises(ConfigError, match=r"otterclient.*install what it needs: pip install torus-otter"):
        Opener(regs, cfg).open_metadata()


def test_the_plugin_template_scaffolds_a_block_store_plugin_that_loads_and_passes_its_suites(
    fake_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    from torus_core.config import load_config
    from torus_core.opener import Opener
    from torus_core.refs import BlockRef

    repo = Path(__file__).resolve().parent.parent
    made = subprocess.run(
        [sys.executable, str(repo / "plugins/template/new_plugin.py"), "acme", str(fake_site)],
        capture_output=True,
        text=True,
        check=True,
    )
    plugin_dir = Path(made.stdout.strip())
    assert plugin_dir == fake_site / "torus_blockstore_acme"
    # What `pip install -e` would add: the package on sys.path and the entry point's dist-info.
    monkeypatch.syspath_prepend(str(plugin_dir))
    _fake_distribution(fake_site, "torus-blockstore-acme", {"acme": "torus_blockstore_acme.plugin"}, {})

    pm = make_plugin_manager()
    regs = pm.collect_registries()
    assert pm.plugin_info["acme"].registered == {"block_stores": ["acme"]}
    cfg = load_config(overrides={"block_store": "acme", "data_dir": str(tmp_path / "data")}, environ={})
    with Opener(regs, cfg).open_block_store(4096) as store:
        store.write_block(BlockRef(1, 2, 3), b"hello")
        assert store.get_block(BlockRef(1, 2, 3))[:5] == b"hello"

    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(plugin_dir / "tests")],
        capture_output=True,
        text=True,
        cwd=plugin_dir,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]


def test_a_ring_type_or_layer_that_is_not_a_ring_or_blockset_class_is_a_plugin_error(fake_site: Path) -> None:
    """Lookups read a ring's ``type_id`` and a layer's ``kind``/``aliases`` as declared class
    attributes; a plugin that registered something else is named, not silently skipped."""
    from torus_core.blockset.spec import layer_class_by_kind, parse_spec
    from torus_core.ring.codec import ring_class, ring_class_by_id

    bogus = """
        from torus_core import hookimpl

        class NotARing:
            type_id = 9

        @hookimpl
        def torus_register_ring_types(registry):
            registry.register("notaring", NotARing)

        @hookimpl
        def torus_register_blockset_layers(registry):
            registry.register("notalayer", {"kind": 7})
    """
    _fake_distribution(fake_site, "torus-bogus", {"bogus": "bogus_plugin"}, {"bogus_plugin": bogus})
    regs = make_plugin_manager().collect_registries()
    ring_msg = "plugin 'bogus' registered ring type 'notaring' as .*not a Ring subclass"
    with pytest.raises(PluginError, match=ring_msg):
        ring_class("notaring", regs.ring_types)
    with pytest.raises(PluginError, match=ring_msg):
        ring_class_by_id(9, regs.ring_types)
    layer_msg = "plugin 'bogus' registered blockset layer 'notalayer' as .*not a Blockset subclass"
    with pytest.raises(PluginError, match=layer_msg):
        parse_spec("crc,base", regs.blockset_layers)
    with pytest.raises(PluginError, match=layer_msg):
        layer_class_by_kind(7, regs.blockset_layers)
    assert ring_class("ketama", regs.ring_types).type_id == 4  # a built-in still resolves by name
