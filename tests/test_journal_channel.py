"""The journal channel (torus_core.journal.channel): framed appends to a real JournalStore.

Servers and clients on 127.0.0.1; every wait is bounded by a client timeout.
"""

from __future__ import annotations

import shutil
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest

from torus_core.cluster.node import ClusterOptions
from torus_core.errors import ConfigError, InvalidArgument, PeerUnavailable, StaleEpoch
from torus_core.journal.channel import (
    INVALID,
    MAX_FRAME,
    OK,
    OP_APPEND,
    ChannelRefused,
    JournalChannelClient,
    JournalChannelServer,
    encode_append,
)
from torus_core.journal.record import Extent, encode_record
from torus_core.journal.remote import journal_ref
from torus_core.journal.store import JournalStore
from torus_core.testing.journal import JournalCluster
from torus_core.testing.rpc import TestPKI, make_test_pki

#: the built-in blockset layers (tests use no plugin layers)

VOL = 7
PEERS = ["peer-a", "peer-b", "peer-c"]
_HEAD = struct.Struct("<IB")


def rec(seq: int, epoch: int = 1, vol: int = VOL) -> bytes:
    return encode_record(vol, epoch, seq, [Extent(seq * 4096, 4096, bytes([seq % 256]) * 4096)])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JournalStore]:
    s = JournalStore(tmp_path / "journal")
    yield s
    s.close()


@pytest.fixture
def server(store: JournalStore) -> Iterator[JournalChannelServer]:
    with JournalChannelServer(store) as srv:
        yield srv


@pytest.fixture
def client(server: JournalChannelServer) -> Iterator[JournalChannelClient]:
    c = JournalChannelClient(server.address, timeout=2.0)
    yield c
    c.close()


def raw_reply(sock: socket.socket) -> tuple[int, bytes]:
    """One reply frame read off a raw socket (b"" status -1 if the server closed)."""
    head = b""
    while len(head) < _HEAD.size:
        chunk = sock.recv(_HEAD.size - len(head))
        if not chunk:
            return -1, b""
        head += chunk
    length, status = _HEAD.unpack(head)
    body = b""
    while len(body) < length - 1:
        chunk = sock.recv(length - 1 - len(body))
        assert chunk
        body += chunk
    return status, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_appended_records_are_durable_and_read_back_from_a_fresh_store(
    client: JournalChannelClient, store: JournalStore, tmp_path: Path
) -> None:
    assert client.fence(VOL, 1) == 0
    client.append(VOL, 1, [rec(1), rec(2)])
    client.append(VOL, 1, [rec(3)])
    assert [r.seq for r in store.read(VOL)] == [1, 2, 3]
    fresh = JournalStore(tmp_path / "journal")  # as after a restart: only what is on disk
    try:
        records = fresh.read(VOL)
        assert [r.seq for r in records] == [1, 2, 3]
        assert records[1].extents[0].data == bytes([2]) * 4096
    finally:
        fresh.close()
    assert client.fence(VOL, 1) == 3


def test_trim_over_the_channel_drops_covered_segments(
    client: JournalChannelClient, store: JournalStore
) -> None:
    client.fence(VOL, 1)
    client.append(VOL, 1, [rec(1), rec(2)])
    assert client.trim(VOL, 1, 2) == 1
    assert store.read(VOL) == []


def test_stale_epoch_crosses_the_channel_as_its_own_type_and_nothing_is_appended(
    client: JournalChannelClient, store: JournalStore
) -> None:
    client.fence(VOL, 1)
    client.append(VOL, 1, [rec(1, epoch=1)])
    client.fence(VOL, 2)
    with pytest.raises(StaleEpoch):
        client.append(VOL, 1, [rec(2, epoch=1)])
    with pytest.raises(StaleEpoch):
        client.fence(VOL, 1)
    with pytest.raises(StaleEpoch):
        client.trim(VOL, 1, 1)
    assert [r.seq for r in store.read(VOL)] == [1]
    client.append(VOL, 2, [rec(2, epoch=2)])  # the connection is still usable
    assert [r.seq for r in store.read(VOL)] == [1, 2]


def test_refused_records_cross_as_invalid_argument_and_the_connection_keeps_serving(
    client: JournalChannelClient, store: JournalStore, server: JournalChannelServer
) -> None:
    with pytest.raises(InvalidArgument):
        client.append(VOL, 1, [b"not a record"])
    with pytest.raises(InvalidArgument):
        client.append(VOL, 1, [rec(1, vol=VOL + 1)])  # a record of another volume
    with pytest.raises(InvalidArgument):
        client.append(VOL, 1, [rec(2), rec(1)])  # sequence numbers must increase
    with pytest.raises(InvalidArgument):
        client.fence(0, 1)  # no volume 0
    client.append(VOL, 1, [rec(1)])
    assert [r.seq for r in store.read(VOL)] == [1]
    assert server.answered[INVALID] == 4


@pytest.mark.parametrize(
    "frame",
    [
        _HEAD.pack(MAX_FRAME + 1, OP_APPEND),  # oversized: refused before reading the payload
        _HEAD.pack(0, OP_APPEND),  # no room for the op
        _HEAD.pack(1 + 4, 99) + b"abcd",  # unknown op
        _HEAD.pack(1 + 20, OP_APPEND) + struct.pack("<QQI", VOL, 1, 1000),  # 1000 records in 0 bytes
        _HEAD.pack(1 + 24, OP_APPEND) + struct.pack("<QQII", VOL, 1, 1, 4096),  # record past the end
        _HEAD.pack(1 + 8, 2) + b"short!!!",  # FENCE of 8 bytes
    ],
    ids=["oversized", "zero-length", "unknown-op", "too-many-records", "record-past-end", "short-fence"],
)
def test_malformed_frames_get_invalid_and_are_disconnected_without_killing_the_server(
    server: JournalChannelServer, client: JournalChannelClient, store: JournalStore, frame: bytes
) -> None:
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2.0) as sock:
        sock.sendall(frame)
        status, message = raw_reply(sock)
        assert status == INVALID and message
        assert closed_by_server(sock)
    client.fence(VOL, 1)  # the server still serves new connections
    client.append(VOL, 1, [rec(1)])
    assert [r.seq for r in store.read(VOL)] == [1]


def test_pipelined_requests_are_answered_in_order(server: JournalChannelServer, store: JournalStore) -> None:
    store.fence(VOL, 1)
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2.0) as sock:
        sock.sendall(encode_append(VOL, 1, [rec(1)]) + encode_append(VOL, 2, [rec(2, epoch=2)]))
        sock.sendall(encode_append(VOL, 1, [rec(3)]))  # epoch 2 was seen by then: stale
        assert [raw_reply(sock)[0] for _ in range(3)] == [OK, OK, 1]
    assert [(r.seq, r.epoch) for r in store.read(VOL)] == [(1, 1), (2, 2)]


def test_a_dead_server_raises_peer_unavailable_quickly(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    c = JournalChannelClient(f"127.0.0.1:{port}", timeout=2.0)
    started = time.monotonic()
    with pytest.raises(ChannelRefused):
        c.append(VOL, 1, [rec(1)])
    assert time.monotonic() - started < 2.0


def test_a_server_that_never_answers_raises_peer_unavailable_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        c = JournalChannelClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(PeerUnavailable) as info:
            c.append(VOL, 1, [rec(1)])
        assert not isinstance(info.value, ChannelRefused)
        assert time.monotonic() - started < 2.0
        c.close()


def test_a_stopped_server_fails_the_next_call_and_a_restarted_one_is_redialled(store: JournalStore) -> None:
    srv = JournalChannelServer(store).start()
    port = srv.port
    c = JournalChannelClient(srv.address, timeout=2.0)
    try:
        c.fence(VOL, 1)
        c.append(VOL, 1, [rec(1)])
        srv.stop()
        with pytest.raises(PeerUnavailable):
            c.append(VOL, 1, [rec(2)])
        srv = JournalChannelServer(store, port=port).start()
        c.append(VOL, 1, [rec(2)])  # a fresh connection to the restarted server
        assert [r.seq for r in store.read(VOL)] == [1, 2]
    finally:
        c.close()
        srv.stop()


def test_plaintext_on_a_non_loopback_address_is_refused(store: JournalStore) -> None:
    with pytest.raises(ConfigError):
        JournalChannelServer(store, host="192.0.2.1")
    with pytest.raises(ConfigError):
        JournalChannelClient("192.0.2.1:7000")


# --- RemoteJournalReplicas over channels ---------------------------------------------------------


def scenario(cluster: JournalCluster) -> dict[str, object]:
    """Appends, a stale writer, a read and a trim through RemoteJournalReplicas; what it saw."""
    owners = cluster.ring.get_peers(journal_ref(VOL)).owners
    writer = cluster.replicas(owners[0])
    out: dict[str, object] = {"fence": writer.fence(VOL, 1)}
    writer.append(VOL, 1, [rec(1)])
    writer.append(VOL, 1, [rec(2), rec(3)])
    out["stored"] = {u: cluster.stored_seqs(u, VOL) for u in PEERS}
    newer = cluster.replicas("client")
    out["refence"] = newer.fence(VOL, 2)
    with pytest.raises(StaleEpoch):
        writer.append(VOL, 1, [rec(4)])
    with pytest.raises(InvalidArgument):
        newer.append(VOL, 2, [rec(4, epoch=1)])
    newer.append(VOL, 2, [rec(4, epoch=2)])
    out["read"] = sorted((r.seq, r.epoch) for r in newer.read(VOL, 0))
    newer.trim(VOL, 2, 3)
    out["after_trim"] = {u: cluster.stored_seqs(u, VOL) for u in PEERS}
    return out


def test_remote_replicas_over_channels_give_the_same_results_as_over_grpc(tmp_path: Path) -> None:
    with JournalCluster(tmp_path / "grpc", PEERS, replication=2) as plain:
        expected = scenario(plain)
    with JournalCluster(tmp_path / "chan", PEERS, replication=2, channels=True) as chan:
        got = scenario(chan)
        appended = sum(s.stats["JournalAppend"] for s in chan.servers.values())
        over_channels = sum(c.answered[OK] for c in chan.channels.values())
    assert got == expected
    assert appended == 0  # every remote append went over a channel
    assert over_channels >= 4


def test_a_dead_replica_hands_off_over_channels_too(tmp_path: Path) -> None:
    with JournalCluster(tmp_path, PEERS, replication=2, channels=True, timeout=1.0) as cluster:
        owners = cluster.ring.get_peers(journal_ref(VOL)).owners
        spare = next(u for u in PEERS if u not in owners)
        r = cluster.replicas("client")
        r.fence(VOL, 1)
        cluster.stop(owners[1])
        r.append(VOL, 1, [rec(1)])
        assert cluster.stored_seqs(owners[0], VOL) == [1]
        assert cluster.stored_seqs(spare, VOL) == [1]


def test_a_refused_channel_falls_back_to_the_peers_grpc_append(tmp_path: Path) -> None:
    with JournalCluster(tmp_path, PEERS, replication=2, channels=True) as cluster:
        owners = cluster.ring.get_peers(journal_ref(VOL)).owners
        r = cluster.replicas("client")
        r.fence(VOL, 1)
        cluster.channels[owners[0]].stop()  # the channel is gone, gRPC still up
        r.append(VOL, 1, [rec(1)])
        assert cluster.servers[owners[0]].stats["JournalAppend"] == 1
        assert cluster.servers[owners[1]].stats["JournalAppend"] == 0
        r.append(VOL, 1, [rec(2)])  # the channel is skipped for `suspect` seconds: gRPC
        assert cluster.servers[owners[0]].stats["JournalAppend"] == 2
        assert all(cluster.stored_seqs(u, VOL) == [1, 2] for u in owners)


# --- TLS -----------------------------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@needs_openssl
def test_mutual_tls_appends_and_refuses_clients_without_the_right_certificates(
    pki: TestPKI, store: JournalStore, tmp_path: Path
) -> None:
    with JournalChannelServer(store, tls=pki.server_tls()) as srv:
        good = JournalChannelClient(srv.address, tls=pki.client_tls(), timeout=2.0)
        try:
            good.fence(VOL, 1)
            good.append(VOL, 1, [rec(1)])
        finally:
            good.close()
        assert [r.seq for r in store.read(VOL)] == [1]
        # a client presenting the server's certificate (not a client cert) for client auth, or none
        plaintext = JournalChannelClient(srv.address, timeout=2.0)
        with pytest.raises(PeerUnavailable):
            plaintext.append(VOL, 1, [rec(2)])
        plaintext.close()
        other = make_test_pki(tmp_path / "other", prefix="other-")
        stranger = JournalChannelClient(srv.address, tls=other.client_tls(), timeout=2.0)
        with pytest.raises(PeerUnavailable):
            stranger.append(VOL, 1, [rec(2)])
        stranger.close()
        assert [r.seq for r in store.read(VOL)] == [1]


def test_cluster_nodes_advertise_their_channels_and_append_over_them(tmp_path: Path) -> None:
    from torus_sqlite.backend import SQLiteBackend

    from torus_core.cluster.peerinfo import PeerInfo
    from torus_core.testing.cluster import InProcessCluster, wait_until, writable_volume

    url = f"sqlite:///{tmp_path}/meta.db?poll_interval=0.02"
    journals = {u: JournalStore(tmp_path / u / "journal") for u in PEERS}
    try:
        with InProcessCluster(lambda: SQLiteBackend.from_url(url), block_size=4096) as c:
            nodes = [c.add_node(u, journal=journals[u]) for u in PEERS]
            assert wait_until(
                lambda: all(
                    len(n.distributor.ring.members()) == 3
                    and all(n.membership.live.get(u) and n.membership.live[u].journal_address for u in PEERS)
                    for n in nodes
                ),
                10.0,
            )
            for n in nodes:
                assert n.peer_info().journal_address.startswith("127.0.0.1:")
                assert n.journal_channel is not None and n.journal_address.endswith(
                    f":{n.journal_channel.port}"
                )
            owners = nodes[0].journal_replicas.replicas(VOL)
            writer = c.nodes[next(u for u in PEERS if u not in owners)].journal_replicas
            assert writable_volume(c.md, VOL).epoch == 1  # peers take journals of real volumes only
            writer.fence(VOL, 1)
            writer.append(VOL, 1, [rec(1), rec(2)])
            assert sum(len(journals[u].read(VOL, 0)) == 2 for u in PEERS) >= 2
            # over the channels (a lease blip on a loaded box may send one append over gRPC)
            channels = [c.nodes[u].journal_channel for u in owners]
            assert sum(ch.answered[OK] for ch in channels if ch is not None) >= 1
            # an older peer's info (no journal_address) parses, and then appends use gRPC
            info = PeerInfo.from_dict({"uuid": "old", "address": "127.0.0.1:1"})
            assert info.journal_address == ""
    finally:
        for j in journals.values():
            j.close()


def _cluster_options_command(seen: Callable[[ClusterOptions], None]) -> click.Command:
    """A click command with torusd's cluster options that hands the built ClusterOptions to ``seen``."""
    from torus_core.cluster.cli_options import cluster_options, make_cluster_options
    from torus_core.config import Config

    @click.command()
    @cluster_options
    def cmd(**kw: object) -> None:
        names = ("heartbeat_interval", "peer_ttl", "rebalance_rate", "rebalance_interval")
        names += ("rebalance_settle", "rebalance_idle_max", "gc_grace", "no_gc")
        seen(make_cluster_options(Config(), *(kw[n] for n in names)))  # type: ignore[arg-type]

    return cmd


def test_torusd_flags_turn_the_journal_channel_off_or_pin_its_port() -> None:
    from click.testing import CliRunner

    seen: list[tuple[bool, int]] = []
    cmd = _cluster_options_command(
        lambda opts: seen.append((opts.journal_channel, opts.journal_channel_port))
    )
    runner = CliRunner()
    for args, env in (
        ([], {}),
        (["--journal-channel-port", "7411"], {}),
        ([], {"TORUS_NO_JOURNAL_CHANNEL": "1"}),
    ):
        result = runner.invoke(cmd, args, env=env)
        assert result.exit_code == 0, result.output
    assert seen == [(True, 0), (True, 7411), (False, 0)]


def test_torusd_rebalance_idle_max_reaches_rebalance_options_and_bad_timing_flags_are_usage_errors() -> None:
    from click.testing import CliRunner

    from torus_core.cli.torusd import cli as torusd_cli

    seen: list[float] = []
    cmd = _cluster_options_command(lambda opts: seen.append(opts.rebalance.idle_max))
    runner = CliRunner()
    for args in ([], ["--rebalance-idle-max", "7.5"], ["--rebalance-idle-max", "0"]):
        result = runner.invoke(cmd, args)
        assert result.exit_code == 0, result.output
    assert seen == [30.0, 7.5, 0.0]
    # a negative or non-number number of seconds (zero too, where it would mean "never") is a
    # click usage error (exit 2) for every timing flag, before anything is opened
    timing = {
        "--heartbeat-interval": ("0", "-1", "nan", "soon"),
        "--peer-ttl": ("0", "-1", "nan", "soon"),
        "--rebalance-interval": ("-1", "nan", "soon"),
        "--rebalance-settle": ("-1", "nan", "soon"),
        "--rebalance-idle-max": ("-1", "nan", "soon"),
        "--gc-grace": ("-1", "nan", "soon"),
    }
    for cli in (cmd, torusd_cli):
        for flag, bads in timing.items():
            for bad in bads:
                result = runner.invoke(cli, [flag, bad])
                assert result.exit_code == 2, (flag, bad, result.output)
                assert f"Invalid value for '{flag}'" in result.output
                assert result.exception is None or isinstance(result.exception, SystemExit)
    assert seen == [30.0, 7.5, 0.0]
