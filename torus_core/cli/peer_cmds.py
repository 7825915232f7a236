"""``torusctl peer ...``: list the peers, add them to the ring, remove them from it.

Attached to torusctl with ``cli.add_command(peer)``.

``peer list`` shows every storage peer (clients, which have no address, are hidden):
``OK`` = in the ring and heartbeating, ``Avail`` = heartbeating but not in the ring, ``DOWN`` =
in the ring but not heartbeating (shown with its UUID only), ``single`` = a single-node torusd
(no ring; listed for its store usage). JOURNAL is the disk space of its volume journal files
(its own volumes' and the replicas it holds for other peers): written data sits there, and not
yet in USED, until the next checkpoint (within 30 s of a write, sooner after many writes, or when
the volume closes); it is space reserved on disk (segments grow 8 MiB at a time), not record
bytes. REB/REP is the bytes/s its rebalancer pushed in its last or current pass. The footer sums
usage and journal space, counts the live blocks found under-replicated by the peers' last
complete passes (garbage is never counted) and says whether the cluster is balanced:
``Balanced: yes`` only when no ring member is down and every live storage peer has finished a
pass on the current ring that found all its live blocks on their owners (nothing missing,
nothing unconfirmed) and is not moving data now.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click

from torus_core.cli.common import get_ctx, handle_errors, metadata_service
from torus_core.cluster.peerinfo import PeerInfo, parse_peers
from torus_core.errors import Again, NonSequentialRing, NotSupported, UsageError
from torus_core.metadata import MetadataService
from torus_core.ring.base import Ring, RingMember
from torus_core.ring.codec import make_ring, ring_from_spec
from torus_core.units import format_size

#: Attempts of a ring change against concurrent changes.
RING_ATTEMPTS = 20


def _ring(md: MetadataService) -> Ring:
    return ring_from_spec(get_ctx().registries.ring_types, md.get_ring())


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


@click.group("peer")
def peer() -> None:
    """List storage peers and add them to / remove them from the ring."""


@peer.command("list")
@click.option("--csv", "as_csv", is_flag=True, help="Comma-separated output with raw numbers.")
@handle_errors
def peer_list(as_csv: bool) -> None:
    """Show peers: address, uuid, size, usage, journal space, membership, last heartbeat,
    rebalance rate."""
    md = metadata_service()
    block_size = md.global_metadata().block_size
    live = {u: p for u, p in parse_peers(md.list_peers()).items() if p.address}
    ring = _ring(md)
    members = ring.members()
    now = time.time()
    rows: list[tuple[str, ...]] = []
    total = used = journal = 0
    under = 0
    balanced = True
    for uuid in sorted(set(live) | set(members), key=lambda u: (live[u].address if u in live else "~", u)):
        info = live.get(uuid)
        if info is None:
            rows.append(("", uuid, "", "", "", "DOWN", "", "", ""))
            balanced = False
            continue
        single = info.role == "single"
        status = "single" if single else "OK" if uuid in members else "Avail"
        total += info.total_blocks
        used += info.used_blocks
        journal += info.journal_bytes
        reb = info.rebalance
        under += max(0, reb.under_replicated)
        if not single:  # a single node has nothing to rebalance
            balanced &= peer_settled(info, ring.version)
        size_b, used_b = info.total_blocks * block_size, info.used_blocks * block_size
        if as_csv:
            rows.append(
                (
                    info.address,
                    uuid,
                    str(size_b),
                    str(used_b),
                    str(info.journal_bytes),
                    status,
                    f"{info.last_seen:.3f}",
                    f"{reb.rate:.0f}",
                    str(reb.under_replicated),
                )
            )
        else:
            rows.append(
                (
                    info.address,
                    uuid,
                    format_size(size_b),
                    format_size(used_b),
                    format_size(info.journal_bytes),
                    status,
                    _ago(now - info.last_seen),
                    "-" if single else f"{format_size(int(reb.rate))}/s",
                    # a single node replicates nothing; "?" is a peer with no complete pass yet
                    "-" if single else str(reb.under_replicated) if reb.under_replicated >= 0 else "?",
                )
            )
    header = ("ADDRESS", "UUID", "SIZE", "USED", "JOURNAL", "MEMBER", "UPDATED", "REB/REP DATA", "UNDER-REP")
    if as_csv:
        for row in (header, *rows):
            click.echo(",".join(row))
        return
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    pct = 100.0 * used / total if total else 0.0
    click.echo(
        f"Balanced: {'yes' if balanced and not under else 'no'}  Under-replicated: {under}  "
        f"Usage: {format_size(used * block_size)}/{format_size(total * block_size)} ({pct:.1f}%)  "
        f"Journal: {format_size(journal)}"
    )


def peer_settled(info: PeerInfo, ring_version: int) -> bool:
    """Whether a live storage peer's last complete rebalance pass ran on ring ``ring_version``,
    found every live block it holds on all the block's owners and could ask them all, and the
    peer is not moving data now."""
    reb = info.rebalance
    return (
        reb.passes > 0
        and reb.ring_version == ring_version
        and reb.under_replicated == 0
        and reb.unconfirmed == 0
        and not reb.rebalancing
    )


def _resolve(
    targets: tuple[str, ...], live: dict[str, PeerInfo], *, extra: set[str] | None = None
) -> list[str]:
    extra = extra or set()
    by_addr = {p.address: u for u, p in live.items() if p.address}
    out: list[str] = []
    for t in targets:
        if t in live and live[t].address:
            out.append(t)
        elif t in by_addr:
            out.append(by_addr[t])
        elif t in extra:
            out.append(t)
        else:
            raise UsageError(f"{t!r} is not the address or UUID of a live storage peer")
    return list(dict.fromkeys(out))


def _change_ring(md: MetadataService, change: Callable[[Ring], Ring]) -> Ring:
    for _ in range(RING_ATTEMPTS):
        new = change(_ring(md))
        try:
            md.set_ring(new.to_spec())
        except (Again, NonSequentialRing):
            time.sleep(0.05)
            continue
        return new
    raise Again("the ring kept changing; try again")


@peer.command("add")
@click.argument("targets", nargs=-1, metavar="ADDRESS|UUID...")
@click.option("--all-peers", is_flag=True, help="Add every live storage peer not in the ring.")
@handle_errors
def peer_add(targets: tuple[str, ...], all_peers: bool) -> None:
    """Add live storage peers to the ring (new ring version)."""
    md = metadata_service()
    live = {u: p for u, p in parse_peers(md.list_peers()).items() if p.address}
    if all_peers:
        members = set(_ring(md).members())
        uuids = [u for u in sorted(live) if u not in members]
        if not uuids:
            click.echo("every live peer is already in the ring")
            return
    elif not targets:
        raise UsageError("name the peers to add (ADDRESS or UUID), or use --all-peers")
    else:
        uuids = _resolve(targets, live)
    new_members = [RingMember(u, max(1, live[u].total_blocks), live[u].address) for u in uuids]
    replication = md.global_metadata().replication or 2

    def change(ring: Ring) -> Ring:
        try:
            return ring.add_peers(new_members)
        except NotSupported:  # an empty ring: start a ketama ring
            return make_ring(
                "ketama",
                new_members,
                replication=replication,
                version=ring.version + 1,
                registry=get_ctx().registries.ring_types,
            )

    new = _change_ring(md, change)
    click.echo(f"ring version {new.version}: added {', '.join(uuids)}")


@peer.command("remove")
@click.argument("targets", nargs=-1, required=True, metavar="ADDRESS|UUID...")
@click.option("--force", is_flag=True, help="Allow removing a peer that is not heartbeating (dead).")
@handle_errors
def peer_remove(targets: tuple[str, ...], force: bool) -> None:
    """Remove peers from the ring; their blocks are re-replicated from the surviving copies."""
    md = metadata_service()
    live = {u: p for u, p in parse_peers(md.list_peers()).items() if p.address}
    members = set(_ring(md).members())
    dead = members - set(live)
    try:
        uuids = _resolve(targets, live, extra=dead if force else set())
    except UsageError:
        if not force and any(t in dead for t in targets):
            raise UsageError("that peer is not heartbeating; use --force to remove a dead peer") from None
        raise
    new = _change_ring(md, lambda ring: ring.remove_peers(uuids))
    click.echo(f"ring version {new.version}: removed {', '.join(uuids)}")
