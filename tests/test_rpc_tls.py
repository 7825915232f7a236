"""Mutual TLS for peer RPC, with throwaway certificates made by the openssl CLI."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from torus_core.errors import PeerUnavailable
from torus_core.refs import BlockRef
from torus_core.rpc import PeerClient, PeerServer, RPCTimeouts, TLSConfig
from torus_core.testing.distributor import mem_store_factory
from torus_core.testing.rpc import TestPKI, make_test_pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

BS = 1024
FAST = RPCTimeouts(get=2.0, put=2.0, check=2.0, ping=2.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki-other"), prefix="other-")


@pytest.fixture
def tls_server(pki: TestPKI) -> Iterator[PeerServer]:
    store = mem_store_factory()(BS, 16)
    srv = PeerServer(store, uuid="tls-peer", tls=pki.server_tls()).start()
    yield srv
    srv.stop(grace=0)
    store.close()


def test_mutual_tls_round_trip(tls_server: PeerServer, pki: TestPKI) -> None:
    c = PeerClient(tls_server.address, tls=pki.client_tls(), timeouts=FAST)
    try:
        ref = BlockRef(1, 1, 1)
        c.put_blocks([ref], [b"secret"])
        assert c.get_block(ref) == b"secret" + bytes(BS - 6)
        assert c.ping().uuid == "tls-peer"
    finally:
        c.close()


def test_tls_server_on_non_loopback_address_needs_no_insecure_flag(pki: TestPKI) -> None:
    store = mem_store_factory()(BS, 4)
    srv = PeerServer(store, address="0.0.0.0:0", tls=pki.server_tls()).start()
    try:
        c = PeerClient(f"127.0.0.1:{srv.port}", tls=pki.client_tls(), timeouts=FAST)
        assert c.ping().block_size == BS
        c.close()
    finally:
        srv.stop(grace=0)
        store.close()


def test_plaintext_client_is_refused_by_a_tls_server(tls_server: PeerServer) -> None:
    c = PeerClient(tls_server.address, timeouts=FAST)
    try:
        with pytest.raises(PeerUnavailable):
            c.ping()
    finally:
        c.close()


def test_client_without_certificate_is_refused(tls_server: PeerServer, pki: TestPKI, tmp_path: Path) -> None:
    # Trusts the server's CA but presents a certificate from an unrelated CA.
    other = make_test_pki(tmp_path, prefix="x-")
    tls = TLSConfig(str(other.client_cert), str(other.client_key), str(pki.ca_cert))
    c = PeerClient(tls_server.address, tls=tls, timeouts=FAST)
    try:
        with pytest.raises(PeerUnavailable):
            c.get_block(BlockRef(1, 1, 1))
    finally:
        c.close()


def test_client_that_does_not_trust_the_server_ca_is_refused(
    tls_server: PeerServer, pki: TestPKI, other_pki: TestPKI
) -> None:
    tls = TLSConfig(str(pki.client_cert), str(pki.client_key), str(other_pki.ca_cert))
    c = PeerClient(tls_server.address, tls=tls, timeouts=FAST)
    try:
        with pytest.raises(PeerUnavailable):
            c.ping()
    finally:
        c.close()


def test_server_name_override_lets_a_client_dial_by_another_name(
    tls_server: PeerServer, pki: TestPKI
) -> None:
    tls = TLSConfig(str(pki.client_cert), str(pki.client_key), str(pki.ca_cert), server_name="localhost")
    c = PeerClient(f"127.0.0.1:{tls_server.port}", tls=tls, timeouts=FAST)
    try:
        assert c.ping().uuid == "tls-peer"
    finally:
        c.close()


def test_client_presenting_no_certificate_at_all_is_refused(tls_server: PeerServer, pki: TestPKI) -> None:
    import grpc

    from torus_core.rpc import torus_storage_pb2 as pb
    from torus_core.rpc import torus_storage_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    with grpc.secure_channel(tls_server.address, creds) as channel:
        stub = pb_grpc.TorusStorageStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Ping(pb.PingRequest(), timeout=2.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tls_server.stats["Ping"] == 0
