"""Layer rules that are cheaper to state as tests than as import contracts (see CONTRIBUTING.md)."""

from __future__ import annotations

import importlib
import importlib.util


def test_block_package_does_not_reexport_the_daemon_server() -> None:
    block = importlib.import_module("torus_core.block")
    assert not hasattr(block, "Server")
    assert "Server" not in block.__all__


def test_daemon_wiring_lives_above_block_and_cluster_without_aliases() -> None:
    from torus_core.daemon import cluster, server

    assert server.Server.__module__ == "torus_core.daemon.server"
    assert cluster.start_cluster_server.__module__ == "torus_core.daemon.cluster"
    for old in ("torus_core.block.server", "torus_core.cluster.daemon"):
        assert importlib.util.find_spec(old) is None


def test_moved_test_harnesses_are_importable_only_from_torus_core_testing() -> None:
    from torus_core.testing import cluster, procs

    assert procs.TorusdProcess.__module__ == "torus_core.testing.procs"
    assert cluster.InProcessCluster.__module__ == "torus_core.testing.cluster"
    for name in ("distributor", "journal", "rpc"):
        assert importlib.import_module(f"torus_core.testing.{name}").__name__ == f"torus_core.testing.{name}"
    for old in (
        "torus_core.cluster.procs",
        "torus_core.cluster.testing",
        "torus_core.distributor.testing",
        "torus_core.journal.testing",
        "torus_core.rpc.testing",
    ):
        assert importlib.util.find_spec(old) is None


def test_the_protobuf_wire_codec_is_not_part_of_the_ring_package() -> None:
    from torus_core import protowire

    for user in ("torus_core.inode", "torus_core.ring.codec"):
        assert vars(importlib.import_module(user))["wire"] is protowire
    assert importlib.util.find_spec("torus_core.ring.wire") is None


def test_the_garbage_collector_lives_below_block_and_cluster() -> None:
    from torus_core import gc

    local_gc = vars(importlib.import_module("torus_core.block.local_gc"))
    assert local_gc["GarbageCollector"] is gc.GarbageCollector
    assert vars(importlib.import_module("torus_core.cluster.rebalancer"))["LiveSet"] is gc.LiveSet
    assert importlib.util.find_spec("torus_core.cluster.gc") is None
