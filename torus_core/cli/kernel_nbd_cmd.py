"""``torusblk nbd VOLUME [/dev/nbdN]`` and ``torusblk nbd -d /dev/nbdN``: kernel NBD attach.

Attach locks the volume (a volume locked elsewhere is refused with who holds it and until
when), attaches it as a local block device (:mod:`torus_core.kernel_nbd`), prints
``NBD ATTACHED VOLUME /dev/nbdN netlink|ioctl`` and serves it until SIGTERM/SIGINT -- then
syncs, detaches and unlocks -- or until the device is disconnected (``torusblk nbd -d``).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import click

from torus_core.cli.common import build_context, config_options, handle_errors, local_volume_options
from torus_core.cli.serving import run_until_signalled
from torus_core.daemon.server import Server
from torus_core.errors import UsageError
from torus_core.kernel_nbd import KernelAttachment, detach
from torus_core.kernel_nbd.attach import (
    DEFAULT_CONNECTIONS,
    DEFAULT_DEAD_CONN_TIMEOUT,
    DEFAULT_TIMEOUT,
    INTERFACES,
)


@click.command("nbd")
@config_options
@click.argument("volume", required=False)
@click.argument("device", required=False)
@click.option("-d", "--disconnect", "disconnect", default=None, metavar="/dev/nbdN", help="Detach a device.")
@click.option(
    "--connections",
    default=DEFAULT_CONNECTIONS,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Connections (socketpairs) the kernel uses (netlink; several need kernel >= 4.10).",
)
@click.option(
    "--timeout",
    default=DEFAULT_TIMEOUT,
    show_default=True,
    type=click.IntRange(0),
    help="Seconds the kernel waits for one request before dropping its connection (0: kernel default).",
)
@click.option(
    "--dead-conn-timeout",
    default=DEFAULT_DEAD_CONN_TIMEOUT,
    show_default=True,
    type=click.IntRange(0),
    help="Seconds the kernel holds I/O for a new connection after all died (netlink only).",
)
@click.option(
    "--interface",
    type=click.Choice(INTERFACES),
    default="auto",
    show_default=True,
    help="Kernel interface: generic netlink, the ioctls, or netlink falling back to the ioctls.",
)
@local_volume_options
@handle_errors
def nbd(
    config_path: str | None,
    volume: str | None,
    device: str | None,
    disconnect: str | None,
    connections: int,
    timeout: int,
    dead_conn_timeout: int,
    interface: str,
    block_store: str | None,
    size: str | None,
    lease_ttl: float,
    debug: bool,
    **overrides: Any,
) -> None:
    """Attach VOLUME as /dev/nbdN (a free one unless DEVICE is given) until SIGTERM/SIGINT.

    With -d /dev/nbdN, detach that device instead (the torusblk serving it syncs, unlocks
    and exits). Needs root and the kernel's nbd module. See docs/kernel-nbd.md.
    """
    from torus_core.kernel_nbd.ioctl import device_index

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr)
    if disconnect is not None:
        if volume is not None:
            raise UsageError("give either VOLUME [DEVICE] or -d DEVICE, not both")
        how = detach(disconnect)
        click.echo(f"NBD DETACHED {disconnect} {how}")
        return
    if volume is None:
        raise UsageError("missing VOLUME (or -d DEVICE)")
    if device is not None:
        device_index(device)  # a bad path is refused before anything is opened
    ctx = build_context(config_path, storage_size=size, block_store=block_store, **overrides)
    wake = threading.Event()
    server = Server.from_config(ctx.config, registries=ctx.registries, lease_ttl=lease_ttl)
    try:
        attachment = KernelAttachment(
            lambda: server.exports.open_export(volume),
            device=device,
            connections=connections,
            timeout=timeout,
            dead_conn_timeout=dead_conn_timeout,
            interface=interface,
            identifier=f"torus:{volume}",
            notify=wake,
        )
        path = attachment.start()
    except BaseException:
        server.close()
        raise
    server.add_stopper(attachment.stop)
    click.echo(f"NBD ATTACHED {volume} {path} {attachment.used}")
    sys.stdout.flush()
    run_until_signalled(server, wake)


def parse_kernel_nbd_spec(spec: str) -> tuple[str, str | None]:
    """``VOLUME`` or ``VOLUME:/dev/nbdN`` (``torusd --kernel-nbd``) -> (volume, device or None)."""
    from torus_core.kernel_nbd.ioctl import device_index

    volume, sep, device = spec.rpartition(":/dev/")
    if not sep:
        volume, device_path = spec, None
    else:
        device_path = "/dev/" + device
        device_index(device_path)
    if not volume:
        raise UsageError(f"--kernel-nbd wants VOLUME[:/dev/nbdN], not {spec!r}")
    return volume, device_path


def attach_kernel_nbd(
    server: Server, spec: str, *, dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT
) -> str:
    """Attach ``spec`` (:func:`parse_kernel_nbd_spec`) from ``server``'s exports, detached when
    the server closes; returns the ``NBD ATTACHED VOLUME DEVICE INTERFACE`` line."""
    volume, device = parse_kernel_nbd_spec(spec)
    attachment = KernelAttachment(
        lambda: server.exports.open_export(volume),
        device=device,
        dead_conn_timeout=dead_conn_timeout,
        identifier=f"torus:{volume}",
    )
    path = attachment.start()
    server.add_stopper(attachment.stop)
    return f"NBD ATTACHED {volume} {path} {attachment.used}"
