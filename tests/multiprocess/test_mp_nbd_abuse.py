"""Connection and memory abuse against a live ``torusd``: the well-behaved client is served
throughout, and the daemon's memory falls back once the abusers leave.

One real single-node ``torusd`` (SQLite metadata, file store) started by
:class:`~torus_core.testing.procs.TorusdProcess`. A well-behaved client connects from
127.0.0.2 and reads back a pattern every 0.1 s. From 127.0.0.1 the abusers then (1) open
sessions that pipeline 64 one-MiB READs each and never read a reply, and (2) open 400 sockets
that never speak. The test checks that each good read is answered in time with the right bytes,
that a newcomer from the abusive address is refused with a reason it can read, that the
daemon's RSS stays bounded while the abuse lasts, and that it returns to within 20 % of the
start after the abusers leave. Sockets are closed by the test, the daemon is stopped by PID;
every wait is bounded.
"""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.nbd.constants import IHAVEOPT, NBDMAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Cmd, Opt, Rep
from torus_core.testing.procs import TorusdProcess, proc_status_kib, torusctl, wait_for

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
REGION = 8 * MiB  # what everybody reads (warmed first, so the volume's cache does not grow)


class Client:
    """A raw NBD client (simple replies) bound to a chosen source address."""

    def __init__(self, port: int, source: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.handle = 0

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def greet(self) -> None:
        magic, opt_magic, _ = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", 3))

    def option(self, opt: int, data: bytes = b"") -> tuple[int, bytes]:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        _, _, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        return rep, self.recv_exact(length)

    def go(self, name: str) -> None:
        self.greet()
        raw = name.encode()
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, Opt.GO, 6 + len(raw)) + struct.pack(">I", len(raw)))
        self.sock.sendall(raw + struct.pack(">H", 0))
        while True:
            _, _, rep, length = struct.unpack(">QIII", self.recv_exact(20))
            data = self.recv_exact(length)
            assert not rep & (1 << 31), data
            if rep == Rep.ACK:
                return

    def send(self, cmd: int, offset: int, length: int, payload: bytes = b"") -> int:
        self.handle += 1
        head = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.handle, offset, length)
        self.sock.sendall(head + payload)
        return self.handle

    def reply(self, length: int) -> bytes:
        magic, err, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC and err == 0, err
        assert handle == self.handle
        return self.recv_exact(length) if length else b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def torusd() -> Iterator[TorusdProcess]:
    tmp = Path(tempfile.mkdtemp(prefix="torus-abuse-"))
    d = TorusdProcess(
        metadata=f"sqlite:///{tmp}/metadata.db",
        data_dir=tmp / "data",
        size="128MiB",
        extra=(
            "--debug-init",
            "--no-gc",
            "--nbd-max-connections",
            "48",
            "--nbd-max-connections-per-address",
            "24",
            "--nbd-handshake-timeout",
            "3",
        ),
    )
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_good_client_is_served_through_connection_and_memory_abuse_and_rss_returns(torusd):
    torusd.start()  # one peer that joins its own ring
    torusctl(torusd.metadata, "volume", "create-block", "v", "32MiB")
    pid = torusd.pid
    assert pid is not None
    port = torusd.nbd_port
    pattern = bytes(range(256)) * (REGION // 256)

    def connect() -> Client:
        c = Client(port, "127.0.0.2")
        try:
            c.go("v")
        except AssertionError:
            c.close()
            raise RuntimeError("volume not served yet") from None
        return c

    clients: list[Client] = []
    assert wait_for(lambda: bool(clients.append(connect()) or True), 30.0, 0.5), torusd.log_tail()
    good = clients[0]
    for off in range(0, REGION, MiB):
        good.send(Cmd.WRITE, off, MiB, pattern[off : off + MiB])
        good.reply(0)
    good.send(Cmd.FLUSH, 0, 0)
    good.reply(0)

    def good_read(i: int) -> float:
        off = (i * 64 * 1024) % REGION
        t0 = time.monotonic()
        good.send(Cmd.READ, off, 64 * 1024)
        assert good.reply(64 * 1024) == pattern[off : off + 64 * 1024]
        return time.monotonic() - t0

    for i in range(REGION // (64 * 1024)):  # warm the cache over the region
        good_read(i)
    time.sleep(1.0)
    start_kib = proc_status_kib(pid, "VmRSS")

    abusers: list[Client] = []
    try:
        for _ in range(16):  # sessions pipelining READs, never reading a reply
            c = Client(port, "127.0.0.1")
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            c.go("v")
            reqs = b"".join(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.READ, i, (i % 8) * MiB, MiB) for i in range(64)
            )
            c.sock.sendall(reqs)
            abusers.append(c)
        for _ in range(400):  # sockets that never speak
            try:
                abusers.append(Client(port, "127.0.0.1", timeout=2.0))
            except OSError:
                break
        # a newcomer from the abusive address is told why (before the 3 s handshake timeout frees slots)
        newcomer = Client(port, "127.0.0.1")
        newcomer.greet()
        rep, msg = newcomer.option(Opt.LIST)
        newcomer.close()
        assert rep == Rep.ERR_POLICY and b"too many connections" in msg, (rep, msg)
        worst = 0.0
        peak_kib = 0
        t_end = time.monotonic() + 6.0
        i = 0
        while time.monotonic() < t_end:
            worst = max(worst, good_read(i))
            peak_kib = max(peak_kib, proc_status_kib(pid, "VmRSS"))
            i += 1
            time.sleep(0.05)
        assert worst < 2.0, f"a good read took {worst:.2f} s under abuse"
        # bounded: the 256 MiB budget plus small buffers, far from 16 x 64 MiB of replies
        assert peak_kib - start_kib < 450 * 1024, (start_kib, peak_kib)
    finally:
        for c in abusers:
            c.close()

    def settled() -> bool:
        good_read(0)
        return proc_status_kib(pid, "VmRSS") <= start_kib * 1.2

    assert wait_for(settled, 20.0, 0.5), (start_kib, proc_status_kib(pid, "VmRSS"))
    end_kib = proc_status_kib(pid, "VmRSS")
    print(f"RSS start {start_kib} KiB, peak {peak_kib} KiB, end {end_kib} KiB, worst good read {worst:.3f} s")
    # the abusive address may connect again once its sockets are gone
    again = Client(port, "127.0.0.1")
    again.go("v")
    again.close()
    good.close()
