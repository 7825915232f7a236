"""An AoE target: one volume served as shelf ``major``, slot ``minor`` on a network interface.

:class:`AoETarget` owns a raw ``AF_PACKET`` socket bound to EtherType ``0x88A2`` on the
interface. At :meth:`~AoETarget.start` it broadcasts a Query Config response (the advertisement
initiators discover targets by; with a MAC mask list it is sent to each listed MAC instead),
then a receive thread answers requests one at a time and a flush thread calls ``sync()`` every
``flush_interval`` seconds (the original synced every 5 s), so unflushed writes are bounded in age.

:meth:`AoETarget.handle` is the whole protocol as a pure function of one frame (no socket), which
is what the loop calls:

- Frames that are not for us are ignored: replies (R flag), other major/minor (``0xFFFF`` and
  ``0xFF`` are wildcards), other destination MACs, sources outside a non-empty MAC mask list,
  frames shorter than the AoE header.
- Version other than 1: error *unsupported version*. Unknown command (including the vendor range
  240-255): *unrecognized command code*. A truncated or inconsistent argument: *bad argument*.
  An error reply echoes the request's argument header (never a write's data).
- Query Config: read, test exact, test prefix (no reply unless it matches), set-if-empty (error
  *config string present* when a different string is set), force set. The reply carries the
  buffer count, firmware version, the sectors per ATA request the interface MTU allows, AoE
  version 1 and the config string.
- MAC Mask List: read and edit (add, delete, no-op directives; *bad directive*, *list full*),
  up to :data:`MAX_MASKS` MACs, kept for the target's lifetime. A non-empty list restricts every
  command (including mask edits) to the listed MACs, as in vblade.
- Reserve/Release: read, set (refused with *target is reserved* unless the list is empty or the
  sender is in it), force set; an empty list releases. While reserved, ATA commands from other
  MACs get *target is reserved*, except IDENTIFY (so initiators can still discover the device).
- Issue ATA Command: :class:`~torus_core.aoe.ata.AtaDevice`.

No authentication exists in AoE: anyone on the L2 segment can read, write, edit the mask list and
reserve the target. Serve only on a trusted segment (docs/aoe.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from torus_core.aoe import wire
from torus_core.aoe.ata import (
    ATA_IDENTIFY,
    ATA_READ,
    ATA_READ_EXT,
    ATA_WRITE,
    ATA_WRITE_EXT,
    MAX_LBA28,
    ST_DRDY,
    AtaDevice,
    Device,
)
from torus_core.errors import Closed, InvalidArgument, Locked, NotSupported, TorusError

log = logging.getLogger(__name__)

#: Requests the target says it can queue (Query Config "buffer count"); the socket's receive
#: buffer is sized to hold this many full frames and more.
BUFFER_COUNT = 16
#: Query Config firmware version.
FIRMWARE_VERSION = 0x0001
DEFAULT_FLUSH_INTERVAL = 5.0
MAX_MASKS = 32
MAX_RESERVE = 64
#: packet types (``sockaddr_ll.sll_pkttype``) that are not addressed to this host
_SO_ATTACH_FILTER = 26
_PACKET_OTHERHOST = 3
_PACKET_OUTGOING = 4
_FAST_HEADER = struct.Struct(">6s6sHBBHBB4sBBBB6s2x")  # Ethernet + AoE + ATA argument: 36 bytes
_RW_COMMANDS = frozenset((ATA_READ, ATA_READ_EXT, ATA_WRITE, ATA_WRITE_EXT))
_ETHERTYPE_BYTES = wire.ETHERTYPE.to_bytes(2, "big")
_FAST_REPLY_FLAGS = bytes(((wire.VERSION << 4) | wire.FLAG_RESPONSE, 0))
_ARG_ECHO = {wire.CMD_ATA: wire.ATA_ARG, wire.CMD_CONFIG: wire.CONFIG_ARG, wire.CMD_MASK: wire.MASK_ARG}


def interface_mtu(iface: str) -> int:
    """The interface MTU from sysfs (1500 if it cannot be read)."""
    try:
        with open(f"/sys/class/net/{iface}/mtu") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1500


def bpf_program(major: int, minor: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF: accept requests (R flag clear) for ``major``/``minor`` or the broadcast values."""
    ld_b, ld_h, jeq, jset, ret = 0x30, 0x28, 0x15, 0x45, 0x06
    return [
        (ld_b, 0, 0, wire.ETH_HEADER),  # 0: version/flags byte
        (jset, 7, 0, wire.FLAG_RESPONSE),  # 1: a reply -> drop
        (ld_h, 0, 0, wire.ETH_HEADER + 2),  # 2: major
        (jeq, 1, 0, major),  # 3: ours -> 5
        (jeq, 0, 4, wire.BROADCAST_MAJOR),  # 4: broadcast -> 5, else drop
        (ld_b, 0, 0, wire.ETH_HEADER + 4),  # 5: minor
        (jeq, 1, 0, minor),  # 6: ours -> accept
        (jeq, 0, 1, wire.BROADCAST_MINOR),  # 7: broadcast -> accept, else drop
        (ret, 0, 0, 0xFFFF_FFFF),  # 8: accept the whole frame
        (ret, 0, 0, 0),  # 9: drop
    ]


def attach_filter(sock: socket.socket, major: int, minor: int) -> bool:
    """Let the kernel drop frames for other targets and replies; False if it cannot (then the
    same checks run in user space anyway)."""
    prog = bpf_program(major, minor)
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.debug("no kernel filter for AoE %d.%d: %s", major, minor, exc)
        return False
    return True


def check_address(major: int, minor: int) -> None:
    """InvalidArgument unless ``major`` is 0..65534 and ``minor`` 0..254 (the top values are broadcast)."""
    if not isinstance(major, int) or not 0 <= major < wire.BROADCAST_MAJOR:
        raise InvalidArgument(f"AoE major (shelf) must be 0..65534, got {major!r}")
    if not isinstance(minor, int) or not 0 <= minor < wire.BROADCAST_MINOR:
        raise InvalidArgument(f"AoE minor (slot) must be 0..254, got {minor!r}")


@dataclass
class TargetStats:
    """Counters of one target (requests answered, errors replied, frames dropped)."""

    requests: int = 0
    errors: int = 0
    dropped: int = 0
    sent: int = 0


class AoETarget:
    """Serves one :class:`~torus_core.aoe.ata.Device` as AoE ``e<major>.<minor>`` on ``iface``.

    ``mac`` and ``mtu`` default to the interface's (read when the socket opens); pass them to use
    :meth:`handle` without a socket. The device is not owned: :meth:`stop` leaves it open.
    """

    def __init__(
        self,
        device: Device,
        iface: str,
        major: int,
        minor: int,
        *,
        mac: bytes | None = None,
        mtu: int | None = None,
        buffer_count: int = BUFFER_COUNT,
        config: bytes = b"",
        masks: Iterable[bytes] = (),
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        model: str = "torus AoE",
        serial: str | None = None,
        physical_block: int = 512,
    ) -> None:
        check_address(major, minor)
        if not 0 < buffer_count <= 0xFFFF:
            raise InvalidArgument(f"buffer count must be 1..65535, got {buffer_count}")
        if len(config) > wire.MAX_CONFIG:
            raise InvalidArgument(f"config string longer than {wire.MAX_CONFIG} bytes")
        if flush_interval < 0:
            raise InvalidArgument("flush interval must be >= 0 (0 disables the periodic flush)")
        self.device = device
        self.iface = iface
        self.major = major
        self.minor = minor
        self.mac = mac
        self._mtu = mtu
        self._fixed_mtu = mtu is not None
        self._max_sectors: int | None = None
        self.buffer_count = buffer_count
        self.config = bytes(config)
        self.masks: list[bytes] = []
        for m in masks:
            if len(m) != 6:
                raise InvalidArgument("MAC mask entries are 6 bytes")
            if m not in self.masks:
                self.masks.append(m)
        if len(self.masks) > MAX_MASKS:
            raise InvalidArgument(f"at most {MAX_MASKS} MAC masks")
        self.reserve: list[bytes] = []
        self.flush_interval = flush_interval
        self.ata = AtaDevice(
            device, model=model, serial=serial or f"e{major}.{minor}", physical_block=physical_block
        )
        self.stats = TargetStats()
        self._address = major.to_bytes(2, "big") + bytes((minor, wire.CMD_ATA))
        self._sock: socket.socket | None = None
        #: whether the kernel drops frames for other targets (a BPF filter on the socket)
        self.kernel_filter = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- properties ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """``e<major>.<minor>``, the name Linux initiators give the device."""
        return f"e{self.major}.{self.minor}"

    @property
    def mtu(self) -> int:
        """The interface MTU as last read (fixed if given at construction)."""
        if self._mtu is None:
            self.refresh_mtu()
        assert self._mtu is not None
        return self._mtu

    def refresh_mtu(self) -> None:
        """Re-read the interface MTU (at start and at every Query Config, as vblade does)."""
        if not self._fixed_mtu:
            self._mtu = interface_mtu(self.iface)
        self._max_sectors = None

    @property
    def max_sectors(self) -> int:
        """Sectors per ATA request the MTU allows (Query Config "sector count")."""
        if self._max_sectors is None:
            self._max_sectors = wire.max_sectors(self.mtu)
        return self._max_sectors

    # --- protocol ------------------------------------------------------------------------------

    def advertisement(self) -> list[bytes]:
        """The unsolicited Query Config responses sent at start (broadcast, or one per mask MAC)."""
        assert self.mac is not None
        dsts = self.masks or [wire.BROADCAST_MAC]
        arg = self._config_arg(wire.CCMD_READ).encode()
        out = []
        for dst in dsts:
            h = wire.Header(dst, self.mac, self.major, self.minor, wire.CMD_CONFIG, flags=wire.FLAG_RESPONSE)
            out.append(wire.frame(h, arg))
        return out

    def handle(self, frame: bytes | bytearray | memoryview) -> bytes | None:
        """The reply to one received frame, or None when it gets none (see the module docstring)."""
        fast = self._fast_read_write(frame)
        if fast is not None:
            return fast
        try:
            h = wire.Header.decode(frame)
        except wire.FrameError:
            self.stats.dropped += 1
            return None
        if (
            h.response
            or h.major not in (self.major, wire.BROADCAST_MAJOR)
            or h.minor not in (self.minor, wire.BROADCAST_MINOR)
            or (self.mac is not None and h.dst not in (self.mac, wire.BROADCAST_MAC))
            or (self.masks and h.src not in self.masks)
        ):
            self.stats.dropped += 1
            return None
        arg = memoryview(frame)[wire.ARG_OFFSET :]
        self.stats.requests += 1
        if h.version != wire.VERSION:
            return self._error(h, arg, wire.ERR_BAD_VERSION)
        try:
            if h.command == wire.CMD_ATA:
                return self._ata(h, arg)
            if h.command == wire.CMD_CONFIG:
                return self._query_config(h, arg)
            if h.command == wire.CMD_MASK:
                return self._mask(h, arg)
            if h.command == wire.CMD_RESERVE:
                return self._reserve(h, arg)
        except wire.FrameError as exc:
            if exc.code is None:
                self.stats.dropped += 1
                return None
            return self._error(h, arg, exc.code)
        return self._error(h, arg, wire.ERR_BAD_COMMAND)

    def _fast_read_write(self, frame: bytes | bytearray | memoryview) -> bytes | None:
        """READ/WRITE SECTORS (EXT) that need no error reply, without building objects (the
        common case, and most of the per-frame cost in Python); None sends the frame down the
        general path, which answers everything else the same way."""
        if len(frame) < _FAST_HEADER.size:
            return None
        dst, src, etype, vf, _err, major, minor, cmd, tag, aflags, _feat, count, ata_cmd, lba_raw = (
            _FAST_HEADER.unpack_from(frame, 0)
        )
        if (
            etype != wire.ETHERTYPE
            or vf != 0x10
            or cmd != wire.CMD_ATA
            or major != self.major
            or minor != self.minor
            or dst != self.mac
            or ata_cmd not in _RW_COMMANDS
            or not 0 < count <= self.max_sectors
            or (self.masks and src not in self.masks)
            or (self.reserve and src not in self.reserve)
        ):
            return None
        write = ata_cmd in (ATA_WRITE, ATA_WRITE_EXT)
        lba = int.from_bytes(lba_raw, "little")
        if ata_cmd in (ATA_READ, ATA_WRITE):
            lba &= MAX_LBA28
        nbytes = count * wire.SECTOR
        if write != bool(aflags & wire.AFLAG_WRITE) or lba + count > self.ata.sectors:
            return None
        if write and (len(frame) - _FAST_HEADER.size < nbytes or self.device.read_only):
            return None
        try:
            if write:
                self.device.write_at(
                    lba * wire.SECTOR, memoryview(frame)[_FAST_HEADER.size : _FAST_HEADER.size + nbytes]
                )
                data = b""
            else:
                data = self.device.read_at(lba * wire.SECTOR, nbytes)
                if len(data) < nbytes:
                    data += bytes(nbytes - len(data))
        except TorusError:
            return None  # the general path retries and reports it
        self.stats.requests += 1
        out = b"".join(
            (
                src,
                dst,
                _ETHERTYPE_BYTES,
                _FAST_REPLY_FLAGS,
                self._address,
                tag,
                bytes((aflags, 0, 0, ST_DRDY)),
                lba.to_bytes(6, "little"),
                b"\0\0",
                data,
            )
        )
        if len(out) < wire.MIN_FRAME:
            out += bytes(wire.MIN_FRAME - len(out))
        return out

    def _reply(self, h: wire.Header, arg: bytes | bytearray) -> bytes:
        rh = h.reply(self.mac or h.dst, self.major, self.minor)
        return wire.frame(rh, arg)

    def _error(self, h: wire.Header, arg: memoryview, code: int) -> bytes:
        self.stats.errors += 1
        rh = h.reply(self.mac or h.dst, self.major, self.minor)
        rh.flags |= wire.FLAG_ERROR
        rh.error = code
        echo = bytes(arg[: _ARG_ECHO.get(h.command, wire.RESERVE_ARG)])
        return wire.frame(rh, echo)

    def _ata(self, h: wire.Header, raw: memoryview) -> bytes:
        arg = wire.AtaArg.decode(raw)
        if self.reserve and h.src not in self.reserve and arg.command != ATA_IDENTIFY:
            return self._error(h, raw, wire.ERR_RESERVED)
        res = self.ata.execute(arg, self.max_sectors)
        if res.aoe_error is not None:
            return self._error(h, raw, res.aoe_error)
        out = wire.AtaArg(
            aflags=arg.aflags,
            feature=res.error,
            count=res.count,
            command=res.status,
            lba=res.lba,
            data=res.data,
        )
        return self._reply(h, out.encode())

    def _config_arg(self, ccmd: int) -> wire.ConfigArg:
        self.refresh_mtu()
        return wire.ConfigArg(
            buffer_count=self.buffer_count,
            firmware=FIRMWARE_VERSION,
            sector_count=self.max_sectors,
            version=wire.VERSION,
            ccmd=ccmd,
            config=self.config,
        )

    def _query_config(self, h: wire.Header, raw: memoryview) -> bytes | None:
        req = wire.ConfigArg.decode(raw)
        code = 0
        if req.ccmd == wire.CCMD_READ:
            pass
        elif req.ccmd == wire.CCMD_TEST:
            if req.config != self.config:
                return None
        elif req.ccmd == wire.CCMD_PREFIX:
            if not self.config.startswith(req.config):
                return None
        elif req.ccmd == wire.CCMD_SET:
            if self.config and self.config != req.config:
                code = wire.ERR_CONFIG_PRESENT
            else:
                self.config = req.config
        elif req.ccmd == wire.CCMD_FORCE_SET:
            self.config = req.config
        else:
            code = wire.ERR_BAD_ARG
        out = self._reply(h, self._config_arg(req.ccmd).encode())
        if code:
            self.stats.errors += 1
            b = bytearray(out)
            b[wire.ETH_HEADER] |= wire.FLAG_ERROR
            b[wire.ETH_HEADER + 1] = code
            out = bytes(b)
        return out

    def _mask(self, h: wire.Header, raw: memoryview) -> bytes:
        req = wire.MaskArg.decode(raw)
        if req.mcmd == wire.MCMD_EDIT:
            for i, (dcmd, mac) in enumerate(req.directives):
                merror = 0
                if dcmd == wire.DCMD_ADD:
                    if mac not in self.masks:
                        if len(self.masks) >= MAX_MASKS:
                            merror = wire.MERR_FULL
                        else:
                            self.masks.append(mac)
                elif dcmd == wire.DCMD_DELETE:
                    with contextlib.suppress(ValueError):
                        self.masks.remove(mac)
                elif dcmd != wire.DCMD_NONE:
                    merror = wire.MERR_BAD_DIRECTIVE
                if merror:
                    # directives before index i were applied; DirCount says where it stopped
                    return self._reply(h, bytes((0, req.mcmd, merror, i)))
        elif req.mcmd != wire.MCMD_READ:
            return self._error(h, raw, wire.ERR_BAD_ARG)
        listing = wire.MaskArg(req.mcmd, 0, [(wire.DCMD_NONE, m) for m in self.masks])
        return self._reply(h, listing.encode())

    def _reserve(self, h: wire.Header, raw: memoryview) -> bytes:
        req = wire.ReserveArg.decode(raw)
        if req.rcmd in (wire.RCMD_SET, wire.RCMD_FORCE_SET):
            if req.rcmd == wire.RCMD_SET and self.reserve and h.src not in self.reserve:
                return self._error(h, raw, wire.ERR_RESERVED)
            if len(req.macs) > MAX_RESERVE:
                return self._error(h, raw, wire.ERR_BAD_ARG)
            self.reserve = list(dict.fromkeys(req.macs))
        elif req.rcmd != wire.RCMD_READ:
            return self._error(h, raw, wire.ERR_BAD_ARG)
        return self._reply(h, wire.ReserveArg(req.rcmd, list(self.reserve)).encode())

    # --- socket --------------------------------------------------------------------------------

    def open_socket(self) -> socket.socket:
        """Open and bind the raw socket; learn the interface MAC. Clear errors for the usual failures."""
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(wire.ETHERTYPE))
        except PermissionError:
            raise NotSupported("AoE needs a raw AF_PACKET socket: run as root or with CAP_NET_RAW") from None
        except (AttributeError, OSError) as exc:
            raise NotSupported(f"cannot open a raw AF_PACKET socket: {exc}") from None
        try:
            sock.bind((self.iface, wire.ETHERTYPE))
        except OSError as exc:
            sock.close()
            reason = exc.strerror or exc
            raise InvalidArgument(f"cannot bind AoE to interface {self.iface!r}: {reason}") from None
        with contextlib.suppress(OSError):
            want = max(self.buffer_count, 64) * (self.mtu + wire.ETH_HEADER) * 2
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
        self.kernel_filter = attach_filter(sock, self.major, self.minor)
        if self.mac is None:
            self.mac = bytes(sock.getsockname()[4])[:6]
        sock.settimeout(0.2)
        self._sock = sock
        return sock

    def start(self) -> AoETarget:
        """Open the socket, advertise, start the receive and flush threads."""
        if self._threads:
            raise InvalidArgument("the AoE target is already running")
        sock = self.open_socket()
        for ad in self.advertisement():
            self._send(sock, ad)
        self._stop.clear()
        rx = threading.Thread(target=self._serve, args=(sock,), name=f"aoe-{self.name}", daemon=True)
        self._threads.append(rx)
        if self.flush_interval > 0:
            self._threads.append(
                threading.Thread(target=self._flusher, name=f"aoe-flush-{self.name}", daemon=True)
            )
        for t in self._threads:
            t.start()
        log.info(
            "AoE %s on %s (%s): %d sectors, %d sectors/request",
            self.name,
            self.iface,
            wire.mac_str(self.mac or b""),
            self.ata.sectors,
            self.max_sectors,
        )
        return self

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.send(data)
            self.stats.sent += 1
        except OSError as exc:
            log.warning("AoE %s: send failed: %s", self.name, exc)

    def _serve(self, sock: socket.socket) -> None:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        while not self._stop.is_set():
            try:
                n, addr = sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.error("AoE %s: receive failed: %s", self.name, exc)
                continue
            if len(addr) > 2 and addr[2] in (_PACKET_OTHERHOST, _PACKET_OUTGOING):
                continue
            try:
                # a copy: the volume may keep (a view of) written data beyond the call, and
                # the receive buffer is reused for the next frame
                reply = self.handle(bytes(view[:n]))
            except Exception:  # a bug must not take the target down; the frame goes unanswered
                log.exception("AoE %s: failed to handle a frame", self.name)
                self.stats.dropped += 1
                continue
            if reply is not None:
                self._send(sock, reply)

    def _flusher(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.device.sync()
            except (Locked, Closed) as exc:
                log.error("AoE %s: periodic flush stopped: %s", self.name, exc)
                return
            except TorusError as exc:
                log.error("AoE %s: periodic flush failed: %s", self.name, exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads and close the socket (the device stays open). Idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> AoETarget:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
