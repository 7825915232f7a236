"""``torusctl``: administer a torus cluster (mirrors the original's commands, inventory §2.3)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import click

from torus_core import __version__
from torus_core.cli.common import (
    build_context,
    config_options,
    get_ctx,
    handle_errors,
    metadata_service,
)
from torus_core.datadir import unbind_cluster
from torus_core.errors import AlreadyExists, InvalidArgument
from torus_core.events import RecordedEvent
from torus_core.migrate import compare_projections, migrate
from torus_core.plugins import make_plugin_manager
from torus_core.ring.base import RingMember, RingSpec
from torus_core.ring.codec import make_ring, ring_from_spec
from torus_core.units import format_size, parse_size


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_options
@click.version_option(__version__, prog_name="torusctl")
@click.pass_context
def cli(ctx: click.Context, /, config_path: str | None, **overrides: object) -> None:
    """Administer a torus cluster: format it, manage volumes, rings, peers and snapshots."""
    ctx.obj = build_context(config_path, **overrides)
    ctx.call_on_close(ctx.obj.close)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def plugins_cmd(as_json: bool) -> None:
    """List plugins, their distributions and versions, what each registered, and load failures."""
    import json

    pm = make_plugin_manager()
    pm.collect_registries()
    infos = sorted(pm.plugin_info.values(), key=lambda i: (i.distribution, i.name))
    if as_json:
        click.echo(json.dumps([i.__dict__ for i in infos], indent=2))
        return
    for info in infos:
        status = f"FAILED: {info.error}" if info.error else ""
        click.echo(f"{info.name:<16} {info.distribution:<24} {info.version:<8} {status}")
        for kind, names in sorted(info.registered.items()):
            click.echo(f"    {kind}: {', '.join(names)}")
        for line in info.declared:
            click.echo(f"    declares {line}")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc)) from None


# --- cluster -----------------------------------------------------------------------------------


@cli.command("init")
@click.option("--block-size", default="512KiB", show_default=True, help="Cluster block size.")
@click.option("--block-spec", default="crc", show_default=True, help="Blockset layers; ',base' is appended.")
@click.option("--ring-type", default="ketama", show_default=True, help="Initial ring type.")
@click.option("--replication", "-r", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--no-ring", is_flag=True, help="Start with an empty ring.")
@click.option("--if-needed", is_flag=True, help="Succeed quietly if the cluster is already formatted.")
@click.option("--view", is_flag=True, help="Print the block size and spec of a formatted cluster.")
@handle_errors
def init_cmd(
    block_size: str,
    block_spec: str,
    ring_type: str,
    replication: int,
    no_ring: bool,
    if_needed: bool,
    view: bool,
) -> None:
    """Format the metadata backend for a new cluster (and create the peers' cluster key)."""
    md = metadata_service()
    if view:
        gm = md.global_metadata()
        click.echo(f"block size: {gm.block_size}\nblock spec: {gm.block_spec}")
        return
    spec = block_spec if block_spec.split(",")[-1].split("=")[0] == "base" else f"{block_spec},base"
    ring = (
        RingSpec(type="empty", version=1, replication=0)
        if no_ring
        else RingSpec(type=ring_type, version=1, replication=replication)
    )
    try:
        md.format(_size(block_size), spec, ring)
    except AlreadyExists:
        if if_needed:
            click.echo("cluster already formatted")
            return
        raise
    click.echo(f"formatted: block size {_size(block_size)}, spec {spec}, ring {ring.type}")
    click.echo("cluster key created: peers read it from the metadata backend (docs/cluster.md)")


@cli.command("wipe")
@click.option("--yes-i-am-sure", is_flag=True, help="Do not ask for confirmation.")
@handle_errors
def wipe_cmd(yes_i_am_sure: bool) -> None:
    """Delete all metadata of the cluster (events, snapshots, leases). Blocks become garbage."""
    if not yes_i_am_sure:
        answer = click.prompt("This deletes ALL torus metadata. Type YES to continue", default="")
        if answer != "YES":
            raise click.ClickException("aborted")
    ctx = get_ctx()
    gm = metadata_service().state().global_metadata
    ctx.open_backend().wipe()
    click.echo("wiped")
    # the local data dir's blocks now belong to no cluster: let the next format's server use it
    if gm is not None and unbind_cluster(ctx.config.data_dir, gm.cluster_id):
        click.echo(f"data directory {ctx.config.data_dir} released from cluster {gm.cluster_id}")


@cli.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events (Ctrl-C to stop).")
@click.option("--stream", "-s", default=None, help="Only this stream (e.g. ring, volume-3).")
@click.option("--after", default=0, type=int, help="Start after this position (or stream version).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@handle_errors
def events_cmd(follow: bool, stream: str | None, after: int, as_json: bool) -> None:
    """Show the metadata history (the append-only event log)."""
    md = metadata_service()
    # Follow by global position; with --stream, remember the last version shown so an event
    # appended while the history was being listed is printed exactly once.
    position = md.head_position() if (follow and stream is not None) else after
    shown_version = after
    for rec in md.events(after=after, stream=stream):
        _print_event(rec, as_json)
        if stream is None:
            position = rec.position
        else:
            shown_version = rec.version
    while follow:
        batch = md.follow(position, timeout=1.0)
        for rec in batch:
            if stream is None:
                _print_event(rec, as_json)
            elif rec.stream_id == stream and rec.version > shown_version:
                _print_event(rec, as_json)
                shown_version = rec.version
        if batch:
            position = batch[-1].position


def _print_event(rec: RecordedEvent, as_json: bool) -> None:
    fields = dataclasses.asdict(rec.event)
    if as_json:
        out = {
            "position": rec.position,
            "stream": rec.stream_id,
            "version": rec.version,
            "time": rec.timestamp,
            "topic": rec.topic,
            "data": fields,
        }
        click.echo(json.dumps(out, default=str))
        return
    when = datetime.fromtimestamp(rec.timestamp, tz=UTC).isoformat(timespec="milliseconds")
    detail = " ".join(f"{k}={v}" for k, v in fields.items())
    click.echo(f"{rec.position:>6} {when} {rec.stream_id}@{rec.version} {rec.topic} {detail}")


# --- volumes -----------------------------------------------------------------------------------


@cli.group("volume")
def volume_group() -> None:
    """Create, list, resize and delete volumes."""


@volume_group.command("list")
@click.option("--csv", "as_csv", is_flag=True)
@handle_errors
def volume_list(as_csv: bool) -> None:
    """List volumes with size, type and lock status."""
    md = metadata_service()
    rows = []
    for vol in md.list_volumes():
        lock = md.lock_status(vol.name)
        rows.append(
            (
                vol.name,
                str(vol.size) if as_csv else format_size(vol.size),
                vol.type,
                "in-use" if lock.locked else "free",
            )
        )
    if as_csv:
        for row in rows:
            click.echo(",".join(row))
        return
    click.echo(f"{'NAME':<24} {'SIZE':>12} {'TYPE':<6} STATUS")
    for name, size, vtype, status in rows:
        click.echo(f"{name:<24} {size:>12} {vtype:<6} {status}")


@volume_group.command("create-block")
@click.argument("name")
@click.argument("size")
@click.option("--if-missing", is_flag=True, help="Succeed quietly if the volume exists.")
@handle_errors
def volume_create_block(name: str, size: str, if_missing: bool) -> None:
    """Create a thin-provisioned block volume NAME of SIZE (e.g. 10GiB)."""
    md = metadata_service()
    try:
        vol = md.create_volume(name, _size(size))
    except AlreadyExists:
        if if_missing:
            click.echo(f"volume {name} already exists")
            return
        raise
    click.echo(f"created volume {vol.name} (id {vol.id}, {format_size(vol.size)})")


@volume_group.command("delete")
@click.argument("name")
@handle_errors
def volume_delete(name: str) -> None:
    """Delete volume NAME (refused while it is in use). Its blocks are garbage-collected."""
    metadata_service().delete_volume(name)
    click.echo(f"deleted volume {name}")


@volume_group.command("resize")
@click.argument("name")
@click.argument("size")
@handle_errors
def volume_resize(name: str, size: str) -> None:
    """Grow volume NAME to SIZE (shrinking is refused)."""
    vol = metadata_service().resize_volume(name, _size(size))
    click.echo(f"volume {vol.name} is now {format_size(vol.size)}")


# --- ring --------------------------------------------------------------------------------------


@cli.group("ring")
def ring_group() -> None:
    """Inspect and change the placement ring."""


@ring_group.command("get")
@handle_errors
def ring_get() -> None:
    """Describe the current ring."""
    md = metadata_service()
    ring = ring_from_spec(get_ctx().registries.ring_types, md.get_ring())
    click.echo(ring.describe())


@ring_group.command("set-replication")
@click.argument("replication", type=click.IntRange(min=1))
@handle_errors
def ring_set_replication(replication: int) -> None:
    """Change the ring's replication factor (new ring version)."""
    md = metadata_service()
    ring = ring_from_spec(get_ctx().registries.ring_types, md.get_ring())
    new = ring.change_replication(replication)
    md.set_ring(new.to_spec())
    click.echo(f"ring version {new.version}: replication {replication}")


@ring_group.command("manual-change")
@click.option("--type", "ring_type", default="ketama", show_default=True)
@click.option("--uuids", default="", help="Comma-separated peer UUIDs.")
@click.option("--all-peers", is_flag=True, help="Use every live peer with an address.")
@click.option("--replication", "-r", default=2, show_default=True, type=click.IntRange(min=1))
@handle_errors
def ring_manual_change(ring_type: str, uuids: str, all_peers: bool, replication: int) -> None:
    """Replace the ring with a fresh one of TYPE over the given peers (version + 1)."""
    md = metadata_service()
    current = md.get_ring()
    live = {str(p.get("uuid")): p for p in md.list_peers()}
    wanted = (
        [u for u in uuids.split(",") if u]
        if not all_peers
        else [u for u, p in live.items() if p.get("address")]
    )
    members = []
    for uid in wanted:
        peer = live.get(uid, {})
        members.append(RingMember(uid, int(peer.get("total_blocks", 1)) or 1, str(peer.get("address", ""))))
    new = make_ring(
        ring_type,
        members,
        replication=replication,
        version=current.version + 1,
        registry=get_ctx().registries.ring_types,
    )
    md.set_ring(new.to_spec())
    click.echo(new.describe())


# --- metadata ----------------------------------------------------------------------------------


@cli.group("metadata")
def metadata_group() -> None:
    """Operate on the metadata backend as a whole."""


@metadata_group.command("migrate")
@click.option("--to", "target_url", required=True, help="Target metadata URL (must be empty).")
@handle_errors
def metadata_migrate(target_url: str) -> None:
    """Copy the full event log to another backend and verify both projections are identical.

    Leases are not copied: running daemons re-register once pointed at the new backend.
    Stop writers (daemons, mounted volumes) first.
    """
    ctx = get_ctx()
    source = ctx.open_backend()
    target = ctx.open_backend(target_url)
    report = migrate(source, target, verify=compare_projections)
    click.echo(
        f"migrated {report.events} events (head {report.head}) in {report.batches} batches; projections match"
    )


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="torusctl")


from torus_core.cli.block_cmds import block  # noqa: E402

cli.add_command(block)

from torus_core.cli.peer_cmds import peer  # noqa: E402

cli.add_command(peer)


if __name__ == "__main__":
    main()
