"""Peers authenticate each other: the cluster key on gRPC and on the journal channel.

In-process servers over real sockets (gRPC and the journal channel on 127.0.0.1), real TLS
certificates from the openssl CLI, and an in-process cluster on a real SQLite metadata log for
the replica guard. Each probe fails with a typed error and changes nothing.
"""

from __future__ import annotations

import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from torus_core.errors import (
    InvalidArgument,
    PeerBusy,
    PeerUnavailable,
    ReplicaRefused,
    StaleEpoch,
    Unauthenticated,
)
from torus_core.journal.channel import (
    UNAUTHENTICATED,
    JournalChannelClient,
    JournalChannelServer,
)
from torus_core.journal.record import Extent, encode_record
from torus_core.journal.store import JournalStore
from torus_core.refs import BlockRef
from torus_core.rpc import PeerClient, PeerServer, RPCTimeouts
from torus_core.rpc import torus_storage_pb2 as pb
from torus_core.rpc.auth import (
    AUTH_METADATA_KEY,
    CallLimits,
    ClusterKey,
    PeerAuth,
    TokenVerifier,
    call_token,
)
from torus_core.testing.distributor import mem_store_factory
from torus_core.testing.rpc import TestPKI, make_test_pki

BS = 1024
VOL = 7
FAST = RPCTimeouts(get=2.0, put=2.0, check=2.0, ping=2.0, journal=2.0, stream=10.0)
KEY = ClusterKey.generate()
MEMBER = PeerAuth(KEY, "member")
STRANGER = PeerAuth(ClusterKey.generate(), "stranger")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def rec(seq: int, epoch: int = 1, vol: int = VOL, size: int = 4096) -> bytes:
    return encode_record(vol, epoch, seq, [Extent(seq * 4096, size, bytes([seq % 256]) * size)])


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[JournalStore]:
    j = JournalStore(tmp_path / "journal")
    yield j
    j.close()


@pytest.fixture
def server(journal: JournalStore) -> Iterator[PeerServer]:
    store = mem_store_factory()(BS, 64)
    srv = PeerServer(
        store, uuid="peer", journal=journal, auth=KEY, limits=CallLimits(streams=2, stream_idle=1.0)
    ).start()
    yield srv
    srv.stop(grace=0)
    store.close()


# --- tokens -----------------------------------------------------------------------------------


def test_a_token_is_accepted_once_for_its_method_within_the_skew_only() -> None:
    now = [1_000_000.0]
    v = TokenVerifier(KEY, max_skew=60.0, clock=lambda: now[0])
    m = "/torus.rpc.v1.TorusStorage/GetBlock"
    tok = call_token(MEMBER, m, now=now[0])
    assert v.verify(m, tok) == "member"
    with pytest.raises(Unauthenticated, match="replayed"):
        v.verify(m, tok)
    with pytest.raises(Unauthenticated, match="wrong"):
        v.verify("/torus.rpc.v1.TorusStorage/JournalTrim", call_token(MEMBER, m, now=now[0]))
    with pytest.raises(Unauthenticated, match="wrong"):
        v.verify(m, call_token(STRANGER, m, now=now[0]))
    with pytest.raises(Unauthenticated, match="more than"):
        v.verify(m, call_token(MEMBER, m, now=now[0] - 61))
    for bad in (None, "", "v1.member", "v2.a.1.2.3", tok.replace(".", "!")):
        with pytest.raises(Unauthenticated):
            v.verify(m, bad)
    # a remembered nonce is forgotten once its token could no longer pass the skew check anyway
    now[0] += 1000
    assert v.verify(m, call_token(MEMBER, m, now=now[0])) == "member"
    assert len(v._seen) == 1
    assert KEY.to_text() not in repr(KEY)


# --- gRPC -------------------------------------------------------------------------------------


def test_grpc_serves_members_only_and_a_refused_call_changes_nothing(server: PeerServer) -> None:
    member = PeerClient(server.address, timeouts=FAST, auth=MEMBER)
    anonymous = PeerClient(server.address, timeouts=FAST)
    stranger = PeerClient(server.address, timeouts=FAST, auth=STRANGER)
    try:
        ref = BlockRef(VOL, 2, 1)
        member.put_blocks([ref], [b"secret"])
        member.journal_fence(VOL, 1)
        member.journal_append(VOL, 1, [rec(1)])
        for c in (anonymous, stranger):
            with pytest.raises(Unauthenticated):
                c.get_block(ref)
            with pytest.raises(Unauthenticated):
                c.journal_read(VOL, 0)
            with pytest.raises(Unauthenticated):
                c.journal_append(VOL, 1, [rec(2)])
            with pytest.raises(Unauthenticated):
                c.journal_trim(VOL, 1, 1)
            with pytest.raises(Unauthenticated):
                c.journal_fence(VOL, (1 << 64) - 1)
            with pytest.raises(Unauthenticated):
                c.put_blocks([BlockRef(VOL, 99, 1)], [b"future"])
            with pytest.raises(Unauthenticated):
                c.put_block_stream([(BlockRef(VOL, 99, 2), b"future")])
            with pytest.raises(Unauthenticated):
                c.ping()
        assert member.get_block(ref).startswith(b"secret")
        assert member.rebalance_check([BlockRef(VOL, 99, 1), BlockRef(VOL, 99, 2)]) == [False, False]
        assert len(member.journal_read(VOL, 0)) == 1
        assert member.journal_fence(VOL, 1) == 1  # still epoch 1: the refused fence did nothing
        assert server.interceptor.refused["unauthenticated"] == 16
    finally:
        for c in (member, anonymous, stranger):
            c.close()


def _idle_stream(channel: grpc.Channel, release: threading.Event, metadata: list[tuple[str, str]]) -> object:
    def requests() -> Iterator[pb.PutBlocksRequest]:
        release.wait(30.0)
        return
        yield  # a generator that sends nothing until released

    call = channel.stream_unary(
        "/torus.rpc.v1.TorusStorage/PutBlockStream",
        request_serializer=pb.PutBlocksRequest.SerializeToString,
        response_deserializer=pb.PutBlocksResponse.FromString,
    )
    return call.future(requests(), timeout=20.0, metadata=metadata)


def test_idle_streams_do_not_stall_a_peer(server: PeerServer) -> None:
    """24 idle streaming calls: refused at once without the key; a member gets 2 (its limit),
    the rest PeerBusy, and the 2 are cancelled after 1 s without a message. Other callers are
    served throughout."""
    release = threading.Event()
    channel = grpc.insecure_channel(server.address)
    other = PeerClient(server.address, timeouts=FAST, auth=PeerAuth(KEY, "other"))
    futures: list[object] = []
    try:
        t0 = time.monotonic()
        anonymous = [_idle_stream(channel, release, []) for _ in range(24)]
        futures += anonymous
        for f in anonymous:
            err = f.exception(timeout=5.0)  # type: ignore[attr-defined]
            assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - t0 < 5.0
        member = [
            _idle_stream(
                channel,
                release,
                [(AUTH_METADATA_KEY, call_token(MEMBER, "/torus.rpc.v1.TorusStorage/PutBlockStream"))],
            )
            for _ in range(24)
        ]
        futures += member
        busy = 0
        for f in member:
            try:
                err = f.exception(timeout=0.3)  # type: ignore[attr-defined]
            except grpc.FutureTimeoutError:
                continue  # accepted and idle
            assert err is not None
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            busy += 1
        assert busy == 22
        t1 = time.monotonic()
        assert other.ping().uuid == "peer"
        assert time.monotonic() - t1 < 1.0
        # the two idle ones are cancelled by the server's watchdog
        deadline = time.monotonic() + 5.0
        while server.interceptor.in_flight("member") != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.interceptor.in_flight("member") == (0, 0)
    finally:
        release.set()
        for f in futures:
            f.cancel()  # type: ignore[attr-defined]
        other.close()
        channel.close()


def test_a_stream_whose_client_stops_reading_is_cancelled(server: PeerServer) -> None:
    """A JournalRead whose client never takes the messages would hold a handler thread in flow
    control until the client's deadline; the server cancels it after ``stream_idle`` (1 s)."""
    member = PeerClient(server.address, timeouts=FAST, auth=MEMBER)
    channel = grpc.insecure_channel(server.address)
    try:
        member.journal_fence(VOL, 1)
        big = 4 << 20
        for seq in range(1, 9):  # 32 MiB of records: more than the connection's flow-control window
            member.journal_append(VOL, 1, [rec(seq, size=big)])
        read = channel.unary_stream(
            "/torus.rpc.v1.TorusStorage/JournalRead",
            request_serializer=pb.JournalReadRequest.SerializeToString,
            response_deserializer=pb.JournalReadResponse.FromString,
        )
        token = call_token(MEMBER, "/torus.rpc.v1.TorusStorage/JournalRead")
        stalled = read(
            pb.JournalReadRequest(volume_id=VOL), timeout=60.0, metadata=[(AUTH_METADATA_KEY, token)]
        )
        deadline = time.monotonic() + 3.0
        while server.interceptor.in_flight("member") == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.interceptor.in_flight("member") == (1, 1)  # started, and now stuck
        deadline = time.monotonic() + 10.0
        while server.interceptor.in_flight("member") != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.interceptor.in_flight("member") == (0, 0)
        stalled.cancel()
        assert len(member.journal_read(VOL, 0, timeout=10.0)) == 8  # the journal is intact
    finally:
        member.close()
        channel.close()


def test_per_caller_call_limit_answers_peer_busy(journal: JournalStore) -> None:
    store = mem_store_factory()(BS, 64)
    srv = PeerServer(store, journal=journal, auth=KEY, limits=CallLimits(calls=1)).start()
    release = threading.Event()
    channel = grpc.insecure_channel(srv.address)
    member = PeerClient(srv.address, timeouts=FAST, auth=MEMBER)
    try:
        hold = _idle_stream(
            channel,
            release,
            [(AUTH_METADATA_KEY, call_token(MEMBER, "/torus.rpc.v1.TorusStorage/PutBlockStream"))],
        )
        deadline = time.monotonic() + 5.0
        while srv.interceptor.in_flight("member")[0] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(PeerBusy):
            member.ping()
        release.set()
        assert hold.result(timeout=5.0).written == 0  # type: ignore[attr-defined]
        assert member.ping() is not None
    finally:
        release.set()
        member.close()
        channel.close()
        srv.stop(grace=0)
        store.close()


# --- journal channel -------------------------------------------------------------------------


def test_journal_channel_serves_members_only(journal: JournalStore) -> None:
    with JournalChannelServer(journal, auth=KEY) as srv:
        member = JournalChannelClient(srv.address, timeout=2.0, auth=MEMBER)
        anonymous = JournalChannelClient(srv.address, timeout=2.0)
        stranger = JournalChannelClient(srv.address, timeout=2.0, auth=STRANGER)
        try:
            member.fence(VOL, 1)
            member.append(VOL, 1, [rec(1)])
            for c in (anonymous, stranger):
                with pytest.raises(Unauthenticated):
                    c.append(VOL, 1, [rec(2)])
                with pytest.raises(Unauthenticated):
                    c.trim(VOL, 1, 1)
                with pytest.raises(Unauthenticated):
                    c.fence(VOL, (1 << 64) - 1)
            assert [r.seq for r in journal.read(VOL)] == [1]
            assert member.fence(VOL, 1) == 1
        finally:
            for c in (member, anonymous, stranger):
                c.close()


def test_journal_channel_reads_no_big_frame_before_auth(journal: JournalStore) -> None:
    """A 64 MiB APPEND from a stranger is refused after its 5-byte header: nothing is read."""
    with JournalChannelServer(journal, auth=KEY) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5.0) as s:
            head = s.recv(5)
            length, status = struct.unpack("<IB", head)
            assert status == 6 and length == 33  # HELLO + challenge
            s.recv(length - 1)
            s.sendall(struct.pack("<IB", 64 << 20, 1))
            buf = b""
            while len(buf) < 5:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            # refused before a byte of the announced 64 MiB was sent
            assert struct.unpack("<IB", buf[:5])[1] == UNAUTHENTICATED
    assert list(journal.root.iterdir()) == []


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_journal_channel_times_out_idle_and_stalled_connections(journal: JournalStore) -> None:
    with JournalChannelServer(journal, idle_timeout=0.5, frame_timeout=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5.0) as idle:
            assert _closed_within(idle, 3.0)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5.0) as stalled:
            stalled.sendall(struct.pack("<IB", 100, 2) + b"x" * 10)  # 10 of 99 payload bytes
            assert _closed_within(stalled, 3.0)
    with JournalChannelServer(journal, auth=KEY) as srv:  # and the AUTH step has its timeout
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5.0) as silent:
            silent.settimeout(15.0)
            assert silent.recv(64)  # the challenge
            assert _closed_within(silent, 15.0)


def test_journal_channel_validates_volume_ids(journal: JournalStore) -> None:
    """``FENCE vol 2^64-1`` used to create a directory for it; now INVALID, nothing created."""
    with JournalChannelServer(journal) as srv:
        c = JournalChannelClient(srv.address, timeout=2.0)
        try:
            for vol in ((1 << 64) - 1, 0, 1 << 40):
                with pytest.raises(InvalidArgument, match="volume id"):
                    c.fence(vol, 1)
                with pytest.raises(InvalidArgument, match="volume id"):
                    c.trim(vol, 1, 1)
            assert c.fence(VOL, 1) == 0  # the connection is still usable
        finally:
            c.close()
    assert [p.name for p in journal.root.iterdir()] == [str(VOL)]


# --- TLS: a certificate is not a peer credential ---------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@needs_openssl
def test_a_ca_signed_certificate_alone_is_no_peer_credential(pki: TestPKI, journal: JournalStore) -> None:
    store = mem_store_factory()(BS, 16)
    srv = PeerServer(store, tls=pki.server_tls(), auth=KEY, journal=journal).start()
    try:
        certified = PeerClient(srv.address, tls=pki.client_tls(), timeouts=FAST)
        member = PeerClient(srv.address, tls=pki.client_tls(), timeouts=FAST, auth=MEMBER)
        try:
            with pytest.raises(Unauthenticated):
                certified.put_blocks([BlockRef(1, 1, 1)], [b"x"])
            assert member.rebalance_check([BlockRef(1, 1, 1)]) == [False]
        finally:
            certified.close()
            member.close()
    finally:
        srv.stop(grace=0)
        store.close()
    with JournalChannelServer(journal, tls=pki.server_tls(), auth=KEY) as chan:
        certified_chan = JournalChannelClient(chan.address, tls=pki.client_tls(), timeout=2.0)
        member_chan = JournalChannelClient(chan.address, tls=pki.client_tls(), timeout=2.0, auth=MEMBER)
        try:
            with pytest.raises(Unauthenticated):
                certified_chan.fence(VOL, 1)
            assert member_chan.fence(VOL, 1) == 0
        finally:
            certified_chan.close()
            member_chan.close()


# --- the replica guard (metadata log) --------------------------------------------------------


def test_replicas_refuse_what_no_honest_writer_sends(tmp_path: Path) -> None:
    from torus_sqlite.backend import SQLiteBackend

    from torus_core.journal.channel import JournalChannelClient as Chan
    from torus_core.testing.cluster import InProcessCluster, wait_until, writable_volume

    url = f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"
    jstore = JournalStore(tmp_path / "a" / "journal")
    try:
        with InProcessCluster(lambda: SQLiteBackend.from_url(url), block_size=4096, replication=1) as c:
            node = c.add_node("a", journal=jstore)
            assert wait_until(lambda: node.journal_address != "", 5.0)
            lock = writable_volume(c.md, VOL)
            assert lock.epoch == 1
            client = PeerClient(node.address, timeouts=FAST, auth=node.auth)
            chan = Chan(node.journal_address, timeout=2.0, auth=node.auth)
            try:
                for fence in (client.journal_fence, chan.fence):
                    with pytest.raises(ReplicaRefused, match="epoch"):
                        fence(VOL, (1 << 64) - 1)  # not the lock's epoch
                    with pytest.raises(ReplicaRefused, match="does not exist"):
                        fence(VOL + 1, 1)  # no such volume
                    with pytest.raises(StaleEpoch):
                        fence(VOL, 0)
                    assert fence(VOL, 1) == 0
                for append in (client.journal_append, chan.append):
                    with pytest.raises(ReplicaRefused, match="does not exist"):
                        append(VOL + 1, 1, [rec(1, vol=VOL + 1)])
                assert node.guard is not None
                node.guard.max_record_bytes = 8192
                for append in (client.journal_append, chan.append):
                    with pytest.raises(ReplicaRefused, match="exceeds"):
                        append(VOL, 1, [rec(1, size=16384)])
                for trim in (client.journal_trim, chan.trim):
                    with pytest.raises(ReplicaRefused, match="does not exist"):
                        trim(VOL + 1, 1, 5)
                    with pytest.raises(ReplicaRefused, match="checkpoint covers sequence numbers up to 0"):
                        trim(VOL, 1, 5)  # the volume was never checkpointed
                    assert trim(VOL, 1, 0) == 0
                with pytest.raises(ReplicaRefused, match="does not exist"):
                    client.put_blocks([BlockRef(VOL + 1, 2, 1)], [b"x"])
                assert jstore.read(VOL) == []
                assert not (tmp_path / "a" / "journal" / str(VOL + 1)).exists()
                assert client.rebalance_check([BlockRef(VOL + 1, 2, 1)]) == [False]
                client.put_blocks([BlockRef(VOL, 2, 1)], [b"x"])  # a real volume's block is taken
                client.journal_append(VOL, 1, [rec(1)])
                assert [r.seq for r in jstore.read(VOL)] == [1]
            finally:
                client.close()
                chan.close()
    finally:
        jstore.close()


def test_peers_refuse_callers_without_the_cluster_key_on_both_transports(tmp_path: Path) -> None:
    from torus_sqlite.backend import SQLiteBackend

    from torus_core.testing.cluster import InProcessCluster, wait_until

    url = f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"
    jstore = JournalStore(tmp_path / "a" / "journal")
    try:
        with InProcessCluster(lambda: SQLiteBackend.from_url(url), block_size=4096, replication=1) as c:
            node = c.add_node("a", journal=jstore)
            assert wait_until(lambda: node.journal_address != "", 5.0)
            assert node.auth.key == ClusterKey(c.md.cluster_key())  # from the metadata backend
            rpc = PeerClient(node.address, timeouts=FAST)
            chan = JournalChannelClient(node.journal_address, timeout=2.0)
            try:
                with pytest.raises(Unauthenticated):
                    rpc.ping()
                with pytest.raises(Unauthenticated):
                    chan.fence(VOL, 1)
            finally:
                rpc.close()
                chan.close()
    finally:
        jstore.close()


def test_metadata_creates_one_cluster_key_at_format(tmp_path: Path) -> None:
    from torus_sqlite.backend import SQLiteBackend

    from torus_core.metadata import CLUSTER_KEY, MetadataService
    from torus_core.ring.builtin import builtin_ring_types

    url = f"sqlite:///{tmp_path}/meta.db"
    md = MetadataService(SQLiteBackend.from_url(url), ring_types=builtin_ring_types())
    try:
        assert md.leases.get(CLUSTER_KEY) is None
        md.format(4096)
        key = md.cluster_key()
        assert len(key) == 32 and md.cluster_key() == key
        assert all(key.hex().encode() not in e.state for e in md.backend.log.read_all())
    finally:
        md.close()


def test_an_unavailable_peer_error_is_what_unauthenticated_is() -> None:
    assert issubclass(Unauthenticated, PeerUnavailable) and issubclass(PeerBusy, PeerUnavailable)
