"""``torusd``: the torus storage daemon (single node: local block store + metadata).

Single-node quick start (what ``scripts/run-single-node.sh`` runs)::

    torusd --data-dir D --size 4GiB --block-store file --nbd-listen 127.0.0.1:10809

opens the metadata (default ``sqlite:///D/metadata.db``), the block store under ``D/block`` and
serves every volume over NBD. An unformatted cluster is an error (``NoGlobalMetadata``) unless
``--debug-init`` is given, which formats it. ``--metrics HOST:PORT`` serves ``/metrics``
(Prometheus) and ``/healthz`` (readiness) over HTTP; off unless given (``--host H --port P`` is
the older spelling of ``--metrics H:P``).
SIGTERM/SIGINT shut down gracefully: NBD clients are disconnected, open volumes synced and
unlocked, the store flushed and closed. Prints ``NBD LISTENING host:port`` / ``HTTP LISTENING``
lines once bound (scripts and tests wait for them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from torus_core import __version__
from torus_core.block.local_gc import LocalGC
from torus_core.block.nbd_export import SpaceGuard
from torus_core.block.volume import DEFAULT_LEASE_TTL
from torus_core.cli.common import build_context, config_options, handle_errors
from torus_core.cli.kernel_nbd_cmd import attach_kernel_nbd, parse_kernel_nbd_spec
from torus_core.cli.serving import (
    check_listen,
    check_shutdown_timeout,
    check_storage_size,
    check_tls_options,
    metrics_address,
    min_free_space_option,
    nbd_limit_options,
    parse_min_free_space,
    serve_metrics,
    serve_nbd,
    serve_until_signalled,
    shutdown_timeout_option,
    watch_disk,
)
from torus_core.cluster.cli_options import cluster_options, make_cluster_options
from torus_core.cluster.heartbeat import Heartbeat
from torus_core.cluster.peerinfo import PeerInfo
from torus_core.daemon.cluster import start_cluster_server
from torus_core.daemon.malloc import limit_malloc_arenas
from torus_core.daemon.server import Server
from torus_core.datadir import load_or_create_uuid
from torus_core.errors import NoGlobalMetadata, UsageError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options
@click.option("--size", default=None, help="Capacity of the local block store, e.g. 4GiB.")
@click.option("--block-store", default=None, help="Block store plugin (default: file).")
@click.option(
    "--metrics",
    "metrics_listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve /metrics and /healthz over HTTP (e.g. 127.0.0.1:9101; port 0 picks one). Off by default.",
)
@click.option("--host", default=None, help="Older spelling: --host H --port P is --metrics H:P.")
@click.option("--port", default=4321, show_default=True, type=int, help="HTTP port (with --host).")
@click.option("--nbd-listen", default=None, metavar="HOST:PORT", help="Also serve volumes over NBD.")
@click.option("--tls-cert", default=None, type=click.Path(dir_okay=False), help="NBD TLS certificate.")
@click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="NBD TLS private key.")
@click.option("--require-tls", is_flag=True, help="Refuse NBD clients that do not start TLS.")
@nbd_limit_options
@click.option("--debug-init", is_flag=True, help="Format the cluster if it is not formatted yet.")
@click.option(
    "--lease-ttl",
    default=DEFAULT_LEASE_TTL,
    show_default=True,
    type=float,
    help="Volume lock lease TTL (s); renewed every ttl/3, a dead holder's lock frees after it.",
)
@click.option(
    "--gc-interval",
    default=10.0,
    show_default=True,
    type=float,
    help="Single-node GC period (s).",
)
@click.option(
    "--aoe",
    "aoe_specs",
    multiple=True,
    metavar="IFACE:MAJOR.MINOR=VOLUME",
    help="Also serve VOLUME as ATA-over-Ethernet target eMAJOR.MINOR on IFACE (repeatable).",
)
@min_free_space_option
@click.option(
    "--kernel-nbd",
    "kernel_nbd_specs",
    multiple=True,
    metavar="VOLUME[:/dev/nbdN]",
    help="Also attach VOLUME as a local kernel NBD device (repeatable; needs root and the nbd module).",
)
@click.option("--debug", is_flag=True, help="Debug logging.")
@shutdown_timeout_option
@cluster_options
@click.version_option(__version__, prog_name="torusd")
@handle_errors
def cli(
    config_path: str | None,
    size: str | None,
    block_store: str | None,
    metrics_listen: str | None,
    host: str | None,
    port: int,
    nbd_listen: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    require_tls: bool,
    nbd_limits: dict[str, Any],
    debug_init: bool,
    lease_ttl: float,
    gc_interval: float,
    min_free_space: str,
    debug: bool,
    aoe_specs: tuple[str, ...],
    shutdown_timeout: float,
    kernel_nbd_specs: tuple[str, ...],
    peer_address: str | None,
    auto_join: bool,
    heartbeat_interval: float,
    peer_ttl: float | None,
    rebalance_rate: str,
    rebalance_interval: float,
    rebalance_settle: float,
    rebalance_idle_max: float,
    gc_grace: float,
    no_gc: bool,
    **overrides: Any,
) -> None:
    """Run a torus storage node."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    check_shutdown_timeout(shutdown_timeout)
    ctx = build_context(config_path, storage_size=size, block_store=block_store, **overrides)
    # Every option is checked before anything is opened: --debug-init must not format a cluster
    # for a command line that then fails.
    check_tls_options(tls_cert, tls_key, require_tls)
    for spec in kernel_nbd_specs:
        parse_kernel_nbd_spec(spec)  # a malformed spec is refused before anything opens
    metrics_listen = metrics_address(metrics_listen, host, port)
    check_listen("--nbd-listen", nbd_listen)
    check_storage_size(ctx.config.storage_size)
    min_free = parse_min_free_space(min_free_space)
    if auto_join and not peer_address:
        raise UsageError("--auto-join needs --peer-address")
    if aoe_specs:
        from torus_core.aoe.serve import parse_aoe_spec

        for spec in aoe_specs:
            parse_aoe_spec(spec)
    opts = (
        make_cluster_options(
            ctx.config,
            heartbeat_interval,
            peer_ttl,
            rebalance_rate,
            rebalance_interval,
            rebalance_settle,
            rebalance_idle_max,
            gc_grace,
            no_gc,
        )
        if peer_address
        else None
    )
    try:
        server = Server.from_config(
            ctx.config, registries=ctx.registries, debug_init=debug_init, lease_ttl=lease_ttl
        )
    except NoGlobalMetadata as exc:
        raise NoGlobalMetadata(f"{exc}; or start torusd with --debug-init to format it") from None
    if peer_address:
        server, node = start_cluster_server(
            server, ctx.config, listen=peer_address, auto_join=auto_join, options=opts, lease_ttl=lease_ttl
        )
        click.echo(f"PEER LISTENING {node.address} {node.uuid}")
    elif not no_gc:
        local_gc = LocalGC(
            server.md,
            server.store,
            grace=gc_grace,
            interval=gc_interval,
            layer_registry=server.registries.blockset_layers,
        )
        server.add_stopper(local_gc.start().stop)
        server.exports.space = SpaceGuard(server.store, local_gc.collect_now)
    if metrics_listen:
        watch_disk(server, ctx.config.data_dir, min_free)
    if not peer_address:
        server.add_stopper(start_single_node_heartbeat(server, ctx.config.data_dir, nbd_listen))

    def start() -> None:
        from torus_core.aoe.serve import serve_aoe_specs

        for line in serve_aoe_specs(server, aoe_specs):
            click.echo(line)
        for spec in kernel_nbd_specs:
            click.echo(attach_kernel_nbd(server, spec))
        if nbd_listen:
            serve_nbd(server, nbd_listen, tls_cert, tls_key, require_tls, ctx.config.tls.ca_file, nbd_limits)
        if metrics_listen:
            serve_metrics(server, metrics_listen)

    serve_until_signalled(server, start, shutdown_timeout=shutdown_timeout)


def start_single_node_heartbeat(server: Server, data_dir: str, nbd_listen: str | None) -> Callable[[], None]:
    """Register this single node (role ``single``) with its store usage and the disk space of
    its journal files every 5 s, so that ``torusctl peer list`` and monitoring see it; returns
    the stop function."""
    uuid = load_or_create_uuid(data_dir)
    store = server.store
    journal = server.journal_store  # None for a store that is not persistent (no journal files)

    def info() -> PeerInfo:
        return PeerInfo(
            uuid=uuid,
            address=f"nbd://{nbd_listen}" if nbd_listen else "single-node",
            total_blocks=store.num_blocks(),
            used_blocks=store.used_blocks(),
            block_size=store.block_size,
            role="single",
            journal_bytes=journal.disk_bytes() if journal is not None else 0,
        )

    beat = Heartbeat(server.md, info, interval=5.0)
    beat.start()
    return beat.stop


def main() -> None:
    """Console-script entry point."""
    limit_malloc_arenas()  # before any thread starts: see torus_core.daemon.malloc
    cli(prog_name="torusd")


if __name__ == "__main__":
    main()
