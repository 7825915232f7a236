"""``torusctl block ...``: snapshots, clones, dump and load of block volumes.

Attached to torusctl with ``cli.add_command(block)``. Snapshot commands touch only the
metadata; ``clone``, ``dump`` and ``load`` also open the local block store (single node: they
fail with ``BlockStoreLocked`` while a ``torusd`` holds the data directory).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import BinaryIO, cast

import click

from torus_core.block import snapshots, transfer
from torus_core.blockstore import BlockStore
from torus_core.cli.common import get_ctx, handle_errors, metadata_service
from torus_core.errors import InvalidArgument
from torus_core.metadata import MetadataService
from torus_core.units import parse_size


def _open_file(path: str, mode: str) -> BinaryIO:
    try:
        fh = cast(BinaryIO, open(path, mode))  # closed by the caller's ExitStack
        return fh
    except OSError as exc:
        raise InvalidArgument(f"cannot open {path!r}: {exc.strerror or exc}") from None


def _store(md: MetadataService) -> BlockStore:
    return get_ctx().open_block_store(md.global_metadata().block_size)


@click.group("block")
def block() -> None:
    """Block volume snapshots, clones, dump and load."""


@block.group("snapshot")
def snapshot_group() -> None:
    """Manage snapshots (VOLUME@SNAPSHOT)."""


@snapshot_group.command("list")
@click.argument("volume")
@click.option("--csv", "as_csv", is_flag=True, help="Comma-separated output.")
@handle_errors
def snapshot_list(volume: str, as_csv: bool) -> None:
    """List the snapshots of VOLUME with their times (RFC 3339)."""
    snaps = snapshots.list_snapshots(metadata_service(), volume)
    if not as_csv:
        click.echo(f"{'NAME':<32} TIME")
    for s in snaps:
        when = datetime.fromtimestamp(s.time, UTC).isoformat(timespec="seconds")
        click.echo(f"{s.name},{when}" if as_csv else f"{s.name:<32} {when}")


@snapshot_group.command("create")
@click.argument("target")
@handle_errors
def snapshot_create(target: str) -> None:
    """Save VOLUME@SNAPSHOT (the last synced state; works while the volume is mounted)."""
    snapshots.create_snapshot(metadata_service(), target)
    click.echo(f"created snapshot {target}")


@snapshot_group.command("delete")
@click.argument("target")
@handle_errors
def snapshot_delete(target: str) -> None:
    """Delete VOLUME@SNAPSHOT."""
    snapshots.delete_snapshot(metadata_service(), target)
    click.echo(f"deleted snapshot {target}")


@snapshot_group.command("restore")
@click.argument("target")
@handle_errors
def snapshot_restore(target: str) -> None:
    """Point VOLUME back at SNAPSHOT (refused while the volume is mounted)."""
    snapshots.restore_snapshot(metadata_service(), target)
    click.echo(f"restored {target}")


@block.command("clone")
@click.argument("source")
@click.argument("new_name")
@handle_errors
def clone_cmd(source: str, new_name: str) -> None:
    """Create volume NEW_NAME from snapshot SOURCE (VOLUME@SNAPSHOT) without copying data."""
    md = metadata_service()
    info = snapshots.clone(md, _store(md), source, new_name)
    click.echo(f"cloned {source} to {info.name} ({info.size} bytes)")


@block.command("dump")
@click.argument("target")
@click.argument("output")
@click.option("-p", "--progress", is_flag=True, help="Show a progress bar on stderr.")
@handle_errors
def dump_cmd(target: str, output: str, progress: bool) -> None:
    """Write VOLUME or VOLUME@SNAPSHOT to OUTPUT (a file, or - for stdout)."""
    md = metadata_service()
    store = _store(md)
    with ExitStack() as stack:
        out: BinaryIO = sys.stdout.buffer if output == "-" else stack.enter_context(_open_file(output, "wb"))
        transfer.dump(
            md, store, target, out, progress=progress, layer_registry=get_ctx().registries.blockset_layers
        )


@block.command("load")
@click.argument("input_path", metavar="INPUT")
@click.argument("volume")
@click.argument("size", required=False)
@click.option("-p", "--progress", is_flag=True, help="Show a progress bar on stderr.")
@handle_errors
def load_cmd(input_path: str, volume: str, size: str | None, progress: bool) -> None:
    """Create VOLUME from INPUT (a file, or - for stdin, which needs SIZE); SIZE defaults to INPUT's."""
    vsize = parse_size(size) if size is not None else None
    if vsize is not None and vsize <= 0:
        raise InvalidArgument("SIZE must be positive")
    md = metadata_service()
    store = _store(md)
    with ExitStack() as stack:
        src: BinaryIO = (
            sys.stdin.buffer if input_path == "-" else stack.enter_context(_open_file(input_path, "rb"))
        )
        info = transfer.load(
            md,
            store,
            src,
            volume,
            vsize,
            progress=progress,
            layer_registry=get_ctx().registries.blockset_layers,
        )
    click.echo(f"loaded {volume} ({info.size} bytes)")
