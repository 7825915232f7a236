"""The ``torusd`` command-line options of the cluster layer (``--peer-address`` and friends)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from torus_core.cluster.node import ClusterOptions
from torus_core.cluster.rebalancer import RebalanceOptions
from torus_core.config import Config
from torus_core.errors import InvalidArgument, UsageError
from torus_core.units import parse_size

F = TypeVar("F", bound=Callable[..., Any])


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keep an option's value in ``ctx.meta`` (options the command does not take as arguments)."""
    ctx.meta[f"torus.{param.name}"] = value
    return value


def _seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Reject a negative (or NaN) number of seconds as a usage error at parse time."""
    if value is not None and not value >= 0:
        raise click.BadParameter(f"must be >= 0 seconds, got {value}")
    return value


def _positive_seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Reject zero, negative (or NaN) seconds as a usage error at parse time."""
    if value is not None and not value > 0:
        raise click.BadParameter(f"must be > 0 seconds, got {value}")
    return value


def cluster_options(func: F) -> F:
    """Add ``--peer-address``, ``--auto-join``, heartbeat, rebalance and GC options."""
    options = [
        click.option(
            "--peer-address",
            default=None,
            metavar="HOST:PORT",
            help="Serve peer RPC here and run as a cluster storage peer (port 0 = any free port).",
        ),
        click.option("--auto-join", is_flag=True, help="Add this peer to the ring at start-up."),
        click.option(
            "--heartbeat-interval",
            default=2.0,
            show_default=True,
            type=float,
            callback=_positive_seconds,
            help="Seconds between beats.",
        ),
        click.option(
            "--peer-ttl",
            default=None,
            type=float,
            callback=_positive_seconds,
            help="Peer lease TTL (default 3 x interval).",
        ),
        click.option("--rebalance-rate", default="0", show_default=True, help="Push limit/s (0 = none)."),
        click.option(
            "--rebalance-interval",
            default=1.0,
            show_default=True,
            type=float,
            callback=_seconds,
            help="Pause (s).",
        ),
        click.option(
            "--rebalance-settle",
            default=3.0,
            show_default=True,
            type=float,
            callback=_seconds,
            help="Seconds a ring must be in force before copies are dropped.",
        ),
        click.option(
            "--rebalance-idle-max",
            default=30.0,
            show_default=True,
            type=float,
            callback=_seconds,
            metavar="SECONDS",
            help="Longest wait between passes on an idle cluster (0.5 s doubling; 0 = no back-off).",
        ),
        click.option(
            "--gc-grace",
            default=30.0,
            show_default=True,
            type=float,
            callback=_seconds,
            help="Dead-block grace (s).",
        ),
        click.option("--no-gc", is_flag=True, help="Do not garbage-collect on this peer."),
        click.option(
            "--journal-channel-port",
            default=0,
            show_default=True,
            type=click.IntRange(0, 65535),
            envvar="TORUS_JOURNAL_CHANNEL_PORT",
            expose_value=False,
            callback=_remember,
            help="Port of the journal channel (low-latency journal appends; 0 = any free port).",
        ),
        click.option(
            "--no-journal-channel",
            is_flag=True,
            envvar="TORUS_NO_JOURNAL_CHANNEL",
            expose_value=False,
            callback=_remember,
            help="Serve and use no journal channel: journal appends go over gRPC.",
        ),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def make_cluster_options(
    config: Config,
    heartbeat_interval: float,
    peer_ttl: float | None,
    rebalance_rate: str,
    rebalance_interval: float,
    rebalance_settle: float,
    rebalance_idle_max: float,
    gc_grace: float,
    no_gc: bool,
) -> ClusterOptions:
    """Build :class:`ClusterOptions` from the flags and the config (levels, read cache)."""
    ctx = click.get_current_context(silent=True)
    meta: dict[str, Any] = ctx.meta if ctx is not None else {}
    try:
        rate = parse_size(rebalance_rate) if rebalance_rate not in ("", "0") else 0
        return ClusterOptions(
            heartbeat_interval=heartbeat_interval,
            lease_ttl=peer_ttl,
            maintenance_interval=rebalance_interval,
            gc=not no_gc,
            gc_grace=gc_grace,
            rebalance=RebalanceOptions(
                rate_bytes=float(rate), settle=rebalance_settle, idle_max=rebalance_idle_max
            ),
            read_level=config.read_level,
            write_level=config.write_level,
            read_cache_bytes=config.read_cache_size,
            journal_channel=not meta.get("torus.no_journal_channel", False),
            journal_channel_port=int(meta.get("torus.journal_channel_port") or 0),
        )
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from None
