# mypy: allow-untyped-defs
"""Protocol-level tests of the NBD server with a raw-socket client (bad input, errors, ordering)."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.errors import BlockUnavailable, InvalidArgument, MetadataUnavailable
from torus_core.nbd import MemoryExportProvider, NBDServer, ServerThread
from torus_core.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from torus_core.nbd.memory import MemoryExport, MemoryStore

SIZE = 1 << 20


class RawClient:
    """A minimal NBD client speaking bytes directly, so tests can send anything."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._handle = 0

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def is_closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def greet(self, client_flags: int = 3) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", client_flags))
        return flags

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC
        return opt, rep, self.recv_exact(length)

    def replies_until_final(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            _, rep, data = self.option_reply()
            out.append((rep, data))
            if rep == Rep.ACK or rep & (1 << 31):
                return out

    def go(self, name: str = "disk", structured: bool = True, meta: bool = True, opt: int = Opt.GO):
        """Negotiate and return (size, transmission flags, block sizes or None)."""
        if structured:
            self.option(Opt.STRUCTURED_REPLY)
            assert self.option_reply()[1] == Rep.ACK
            if meta:
                raw = name.encode()
                q = b"base:allocation"
                self.option(
                    Opt.SET_META_CONTEXT,
                    struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(q)) + q,
                )
                replies = self.replies_until_final()
                assert replies[-1][0] == Rep.ACK, replies
        raw = name.encode()
        self.option(opt, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, Info.BLOCK_SIZE))
        replies = self.replies_until_final()
        assert replies[-1][0] == Rep.ACK, replies
        size = flags = 0
        sizes = None
        for _rep, data in replies[:-1]:
            (kind,) = struct.unpack_from(">H", data)
            if kind == Info.EXPORT:
                size, flags = struct.unpack_from(">QH", data, 2)
            elif kind == Info.BLOCK_SIZE:
                sizes = struct.unpack_from(">III", data, 2)
        return size, flags, sizes

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        handle: int | None = None,
    ) -> int:
        if handle is None:
            self._handle += 1
            handle = self._handle
        hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)
        self.sock.sendall(hdr + payload)
        return handle

    def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return handle, error, data

    def chunk(self) -> tuple[int, int, int, bytes]:
        """One structured chunk: (handle, flags, type, payload)."""
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", self.recv_exact(20))
        assert magic == STRUCTURED_REPLY_MAGIC
        return handle, flags, rtype, self.recv_exact(length)

    def structured_reply(self) -> tuple[int, int, bytes | list[tuple[int, int]] | None]:
        """A whole structured reply: (handle, error, read data / extents / None)."""
        handle, flags, rtype, payload = self.chunk()
        assert flags & 1, "this server sends single-chunk replies"
        if rtype == ReplyType.ERROR:
            err, mlen = struct.unpack_from(">IH", payload)
            return handle, err, payload[6 : 6 + mlen]
        if rtype == ReplyType.OFFSET_DATA:
            return handle, 0, payload[8:]
        if rtype == ReplyType.BLOCK_STATUS:
            n = (len(payload) - 4) // 8
            return handle, 0, [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range(n)]
        assert rtype == ReplyType.NONE
        return handle, 0, None


def _start(provider, **kw) -> ServerThread:
    return ServerThread(NBDServer(provider, port=0, **kw)).start()


@pytest.fixture
def provider() -> MemoryExportProvider:
    p = MemoryExportProvider()
    p.add("disk", SIZE, description="test disk")
    p.add("ro", SIZE, read_only=True)
    return p


@pytest.fixture
def server(provider) -> Iterator[ServerThread]:
    st = _start(provider, max_payload=64 * 1024, max_inflight_bytes=256 * 1024)
    yield st
    st.stop()


@pytest.fixture
def client(server) -> Iterator[RawClient]:
    c = RawClient(server.port)
    yield c
    c.close()


def _wait_until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# --- handshake ----------------------------------------------------------------------------------


def test_greeting_advertises_fixed_newstyle_and_no_zeroes(client):
    assert client.greet() == 3


def test_unknown_client_flags_drop_the_connection(client):
    client.greet(client_flags=0x80)
    assert client.is_closed_by_server()


def test_bad_option_magic_closes_the_connection(client):
    client.greet()
    client.sock.sendall(struct.pack(">QII", 0x1234, Opt.GO, 0))
    assert client.is_closed_by_server()


def test_unknown_option_gets_unsup_and_negotiation_continues(client):
    client.greet()
    client.option(77, b"xyz")
    opt, rep, _ = client.option_reply()
    assert (opt, rep) == (77, Rep.ERR_UNSUP)
    size, flags, _ = client.go()
    assert size == SIZE and flags & TransmissionFlag.HAS_FLAGS


def test_huge_option_length_is_refused_without_reading_it(client, server):
    client.greet()
    client.sock.sendall(struct.pack(">QII", IHAVEOPT, Opt.GO, 0xFFFFFFF0))
    _opt, rep, msg = client.option_reply()
    assert rep == Rep.ERR_TOO_BIG and b"too big" in msg
    assert client.is_closed_by_server()
    other = RawClient(server.port)  # the server is still healthy
    other.greet()
    assert other.go()[0] == SIZE
    other.close()


def test_malformed_go_payload_gets_err_invalid(client):
    client.greet()
    client.option(Opt.GO, struct.pack(">I", 100) + b"disk")  # name length beyond the data
    assert client.option_reply()[1] == Rep.ERR_INVALID
    assert client.go()[0] == SIZE


def test_go_unknown_export_gets_err_unknown(client):
    client.greet()
    client.option(Opt.GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert client.option_reply()[1] == Rep.ERR_UNKNOWN


def test_go_on_a_locked_export_is_refused_by_policy_with_the_reason(caplog):
    p = MemoryExportProvider(exclusive=True)
    p.add("disk", SIZE)
    with _start(p) as st:
        first, second = RawClient(st.port), RawClient(st.port)
        first.greet()
        first.go()
        second.greet()
        second.option(Opt.GO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
        _, rep, msg = second.option_reply()
        # POLICY, not UNKNOWN: libnbd turns UNKNOWN into "server has no export named ..."
        assert rep == Rep.ERR_POLICY and b"in use" in msg
        refusals = [r for r in caplog.records if "refused export 'disk'" in r.getMessage()]
        assert refusals and refusals[0].levelno == logging.WARNING and "in use" in refusals[0].getMessage()
        first.close()
        second.close()


def test_info_describes_without_opening(client, provider):
    client.greet()
    raw = b"disk"
    client.option(Opt.INFO, struct.pack(">I", 4) + raw + struct.pack(">HHH", 2, Info.NAME, Info.DESCRIPTION))
    replies = client.replies_until_final()
    assert replies[-1][0] == Rep.ACK
    payloads = {struct.unpack_from(">H", d)[0]: d[2:] for _, d in replies[:-1]}
    assert payloads[Info.NAME] == b"disk" and payloads[Info.DESCRIPTION] == b"test disk"
    assert struct.unpack_from(">Q", payloads[Info.EXPORT])[0] == SIZE
    assert provider.open_count("disk") == 0


def test_list_names_every_export(client):
    client.greet()
    client.option(Opt.LIST)
    replies = client.replies_until_final()
    names = [d[4:].decode() for rep, d in replies if rep == Rep.SERVER]
    assert names == ["disk", "ro"] and replies[-1][0] == Rep.ACK


def test_abort_is_acked_then_closed(client):
    client.greet()
    client.option(Opt.ABORT)
    assert client.option_reply()[1] == Rep.ACK
    assert client.is_closed_by_server()


def test_export_name_with_no_zeroes_sends_exactly_size_and_flags(client):
    client.greet()
    client.option(Opt.EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", client.recv_exact(10))
    assert size == SIZE and flags & TransmissionFlag.SEND_FLUSH
    h = client.request(Cmd.READ, 0, 16)
    assert client.simple_reply(16) == (h, 0, bytes(16))  # transmission starts right away


def test_export_name_without_no_zeroes_pads_124_zero_bytes(client):
    client.greet(client_flags=1)
    client.option(Opt.EXPORT_NAME, b"disk")
    assert client.recv_exact(10 + 124)[10:] == bytes(124)


def test_export_name_of_unknown_export_closes_the_connection(client):
    client.greet()
    client.option(Opt.EXPORT_NAME, b"nope")
    assert client.is_closed_by_server()


def test_empty_name_selects_the_default_export(client):
    client.greet()
    assert client.go("")[0] == SIZE


def test_starttls_without_tls_configured_is_unsupported(client):
    client.greet()
    client.option(Opt.STARTTLS)
    assert client.option_reply()[1] == Rep.ERR_UNSUP


def test_set_meta_context_requires_structured_replies(client):
    client.greet()
    q = b"base:allocation"
    client.option(Opt.SET_META_CONTEXT, struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, len(q)) + q)
    assert client.option_reply()[1] == Rep.ERR_INVALID


def test_list_meta_context_offers_base_allocation(client):
    client.greet()
    client.option(Opt.LIST_META_CONTEXT, struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0))
    replies = client.replies_until_final()
    assert replies[0][0] == Rep.META_CONTEXT and replies[0][1][4:] == b"base:allocation"


def test_handshake_timeout_closes_an_idle_client(provider):
    with _start(provider, handshake_timeout=0.3) as st:
        c = RawClient(st.port)
        c.greet()
        t0 = time.monotonic()
        assert c.is_closed_by_server()
        assert time.monotonic() - t0 < 4.0
        c.close()


def test_connections_beyond_the_limit_get_the_reason_on_every_option_then_abort(provider):
    with _start(provider, max_connections=1) as st:
        first = RawClient(st.port)
        first.greet()
        first.go()
        second = RawClient(st.port)
        second.greet()
        for opt in (Opt.LIST, Opt.STRUCTURED_REPLY, Opt.GO):  # what a client tries in turn
            second.option(opt, b"\0" * 6 if opt == Opt.GO else b"")
            got, rep, msg = second.option_reply()
            assert (got, rep) == (opt, Rep.ERR_POLICY) and b"too many connections (the limit is 1)" in msg
        second.option(Opt.ABORT)
        assert second.option_reply()[:2] == (Opt.ABORT, Rep.ACK)
        assert second.is_closed_by_server()
        first.close()
        second.close()
        # after the first leaves, a new client gets in
        assert _wait_until(lambda: st.server.connections == 0)
        third = RawClient(st.port)
        third.greet()
        assert third.go()[0] == SIZE
        third.close()


def _raw_from(port: int, source: str) -> RawClient:
    c = RawClient.__new__(RawClient)
    c.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    c._handle = 0
    return c


def test_per_address_limit_refuses_one_address_and_admits_another(provider):
    with _start(provider, max_connections=8, max_connections_per_address=2) as st:
        held = [RawClient(st.port) for _ in range(2)]
        for c in held:
            c.greet()
        assert _wait_until(lambda: st.server.admitted == 2)
        third = RawClient(st.port)
        third.greet()
        third.option(Opt.LIST)
        _, rep, msg = third.option_reply()
        assert rep == Rep.ERR_POLICY and b"from 127.0.0.1" in msg and b"2 per address" in msg
        other = _raw_from(st.port, "127.0.0.2")
        other.greet()
        assert other.go()[0] == SIZE  # another address is still served
        for c in (*held, third, other):
            c.close()


def test_refused_and_handshaking_sockets_cost_a_small_buffer_only(provider):
    from torus_core.nbd.stream import BUF_SIZE, HANDSHAKE_BUF_SIZE

    with _start(provider, max_connections=2) as st:
        socks = [RawClient(st.port) for _ in range(6)]
        for c in socks:
            c.greet()
        assert _wait_until(lambda: st.server.connections == 6)
        assert {s.buffer_size for s in st.server._streams} == {HANDSHAKE_BUF_SIZE}
        socks[0].go()  # a session gets the full receive buffer
        assert _wait_until(lambda: BUF_SIZE in {s.buffer_size for s in st.server._streams})
        for c in socks:
            c.close()
        assert _wait_until(lambda: st.server.connections == 0)


class _SlowOpen(MemoryExportProvider):
    def open_export(self, name: str) -> MemoryExport:
        time.sleep(1.0)  # e.g. waiting for the previous connection to this volume to close
        return super().open_export(name)


def test_handshake_timeout_does_not_count_the_servers_time_opening_the_export():
    slow = _SlowOpen()
    slow.add("disk", SIZE)
    with _start(slow, handshake_timeout=0.6) as st:
        c = RawClient(st.port)
        c.greet()
        assert c.go(structured=False)[0] == SIZE
        c.close()
        idle = RawClient(st.port)  # the client's own time is still bounded
        idle.greet()
        t0 = time.monotonic()
        assert idle.is_closed_by_server() and time.monotonic() - t0 < 3.0
        idle.close()


def test_an_idle_session_is_kept_while_no_one_needs_its_slot(provider):
    with _start(provider, idle_timeout=0.3) as st:
        idle = RawClient(st.port)
        idle.greet()
        idle.go(structured=False)
        time.sleep(1.0)  # three idle timeouts with no I/O: a kernel client or idle VM disk
        h = idle.request(Cmd.READ, 0, 512)
        assert idle.simple_reply(512)[:2] == (h, 0)
        idle.close()


def test_the_longest_idle_session_makes_room_for_a_newcomer_and_a_busy_one_is_kept(provider):
    with _start(provider, idle_timeout=0.5, max_connections=2) as st:
        idle, busy = RawClient(st.port), RawClient(st.port)
        for c in (idle, busy):
            c.greet()
            c.go(structured=False)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:  # busy keeps reading, idle says nothing
            h = busy.request(Cmd.READ, 0, 512)
            assert busy.simple_reply(512)[:2] == (h, 0)
            time.sleep(0.1)
        newcomer = RawClient(st.port)
        newcomer.greet()
        assert newcomer.go(structured=False)[0] == SIZE  # admitted, not refused
        assert idle.is_closed_by_server()
        for c in (busy, newcomer):
            h = c.request(Cmd.READ, 0, 512)
            assert c.simple_reply(512)[:2] == (h, 0)
            c.close()
        idle.close()


def test_clients_that_never_read_replies_are_bounded_and_others_are_still_served(provider):
    """Pipelined READs whose replies are never read: the bytes the server holds stay within its
    budget (plus one small request per connection), and a well-behaved client is served."""
    from torus_core.nbd.budget import RESERVE

    mib = 1 << 20
    big = MemoryExportProvider()
    big.add("disk", 64 * mib)
    limit = 8 * mib
    with _start(big, max_payload=mib, max_inflight_bytes=4 * mib, max_total_inflight_bytes=limit) as st:
        abusers = []
        for _ in range(6):
            c = RawClient(st.port)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            c.greet()
            c.go(structured=False)
            abusers.append(c)
        good = RawClient(st.port)
        good.greet()
        good.go(structured=False)
        for c in abusers:  # 64 MiB of reads each, replies never read
            c.sock.sendall(
                b"".join(
                    struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.READ, i, i * mib, mib) for i in range(64)
                )
            )
        time.sleep(1.0)
        for _ in range(20):
            t0 = time.monotonic()
            h = good.request(Cmd.READ, 0, 64 * 1024)
            assert good.simple_reply(64 * 1024)[:2] == (h, 0)
            assert time.monotonic() - t0 < 2.0
        budget = st.server.budget
        assert budget.peak <= limit + 7 * RESERVE, budget.peak
        for c in abusers:
            c.close()
        good.close()
        assert _wait_until(lambda: st.server.connections == 0)
        assert _wait_until(lambda: budget.used == 0), budget.used


def test_export_names_are_shortened_in_logs_and_repeated_lines_rate_limited(provider, caplog):
    with _start(provider) as st, caplog.at_level(logging.INFO, logger="torus_core.nbd"):
        for _ in range(60):
            c = RawClient(st.port)
            c.greet()
            c.option(Opt.EXPORT_NAME, b"x" * 60000)
            assert c.is_closed_by_server()
            c.close()
        time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if "EXPORT_NAME" in r.getMessage()]
    assert 1 <= len(lines) <= 25
    assert max(len(m) for m in lines) < 1000


# --- transmission -------------------------------------------------------------------------------


@pytest.fixture
def conn(client) -> RawClient:
    client.greet()
    client.go()
    return client


def test_write_then_read_round_trips(conn):
    data = bytes(range(256)) * 16
    h = conn.request(Cmd.WRITE, 8192, len(data), payload=data)
    assert conn.structured_reply() == (h, 0, None)
    h = conn.request(Cmd.READ, 8192, len(data))
    assert conn.structured_reply() == (h, 0, data)


def test_read_past_end_is_einval_and_the_connection_stays_usable(conn):
    h = conn.request(Cmd.READ, SIZE - 512, 1024)
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)
    h = conn.request(Cmd.READ, SIZE - 512, 512)
    assert conn.structured_reply() == (h, 0, bytes(512))


def test_write_past_end_is_enospc_and_its_payload_is_consumed(conn):
    h = conn.request(Cmd.WRITE, SIZE - 4, 8, payload=b"x" * 8)
    assert conn.structured_reply()[:2] == (h, Errno.ENOSPC)
    h = conn.request(Cmd.FLUSH)
    assert conn.structured_reply() == (h, 0, None)


def test_offset_plus_length_overflow_is_einval(conn):
    h = conn.request(Cmd.READ, 2**64 - 1, 4096)
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)
    h = conn.request(Cmd.TRIM, 2**64 - 4096, 8192)
    assert conn.structured_reply()[:2] == (h, Errno.ENOSPC)


def test_unknown_command_is_einval(conn):
    h = conn.request(42, 0, 0)
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)
    h = conn.request(Cmd.CACHE, 0, 4096)  # not advertised
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)


def test_unknown_or_inapplicable_flags_are_einval(conn):
    h = conn.request(Cmd.READ, 0, 512, flags=1 << 12)
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)
    h = conn.request(Cmd.READ, 0, 512, flags=CmdFlag.FUA)
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)
    h = conn.request(Cmd.READ, 0, 512, flags=CmdFlag.DF)  # DF is fine with structured replies
    assert conn.structured_reply() == (h, 0, bytes(512))


def test_oversized_write_payload_is_einval_and_discarded(conn):
    big = 64 * 1024 + 1  # server max_payload is 64 KiB
    h = conn.request(Cmd.WRITE, 0, big, payload=b"\xee" * big)
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)
    h = conn.request(Cmd.READ, 0, 16)
    assert conn.structured_reply() == (h, 0, bytes(16))  # nothing was written, stream in sync


def test_oversized_read_is_einval(conn):
    h = conn.request(Cmd.READ, 0, 64 * 1024 + 1)
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)


def test_bad_request_magic_drops_the_connection(conn):
    conn.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, Cmd.READ, 1, 0, 512))
    assert conn.is_closed_by_server()


def test_write_to_read_only_export_is_eperm(client):
    client.greet()
    _size, flags, _ = client.go("ro")
    assert flags & TransmissionFlag.READ_ONLY and not flags & TransmissionFlag.SEND_TRIM
    h = client.request(Cmd.WRITE, 0, 4, payload=b"abcd")
    assert client.structured_reply()[:2] == (h, Errno.EPERM)
    h = client.request(Cmd.TRIM, 0, 4096)
    assert client.structured_reply()[:2] == (h, Errno.EPERM)
    h = client.request(Cmd.READ, 0, 4)
    assert client.structured_reply() == (h, 0, bytes(4))


def test_block_status_reports_data_and_holes(conn):
    conn.request(Cmd.WRITE, 8192, 4096, payload=b"\x01" * 4096)
    conn.structured_reply()
    h = conn.request(Cmd.BLOCK_STATUS, 0, 65536)
    handle, err, extents = conn.structured_reply()
    assert (handle, err) == (h, 0)
    assert extents == [(8192, 3), (4096, 0), (65536 - 12288, 3)]
    h = conn.request(Cmd.BLOCK_STATUS, 0, 65536, flags=CmdFlag.REQ_ONE)
    assert conn.structured_reply() == (h, 0, [(8192, 3)])
    h = conn.request(Cmd.BLOCK_STATUS, SIZE - 4096, 8192)
    assert conn.structured_reply()[:2] == (h, Errno.EINVAL)


def test_trim_and_write_zeroes_punch_holes_unless_no_hole(conn):
    conn.request(Cmd.WRITE, 0, 65536, payload=b"\x07" * 65536)
    conn.structured_reply()
    conn.request(Cmd.TRIM, 0, 16384)
    conn.structured_reply()
    conn.request(Cmd.WRITE_ZEROES, 16384, 16384, flags=CmdFlag.NO_HOLE)
    conn.structured_reply()
    conn.request(Cmd.WRITE_ZEROES, 32768, 16384, flags=CmdFlag.FUA)
    conn.structured_reply()
    h = conn.request(Cmd.BLOCK_STATUS, 0, 65536)
    assert conn.structured_reply() == (h, 0, [(16384, 3), (16384, 0), (16384, 3), (16384, 0)])
    h = conn.request(Cmd.READ, 0, 65536)
    assert conn.structured_reply()[2] == bytes(49152) + b"\x07" * 16384


def test_simple_replies_without_structured_negotiation(client):
    client.greet()
    _, flags, _ = client.go(structured=False)
    assert not flags & TransmissionFlag.SEND_DF
    h = client.request(Cmd.WRITE, 0, 3, payload=b"abc")
    assert client.simple_reply() == (h, 0, b"")
    h = client.request(Cmd.READ, 0, 3)
    assert client.simple_reply(3) == (h, 0, b"abc")
    h = client.request(Cmd.BLOCK_STATUS, 0, 4096)  # no meta context negotiated
    assert client.simple_reply() == (h, Errno.EINVAL, b"")
    h = client.request(Cmd.READ, SIZE, 1)
    assert client.simple_reply(1) == (h, Errno.EINVAL, b"")  # error: no payload follows
    h = client.request(Cmd.FLUSH)
    assert client.simple_reply() == (h, 0, b"")


def test_disc_closes_after_outstanding_requests_and_releases_the_export(conn, provider):
    data = b"z" * 4096
    handles = [conn.request(Cmd.WRITE, i * 4096, 4096, payload=data) for i in range(8)]
    conn.request(Cmd.DISC)
    got = [conn.structured_reply()[:2] for _ in handles]
    assert sorted(got) == [(h, 0) for h in handles]
    assert conn.is_closed_by_server()
    assert _wait_until(lambda: provider.open_count("disk") == 0)


def test_abrupt_disconnect_closes_the_export(server, provider):
    c = RawClient(server.port)
    c.greet()
    c.go()
    assert provider.open_count("disk") == 1
    c.request(Cmd.WRITE, 0, 4096, payload=b"q" * 4096)
    c.sock.close()
    assert _wait_until(lambda: provider.open_count("disk") == 0)


# --- blocking exports: out-of-order replies and failure propagation -----------------------------


class GatedExport(MemoryExport):
    """Reads at offset 0 wait for a gate; flush/FUA can be made to fail."""

    def __init__(self, store: MemoryStore, gate: threading.Event) -> None:
        super().__init__("disk", store, blocking=True)
        self.gate = gate
        self.fail_flush = False

    def read(self, offset: int, length: int) -> memoryview:
        if offset == 0:
            assert self.gate.wait(5.0)
        return super().read(offset, length)

    def write(self, offset, data, fua: bool) -> None:
        super().write(offset, data, fua)
        if fua and self.fail_flush:
            raise BlockUnavailable("replica did not acknowledge")

    def flush(self) -> None:
        if self.fail_flush:
            raise BlockUnavailable("replica did not acknowledge")

    def extents(self, offset: int, length: int):
        if offset == 4096:
            raise InvalidArgument("bad extents query")
        return super().extents(offset, length)


class GatedProvider(MemoryExportProvider):
    def __init__(self) -> None:
        super().__init__()
        self.store = self.add("disk", SIZE)
        self.gate = threading.Event()
        self.exports: list[GatedExport] = []

    def open_export(self, name: str) -> GatedExport:
        super().open_export(name)
        e = GatedExport(self.store, self.gate)
        self.exports.append(e)
        return e


@pytest.fixture
def gated() -> Iterator[tuple[GatedProvider, RawClient]]:
    p = GatedProvider()
    st = _start(p)
    c = RawClient(st.port)
    c.greet()
    c.go()
    yield p, c
    p.gate.set()
    c.close()
    st.stop()


def test_replies_come_back_out_of_order(gated):
    p, c = gated
    slow = c.request(Cmd.READ, 0, 4096)
    fast = [c.request(Cmd.READ, 4096 * i, 4096) for i in range(1, 5)]
    first = [c.structured_reply()[0] for _ in fast]
    assert sorted(first) == fast  # all fast reads overtook the blocked one
    p.gate.set()
    assert c.structured_reply()[:2] == (slow, 0)


def test_failed_flush_is_an_error_reply_never_success(gated):
    p, c = gated
    p.exports[0].fail_flush = True
    h = c.request(Cmd.FLUSH)
    assert c.structured_reply()[:2] == (h, Errno.EIO)
    h = c.request(Cmd.WRITE, 4096, 4, flags=CmdFlag.FUA, payload=b"abcd")
    assert c.structured_reply()[:2] == (h, Errno.EIO)
    h = c.request(Cmd.TRIM, 4096, 4096, flags=CmdFlag.FUA)
    assert c.structured_reply()[:2] == (h, Errno.EIO)
    p.exports[0].fail_flush = False
    h = c.request(Cmd.FLUSH)
    assert c.structured_reply()[:2] == (h, 0)


def test_export_errors_map_to_nbd_errors_with_a_message(gated):
    _, c = gated
    h = c.request(Cmd.BLOCK_STATUS, 4096, 4096)
    handle, err, msg = c.structured_reply()
    assert (handle, err) == (h, Errno.EINVAL) and b"bad extents query" in msg


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    d: Path = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1",
         "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(d / "cert.pem")
    return server_ctx, client_ctx


def test_tls_required_refuses_options_until_starttls_then_serves_over_tls(provider, tls_contexts):
    server_ctx, client_ctx = tls_contexts
    with _start(provider, tls=server_ctx, tls_required=True) as st:
        c = RawClient(st.port)
        c.greet()
        c.option(Opt.LIST)
        assert c.option_reply()[1] == Rep.ERR_TLS_REQD
        c.option(Opt.STARTTLS)
        assert c.option_reply()[1] == Rep.ACK
        c.sock = client_ctx.wrap_socket(c.sock, server_hostname="localhost")
        c.option(Opt.STARTTLS)
        assert c.option_reply()[1] == Rep.ERR_INVALID  # already active
        assert c.go()[0] == SIZE
        h = c.request(Cmd.WRITE, 0, 5, payload=b"hello")
        assert c.structured_reply() == (h, 0, None)
        h = c.request(Cmd.READ, 0, 5)
        assert c.structured_reply() == (h, 0, b"hello")
        c.close()


def test_tls_required_closes_export_name_without_tls(provider, tls_contexts):
    with _start(provider, tls=tls_contexts[0], tls_required=True) as st:
        c = RawClient(st.port)
        c.greet()
        c.option(Opt.EXPORT_NAME, b"disk")
        assert c.is_closed_by_server()
        c.close()


class CountingExport(GatedExport):
    """Counts how many reads run at once."""

    def __init__(self, store: MemoryStore, gate: threading.Event) -> None:
        super().__init__(store, gate)
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def read(self, offset: int, length: int) -> memoryview:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return super().read(offset, length)
        finally:
            with self.lock:
                self.running -= 1


def test_in_flight_requests_per_connection_are_bounded():
    p = GatedProvider()
    exports: list[CountingExport] = []

    def open_export(name: str) -> CountingExport:
        MemoryExportProvider.open_export(p, name)
        e = CountingExport(p.store, p.gate)
        exports.append(e)
        return e

    p.open_export = open_export  # type: ignore[method-assign]
    with _start(p, max_inflight=2, workers=8) as st:
        c = RawClient(st.port)
        c.greet()
        c.go()
        handles = [c.request(Cmd.READ, 0, 512) for _ in range(6)]
        time.sleep(0.3)  # give a server without the bound time to start all six
        assert exports[0].peak == 2
        p.gate.set()
        assert sorted(c.structured_reply()[0] for _ in handles) == handles
        assert exports[0].peak == 2
        c.close()


class _MetadataDown(MemoryExportProvider):
    def open_export(self, name: str) -> MemoryExport:
        raise MetadataUnavailable("etcd at 127.0.0.1:2379 does not answer")

    def describe(self, name: str):
        raise MetadataUnavailable("etcd at 127.0.0.1:2379 does not answer")


def test_an_export_that_cannot_be_opened_during_a_metadata_outage_is_refused_with_the_reason():
    down = _MetadataDown()
    down.add("disk", SIZE)
    with _start(down) as st:
        c = RawClient(st.port)
        c.greet()
        raw = b"disk"
        c.option(Opt.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        got, rep, msg = c.option_reply()
        assert (got, rep) == (Opt.GO, Rep.ERR_POLICY)  # not ERR_UNKNOWN: "no export named"
        assert b"not available now" in msg and b"does not answer" in msg
        c.close()
