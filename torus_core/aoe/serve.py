"""Serving a volume of a :class:`~torus_core.daemon.server.Server` over AoE (``torusblk aoe``,
``torusd --aoe``).

:func:`serve_aoe` opens the volume through the server's export provider (``BlockVolume.open``:
the volume's lock and lease are held until the target stops; NBD connections of the same
process to the same volume share the opened volume, so they stay coherent), starts an
:class:`~torus_core.aoe.target.AoETarget` and registers a stopper that stops the target, then
closes the volume (sync + unlock), before the server shuts down.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torus_core.aoe.target import DEFAULT_FLUSH_INTERVAL, AoETarget, check_address
from torus_core.errors import InvalidArgument, TorusError, UsageError

if TYPE_CHECKING:
    from torus_core.block.nbd_export import VolumeExport
    from torus_core.daemon.server import Server

_SPEC = re.compile(r"^(?P<iface>[^:=\s]+):(?P<major>\d+)\.(?P<minor>\d+)=(?P<volume>\S+)$")


@dataclass(frozen=True)
class AoESpec:
    """One ``IFACE:MAJOR.MINOR=VOLUME`` served by ``torusd --aoe``."""

    iface: str
    major: int
    minor: int
    volume: str


def parse_aoe_spec(text: str) -> AoESpec:
    """``eth0:1.2=vol`` → AoESpec; UsageError for anything else."""
    m = _SPEC.match(text.strip())
    if not m:
        raise UsageError(f"--aoe wants IFACE:MAJOR.MINOR=VOLUME (e.g. eth0:1.0=disk), got {text!r}")
    spec = AoESpec(m["iface"], int(m["major"]), int(m["minor"]), m["volume"])
    try:
        check_address(spec.major, spec.minor)
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from None
    return spec


class ExportDevice:
    """The AoE target's view of an opened export: the same guarded paths NBD uses (e.g. a write
    that finds the store full waits for GC like an NBD write), and the volume's live size."""

    def __init__(self, export: VolumeExport) -> None:
        self.export = export

    @property
    def size(self) -> int:
        """Current volume size in bytes."""
        return self.export.volume.size

    @property
    def read_only(self) -> bool:
        """True for snapshots."""
        return self.export.read_only

    def read_at(self, offset: int, length: int) -> bytes:
        """Read (zero-padded at the end)."""
        return self.export.read(offset, length)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write into the volume's write-back cache."""
        self.export.write(offset, data, False)
        return len(data)

    def trim(self, offset: int, length: int) -> None:
        """Discard (reads back as zeros)."""
        self.export.trim(offset, length)

    def sync(self) -> None:
        """What an NBD FLUSH does: every completed write durable."""
        self.export.flush()


def serve_aoe(
    server: Server,
    volume: str,
    iface: str,
    major: int,
    minor: int,
    *,
    flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    config: bytes = b"",
    masks: tuple[bytes, ...] = (),
) -> AoETarget:
    """Lock and open ``volume`` and serve it as ``e<major>.<minor>`` on ``iface`` until the server closes."""
    check_address(major, minor)
    export = server.exports.open_export(volume)
    try:
        vol = export.volume
        target = AoETarget(
            ExportDevice(export),
            iface,
            major,
            minor,
            flush_interval=flush_interval,
            config=config,
            masks=masks,
            model=f"torus {vol.name}",
            serial=f"{vol.volume_id:x}.{major}.{minor}"[:20],
            physical_block=vol.block_size,
        ).start()
    except BaseException:
        with contextlib.suppress(TorusError):
            export.close()
        raise

    def stop() -> None:
        try:
            target.stop()
        finally:
            export.close()

    server.add_stopper(stop)
    return target


def serving_line(target: AoETarget, volume: str) -> str:
    """``AOE SERVING e1.2 IFACE MAC VOLUME``: printed once a target runs (tests wait for it)."""
    mac = ":".join(f"{b:02x}" for b in target.mac or b"")
    return f"AOE SERVING {target.name} {target.iface} {mac} {volume}"


def serve_aoe_specs(server: Server, specs: tuple[str, ...] | list[str]) -> list[str]:
    """``torusd --aoe``: parse every spec first, then serve each; returns their serving lines."""
    parsed = [parse_aoe_spec(s) for s in specs]
    seen = set()
    for spec in parsed:
        key = (spec.iface, spec.major, spec.minor)
        if key in seen:
            raise UsageError(f"--aoe: e{spec.major}.{spec.minor} is given twice on {spec.iface}")
        seen.add(key)
    lines = []
    for spec in parsed:
        target = serve_aoe(server, spec.volume, spec.iface, spec.major, spec.minor)
        lines.append(serving_line(target, spec.volume))
    return lines
