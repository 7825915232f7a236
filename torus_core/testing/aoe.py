"""A small AoE (r11) initiator over a raw ``AF_PACKET`` socket, for tests and benchmarks.

It deliberately shares no code with :mod:`torus_core.aoe` (its own ``struct`` layouts), so the
tests that run it against vblade first and torus second check torus against an independent
reading of the spec, not against itself.

Also here: :func:`veth_pair`, which creates a uniquely named veth pair for a test and always
deletes it, and :func:`raw_socket_problem`, which says why this machine cannot run AoE tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ETHERTYPE = 0x88A2
BROADCAST = b"\xff" * 6
_HDR = struct.Struct(">6s6sHBBHBB4s")  # Ethernet + AoE header, 24 bytes
_ATA = struct.Struct("<BBBB6s2x")  # aflags, err/feature, count, cmd/status, lba (LE), reserved
_CFG = struct.Struct(">HHBBH")

AFLAG_WRITE = 0x01
AFLAG_EXT = 0x40

ATA_DSM = 0x06
ATA_READ = 0x20
ATA_READ_EXT = 0x24
ATA_WRITE = 0x30
ATA_WRITE_EXT = 0x34
ATA_CHECK_POWER = 0xE5
ATA_FLUSH = 0xE7
ATA_FLUSH_EXT = 0xEA
ATA_IDENTIFY = 0xEC
ST_ERR = 0x01
ST_DF = 0x20
ST_DRDY = 0x40
ER_ABRT = 0x04
ER_IDNF = 0x10


class AoETimeout(Exception):
    """No reply arrived in time."""


@dataclass
class Reply:
    """One received AoE reply (header fields plus the raw argument bytes)."""

    src: bytes
    dst: bytes
    version: int
    flags: int
    error: int
    major: int
    minor: int
    command: int
    tag: bytes
    arg: bytes

    @property
    def is_error(self) -> bool:
        """The E flag."""
        return bool(self.flags & 0x04)

    # ATA replies
    @property
    def ata_status(self) -> int:
        """ATA status register of an Issue ATA Command reply."""
        return self.arg[3]

    @property
    def ata_error(self) -> int:
        """ATA error register."""
        return self.arg[1]

    @property
    def ata_count(self) -> int:
        """Sector count register."""
        return self.arg[2]

    @property
    def ata_data(self) -> bytes:
        """Data after the 12-byte ATA argument."""
        return self.arg[12:]

    # Query Config replies
    def config(self) -> tuple[int, int, int, int, int, bytes]:
        """``(buffer count, firmware, sector count, aoe version, ccmd, config string)``."""
        bufcnt, fw, scnt, vc, n = _CFG.unpack_from(self.arg, 0)
        return bufcnt, fw, scnt, vc >> 4, vc & 0x0F, self.arg[8 : 8 + n]


def interface_mac(iface: str) -> bytes:
    """The MAC of a local interface (sysfs)."""
    with open(f"/sys/class/net/{iface}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


class Initiator:
    """Sends AoE requests on ``iface`` to ``major.minor`` and matches replies by tag.

    ``discover`` learns the target's MAC (replies from other MACs are then ignored) and its
    sector count; until then requests go to the broadcast MAC.
    """

    def __init__(self, iface: str, major: int, minor: int, *, timeout: float = 2.0, retries: int = 3) -> None:
        self.iface = iface
        self.major = major
        self.minor = minor
        self.timeout = timeout
        self.retries = retries
        self.mac = interface_mac(iface)
        self.target: bytes | None = None
        self.max_sectors = 2
        self.buffer_count = 16
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        self.sock.bind((iface, ETHERTYPE))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self._tag = int.from_bytes(os.urandom(4), "big") & 0x7FFF_FFFF
        self.stray = 0  # replies ignored (unknown tag, other source)
        self.retransmits = 0  # requests sent again after a timeout

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> Initiator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- framing -------------------------------------------------------------------------------

    def next_tag(self) -> bytes:
        """A fresh tag."""
        self._tag = (self._tag + 1) & 0x7FFF_FFFF
        return self._tag.to_bytes(4, "big")

    def build(
        self,
        command: int,
        arg: bytes,
        *,
        tag: bytes,
        version: int = 1,
        flags: int = 0,
        dst: bytes | None = None,
        major: int | None = None,
        minor: int | None = None,
    ) -> bytes:
        """A request frame (no padding: the kernel does not pad, so the target sees exact lengths)."""
        return (
            _HDR.pack(
                dst or self.target or BROADCAST,
                self.mac,
                ETHERTYPE,
                ((version & 0xF) << 4) | (flags & 0xF),
                0,
                self.major if major is None else major,
                self.minor if minor is None else minor,
                command,
                tag,
            )
            + arg
        )

    def send_raw(self, frame: bytes) -> None:
        """Send a frame as is (malformed-frame tests)."""
        self.sock.send(frame)

    def _parse(self, data: bytes) -> Reply | None:
        if len(data) < _HDR.size:
            return None
        dst, src, etype, vf, err, major, minor, cmd, tag = _HDR.unpack_from(data, 0)
        if etype != ETHERTYPE or not vf & 0x08:
            return None  # not AoE, or a request (our own, echoed by the packet socket)
        return Reply(src, dst, vf >> 4, vf & 0x0F, err, major, minor, cmd, tag, data[_HDR.size :])

    def receive(self, deadline: float) -> Reply | None:
        """The next AoE reply addressed to us, or None at ``deadline``."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(1 << 16)
            except TimeoutError:
                return None
            if addr[2] == 4:  # PACKET_OUTGOING
                continue
            r = self._parse(data)
            if r is None or r.dst not in (self.mac, BROADCAST):
                continue
            return r

    def _matches(self, r: Reply, tag: bytes) -> bool:
        if r.tag != tag or (self.target is not None and r.src != self.target):
            self.stray += 1
            return False
        return True

    def request(self, command: int, arg: bytes = b"", *, timeout: float | None = None, **kw: Any) -> Reply:
        """Send one request and wait for its reply (retransmitting); AoETimeout if none comes."""
        tag = kw.pop("tag", None) or self.next_tag()
        assert isinstance(tag, bytes)
        frame = self.build(command, arg, tag=tag, **kw)
        wait = self.timeout if timeout is None else timeout
        for _ in range(self.retries):
            self.sock.send(frame)
            deadline = time.monotonic() + wait
            while (r := self.receive(deadline)) is not None:
                if self._matches(r, tag):
                    return r
        raise AoETimeout(f"no reply to AoE command {command} (tag {tag.hex()})")

    def no_reply(self, command: int, arg: bytes = b"", *, wait: float = 1.5, **kw: Any) -> bool:
        """Send once; True if no reply with that tag arrived within ``wait`` seconds."""
        tag = self.next_tag()
        self.sock.send(self.build(command, arg, tag=tag, **kw))
        deadline = time.monotonic() + wait
        while (r := self.receive(deadline)) is not None:
            if r.tag == tag:
                return False
        return True

    # --- commands ------------------------------------------------------------------------------

    def discover(self, timeout: float = 2.0) -> Reply:
        """Query Config read to our major.minor; remembers the target MAC, sector and buffer counts."""
        r = self.query_config(0, b"", timeout=timeout)
        assert not r.is_error, f"Query Config failed with AoE error {r.error}"
        self.target = r.src
        bufcnt, _fw, scnt, _ver, _cc, _cfg = r.config()
        self.max_sectors = scnt or 2  # 0 means 2 (AoEr11 §3.2)
        self.buffer_count = bufcnt or 1
        return r

    def wait_advertisement(self, timeout: float = 5.0) -> Reply | None:
        """An unsolicited Query Config reply (tag 0) from major.minor, if one arrives in time."""
        deadline = time.monotonic() + timeout
        while (r := self.receive(deadline)) is not None:
            if r.command == 1 and r.major == self.major and r.minor == self.minor:
                return r
        return None

    def query_config(
        self, ccmd: int, config: bytes = b"", *, timeout: float | None = None, **kw: Any
    ) -> Reply:
        """Query Config Information with sub-command ``ccmd``."""
        arg = _CFG.pack(0, 0, 0, 0x10 | ccmd, len(config)) + config
        return self.request(1, arg, timeout=timeout, **kw)

    def config_arg(self, ccmd: int, config: bytes = b"") -> bytes:
        """A Query Config argument (for :meth:`no_reply`)."""
        return _CFG.pack(0, 0, 0, 0x10 | ccmd, len(config)) + config

    @staticmethod
    def ata_arg(
        cmd: int, lba: int = 0, count: int = 0, *, write: bool = False, ext: bool = False, feature: int = 0
    ) -> bytes:
        """A 12-byte Issue ATA Command argument."""
        aflags = (AFLAG_WRITE if write else 0) | (AFLAG_EXT if ext else 0)
        return _ATA.pack(aflags, feature, count, cmd, lba.to_bytes(6, "little"))

    def ata(
        self,
        cmd: int,
        lba: int = 0,
        count: int = 0,
        data: bytes = b"",
        *,
        write: bool = False,
        ext: bool | None = None,
        feature: int = 0,
        **kw: Any,
    ) -> Reply:
        """Issue one ATA command."""
        if ext is None:
            ext = cmd in (ATA_READ_EXT, ATA_WRITE_EXT, ATA_FLUSH_EXT)
        return self.request(
            0, self.ata_arg(cmd, lba, count, write=write, ext=ext, feature=feature) + data, **kw
        )

    def identify(self) -> bytes:
        """IDENTIFY DEVICE data (512 bytes)."""
        r = self.ata(ATA_IDENTIFY, count=1)
        assert not r.is_error and not r.ata_status & ST_ERR, (r.error, r.ata_status, r.ata_error)
        return r.ata_data[:512]

    def flush(self, ext: bool = True) -> Reply:
        """FLUSH CACHE (EXT)."""
        return self.ata(ATA_FLUSH_EXT if ext else ATA_FLUSH, timeout=max(self.timeout, 30.0))

    def read_sectors(self, lba: int, count: int, *, ext: bool = True) -> bytes:
        """One READ SECTORS (EXT); raises AssertionError on an error reply."""
        r = self.ata(ATA_READ_EXT if ext else ATA_READ, lba, count)
        assert not r.is_error and not r.ata_status & ST_ERR, (r.error, r.ata_status, r.ata_error)
        return r.ata_data[: count * 512]

    def write_sectors(self, lba: int, data: bytes, *, ext: bool = True) -> Reply:
        """One WRITE SECTORS (EXT)."""
        return self.ata(ATA_WRITE_EXT if ext else ATA_WRITE, lba, len(data) // 512, data, write=True)

    # --- pipelined bulk transfer ---------------------------------------------------------------

    def _pipeline(self, requests: list[tuple[int, int, bytes]], write: bool) -> dict[int, bytes]:
        """Run (lba, count, data) requests with up to ``buffer_count`` in flight; lba → data read."""
        cmd = ATA_WRITE_EXT if write else ATA_READ_EXT
        window = max(1, min(self.buffer_count, 16))
        pending: dict[bytes, tuple[int, int, bytes, float, int]] = {}
        results: dict[int, bytes] = {}
        todo = list(reversed(requests))

        def send(lba: int, count: int, data: bytes, tries: int) -> None:
            tag = self.next_tag()
            arg = self.ata_arg(cmd, lba, count, write=write, ext=True) + data
            self.sock.send(self.build(0, arg, tag=tag))
            pending[tag] = (lba, count, data, time.monotonic() + self.timeout, tries)

        while todo or pending:
            while todo and len(pending) < window:
                lba, count, data = todo.pop()
                send(lba, count, data, 1)
            deadline = min(p[3] for p in pending.values())
            r = self.receive(deadline)
            if r is None:
                for tag, (lba, count, data, due, tries) in list(pending.items()):
                    if due <= time.monotonic():
                        del pending[tag]
                        if tries >= self.retries:
                            raise AoETimeout(f"no reply for LBA {lba} after {tries} tries")
                        self.retransmits += 1
                        send(lba, count, data, tries + 1)
                continue
            if r.tag not in pending or (self.target is not None and r.src != self.target):
                self.stray += 1
                continue
            lba, count, _data, _due, _tries = pending.pop(r.tag)
            if r.is_error or r.ata_status & ST_ERR:
                raise OSError(
                    f"AoE {'write' if write else 'read'} at LBA {lba} failed: error {r.error}, "
                    f"status {r.ata_status:#x}, err {r.ata_error:#x}"
                )
            if not write:
                results[lba] = r.ata_data[: count * 512]
        return results

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (both multiples of 512), pipelined."""
        assert offset % 512 == 0 and length % 512 == 0
        step = self.max_sectors
        reqs = [
            (lba, min(step, offset // 512 + length // 512 - lba), b"")
            for lba in range(offset // 512, (offset + length) // 512, step)
        ]
        got = self._pipeline(reqs, write=False)
        return b"".join(got[lba] for lba, _, _ in reqs)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (both multiples of 512), pipelined."""
        assert offset % 512 == 0 and len(data) % 512 == 0
        step = self.max_sectors * 512
        reqs = [
            (offset // 512 + i // 512, min(step, len(data) - i) // 512, data[i : i + step])
            for i in range(0, len(data), step)
        ]
        self._pipeline(reqs, write=True)


# --- test environment helpers ------------------------------------------------------------------


def raw_socket_problem() -> str | None:
    """Why AoE tests cannot run here (no root/CAP_NET_RAW, no veth, no ip tool), or None."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        s.close()
    except PermissionError:
        return "raw AF_PACKET sockets need root or CAP_NET_RAW"
    except (AttributeError, OSError) as exc:
        return f"raw AF_PACKET sockets unavailable: {exc}"
    try:
        with veth_pair(mtu=1500):
            pass
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a veth pair: {exc}"
    return None


@contextlib.contextmanager
def veth_pair(mtu: int = 1500) -> Iterator[tuple[str, str]]:
    """Create a uniquely named, up veth pair ``(target_end, initiator_end)``; delete it after."""
    base = "ao" + uuid.uuid4().hex[:8]
    a, b = base + "t", base + "i"
    subprocess.run(
        ["ip", "link", "add", a, "mtu", str(mtu), "type", "veth", "peer", "name", b, "mtu", str(mtu)],
        check=True,
        capture_output=True,
        timeout=20,
    )
    try:
        for dev in (a, b):
            # no IPv6 on the test link: keeps router solicitations and DAD frames off it
            with contextlib.suppress(OSError):
                with open(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6", "w") as f:
                    f.write("1")
            subprocess.run(["ip", "link", "set", dev, "up"], check=True, capture_output=True, timeout=20)
        yield a, b
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True, timeout=20)
