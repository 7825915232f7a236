"""``torusblk``: serve torus volumes to block clients.

``torusblk nbdserve --listen 127.0.0.1:10809`` serves every volume over NBD (export name = volume
name, ``VOL@SNAP`` read-only), opening the configured metadata and the local block store directly:
a single-node tool for when no ``torusd`` holds the data directory (the file store is locked by
one process at a time). TLS with ``--tls-cert/--tls-key`` (``--require-tls`` refuses plain
clients).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from torus_core import __version__
from torus_core.block.volume import DEFAULT_LEASE_TTL
from torus_core.cli import kernel_nbd_cmd
from torus_core.cli.common import build_context, config_options, handle_errors, local_volume_options
from torus_core.cli.serving import (
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
from torus_core.daemon.malloc import limit_malloc_arenas
from torus_core.daemon.server import Server, parse_listen


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="torusblk")
def cli() -> None:
    """Serve torus block volumes."""


@cli.command("nbdserve")
@config_options
@click.option("--listen", "-l", default="127.0.0.1:10809", show_default=True, metavar="HOST:PORT")
@click.option("--block-store", default=None, help="Block store plugin (default: file).")
@click.option("--size", default=None, help="Capacity of the local block store, e.g. 4GiB.")
@click.option(
    "--metrics",
    "metrics_listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve /metrics and /healthz over HTTP (e.g. 127.0.0.1:9102; port 0 picks one). Off by default.",
)
@click.option("--tls-cert", default=None, type=click.Path(dir_okay=False), help="TLS certificate.")
@click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="TLS private key.")
@click.option("--require-tls", is_flag=True, help="Refuse clients that do not start TLS.")
@nbd_limit_options
@click.option(
    "--lease-ttl",
    default=DEFAULT_LEASE_TTL,
    show_default=True,
    type=float,
    help="Volume lock lease TTL (s); renewed every ttl/3, a dead holder's lock frees after it.",
)
@min_free_space_option
@click.option("--debug", is_flag=True, help="Debug logging.")
@shutdown_timeout_option
@handle_errors
def nbdserve(
    config_path: str | None,
    listen: str,
    block_store: str | None,
    size: str | None,
    metrics_listen: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    require_tls: bool,
    nbd_limits: dict[str, Any],
    lease_ttl: float,
    min_free_space: str,
    debug: bool,
    shutdown_timeout: float,
    **overrides: Any,
) -> None:
    """Serve every volume over NBD until SIGTERM/SIGINT (then sync and unlock, within
    ``--shutdown-timeout``)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr)
    check_shutdown_timeout(shutdown_timeout)
    check_tls_options(tls_cert, tls_key, require_tls)
    parse_listen(listen)  # a bad address is refused before the store is opened
    metrics_address(metrics_listen)
    min_free = parse_min_free_space(min_free_space)
    ctx = build_context(config_path, storage_size=size, block_store=block_store, **overrides)
    check_storage_size(ctx.config.storage_size)
    server = Server.from_config(ctx.config, registries=ctx.registries, lease_ttl=lease_ttl)
    if metrics_listen:
        watch_disk(server, ctx.config.data_dir, min_free)

    def start() -> None:
        serve_nbd(server, listen, tls_cert, tls_key, require_tls, ctx.config.tls.ca_file, nbd_limits)
        if metrics_listen:
            serve_metrics(server, metrics_listen)

    serve_until_signalled(server, start, shutdown_timeout=shutdown_timeout)


@cli.command("aoe")
@config_options
@click.argument("volume")
@click.argument("iface")
@click.argument("major", type=int)
@click.argument("minor", type=int)
@click.option(
    "--flush-interval",
    default=5.0,
    show_default=True,
    type=float,
    help="Sync the volume every N seconds (0: only on FLUSH CACHE and at exit).",
)
@click.option("--config-string", default="", help="Initial AoE config string (Query Config).")
@click.option("--mask", "masks", multiple=True, metavar="MAC", help="Only answer this MAC (repeatable).")
@local_volume_options
@handle_errors
def aoe(
    config_path: str | None,
    volume: str,
    iface: str,
    major: int,
    minor: int,
    flush_interval: float,
    config_string: str,
    masks: tuple[str, ...],
    block_store: str | None,
    size: str | None,
    lease_ttl: float,
    debug: bool,
    **overrides: Any,
) -> None:
    """Serve VOLUME as ATA-over-Ethernet target eMAJOR.MINOR on IFACE until SIGTERM/SIGINT.

    The volume stays locked while served; writes are synced every --flush-interval seconds, on
    FLUSH CACHE and at exit. Needs root (a raw AF_PACKET socket). See docs/aoe.md.
    """
    from torus_core.aoe.serve import serve_aoe, serving_line
    from torus_core.aoe.target import check_address
    from torus_core.aoe.wire import parse_mac
    from torus_core.errors import TorusError, UsageError

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr)
    try:
        check_address(major, minor)
        macs = tuple(parse_mac(m) for m in masks)
        config = config_string.encode("ascii")
    except (TorusError, UnicodeError) as exc:
        raise UsageError(str(exc)) from None
    ctx = build_context(config_path, storage_size=size, block_store=block_store, **overrides)
    server = Server.from_config(ctx.config, registries=ctx.registries, lease_ttl=lease_ttl)

    def start() -> None:
        target = serve_aoe(
            server, volume, iface, major, minor, flush_interval=flush_interval, config=config, masks=macs
        )
        click.echo(serving_line(target, volume))

    serve_until_signalled(server, start)


@cli.command("tcmu")
@config_options
@click.argument("volume")
@click.option("--hba", default=30, show_default=True, type=int, help="configfs HBA index (core/user_N).")
@click.option(
    "--block-size",
    "scsi_block_size",
    default=None,
    type=int,
    help="SCSI logical block size (default 4096, or 512 if the volume size needs it).",
)
@click.option(
    "--max-sectors", default=1024, show_default=True, type=int, help="Largest command in logical blocks."
)
@click.option(
    "--cmd-timeout",
    default=120,
    show_default=True,
    type=int,
    help="Seconds the kernel lets a command wait for this handler (e.g. while it restarts); 0: forever.",
)
@click.option(
    "--link-dir",
    default="/dev/torus",
    show_default=True,
    help="Symlink LINK_DIR/VOLUME to the disk ('' for none).",
)
@local_volume_options
@handle_errors
def tcmu(
    config_path: str | None,
    volume: str,
    hba: int,
    scsi_block_size: int | None,
    max_sectors: int,
    cmd_timeout: int,
    link_dir: str,
    block_store: str | None,
    size: str | None,
    lease_ttl: float,
    debug: bool,
    **overrides: Any,
) -> None:
    """Serve VOLUME as a local SCSI disk (/dev/sdX) through TCMU until SIGTERM/SIGINT.

    Needs root, configfs on /sys/kernel/config and the target_core_user and tcm_loop modules.
    The volume stays locked while served; at exit the disk is removed, then the volume is
    synced and unlocked. See docs/tcmu.md.
    """
    from torus_core.errors import TorusError, UsageError
    from torus_core.tcmu.serve import pick_block_size, serve_tcmu, serving_line

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr)
    if hba < 0 or max_sectors < 1 or cmd_timeout < 0:
        raise UsageError("--hba and --cmd-timeout must be >= 0 and --max-sectors >= 1")
    if scsi_block_size is not None:
        try:
            pick_block_size(scsi_block_size, scsi_block_size)
        except TorusError as exc:
            raise UsageError(str(exc)) from None
    ctx = build_context(config_path, storage_size=size, block_store=block_store, **overrides)
    server = Server.from_config(ctx.config, registries=ctx.registries, lease_ttl=lease_ttl)

    def start() -> None:
        served = serve_tcmu(
            server,
            volume,
            hba=hba,
            block_size=scsi_block_size,
            max_sectors=max_sectors,
            cmd_timeout=cmd_timeout,
            link_dir=link_dir or None,
        )
        click.echo(serving_line(served))

    serve_until_signalled(server, start)


cli.add_command(kernel_nbd_cmd.nbd)


def main() -> None:
    """Console-script entry point."""
    limit_malloc_arenas()  # before any thread starts: see torus_core.daemon.malloc
    cli(prog_name="torusblk")


if __name__ == "__main__":
    main()
