"""The etcd backend's security options against a live etcd with TLS client certificates and auth.

One private etcd per module serves https only, demands a client certificate signed by its CA
(``--client-cert-auth``) and has authentication enabled (``root`` plus a user ``torus`` whose
role grants readwrite on ``/torus-sec/`` only). The backend connects with
``etcd://torus:pw@host:port?ca_file=&cert_file=&key_file=``; every wrong or missing piece fails
fast with a typed error, and the shipped contracts pass over the secure connection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from torus_etcd.backend import EtcdBackend

from torus_core.errors import ConfigError, MetadataUnavailable
from torus_core.testing.eventlog import BackendFromUrl, EventLogContract, LeaseStoreContract, ev
from torus_core.testing.rpc import TestPKI, make_test_pki
from torus_core.testing.security import open_fails_fast, smoke_log_and_leases
from torus_core.testing.services import EtcdServer, ServerTLS, etcd_service

pytestmark = pytest.mark.needs_etcd

USER, PASSWORD = "torus", "torus-pw"
ROOT_PASSWORD = "root-pw"
#: The key prefix the ``torus`` user's role may read and write.
ALLOWED = "/torus-sec/"
#: Seconds a failing connection attempt may take (the per-call timeout used below is 1 s).
FAIL_FAST = 5.0


class Secure:
    """A running secure etcd plus the certificates to reach it."""

    def __init__(self, server: EtcdServer, pki: TestPKI, other: TestPKI) -> None:
        self.server = server
        self.pki = pki
        self.other = other

    def url(
        self,
        *,
        user: str | None = USER,
        password: str = PASSWORD,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        prefix: str | None = None,
        client_cert: bool = True,
        timeout: float = 1.0,
    ) -> str:
        """An ``etcd://`` URL with credentials and TLS files (defaults: all correct)."""
        cred = f"{user}:{password}@" if user is not None else ""
        query = [f"ca_file={ca or self.pki.ca_cert}", f"timeout={timeout}"]
        if client_cert:
            query += [f"cert_file={cert or self.pki.client_cert}", f"key_file={key or self.pki.client_key}"]
        query.append(f"prefix={prefix or ALLOWED + uuid.uuid4().hex + '/'}")
        return f"etcd://{cred}{self.server.endpoint}?{'&'.join(query)}"


def _etcdctl(server: EtcdServer, pki: TestPKI, *args: str, user: str | None = None) -> None:
    exe = shutil.which("etcdctl") or "/usr/bin/etcdctl"
    cmd = [
        exe,
        f"--endpoints=https://{server.endpoint}",
        f"--cacert={pki.ca_cert}",
        f"--cert={pki.client_cert}",
        f"--key={pki.client_key}",
        "--dial-timeout=3s",
        "--command-timeout=5s",
    ]
    if user is not None:
        cmd.append(f"--user={user}")
    proc = subprocess.run(
        [*cmd, *args],
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 0, f"etcdctl {args} failed: {proc.stderr}"


def _enable_auth(server: EtcdServer, pki: TestPKI) -> None:
    """Create ``root`` and the ``torus`` user (readwrite on ALLOWED), then enable auth."""
    _etcdctl(server, pki, "user", "add", f"root:{ROOT_PASSWORD}", "--interactive=false")
    _etcdctl(server, pki, "user", "grant-role", "root", "root")
    _etcdctl(server, pki, "role", "add", "torus-rw")
    _etcdctl(server, pki, "role", "grant-permission", "torus-rw", "--prefix=true", "readwrite", ALLOWED)
    _etcdctl(server, pki, "user", "add", f"{USER}:{PASSWORD}", "--interactive=false")
    _etcdctl(server, pki, "user", "grant-role", USER, "torus-rw")
    _etcdctl(server, pki, "auth", "enable")


@pytest.fixture(scope="module")
def secure() -> Iterator[Secure]:
    """A private etcd: https only, client certificates required, auth enabled."""
    tmp = Path(tempfile.mkdtemp(prefix="torus-etcd-pki-"))
    try:
        pki = make_test_pki(tmp)
        other = make_test_pki(tmp, prefix="other-")
        tls = ServerTLS(
            ca_file=str(pki.ca_cert),
            cert_file=str(pki.server_cert),
            key_file=str(pki.server_key),
            client_cert_file=str(pki.client_cert),
            client_key_file=str(pki.client_key),
        )
        with etcd_service(tls=tls) as server:
            _enable_auth(server, pki)
            yield Secure(server, pki, other)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fails_fast(url: str, expected: type[Exception]) -> Exception:
    return open_fails_fast(EtcdBackend, url, expected, FAIL_FAST)


def test_tls_client_cert_and_password_run_log_and_leases(secure: Secure) -> None:
    backend = EtcdBackend.from_url(secure.url())
    try:
        smoke_log_and_leases(backend)
        backend.wipe()
    finally:
        backend.close()


def test_options_mapping_carries_the_same_security_settings(secure: Secure) -> None:
    options = {
        "user": USER,
        "password": PASSWORD,
        "ca_file": str(secure.pki.ca_cert),
        "cert_file": str(secure.pki.client_cert),
        "key_file": str(secure.pki.client_key),
        "prefix": f"{ALLOWED}{uuid.uuid4().hex}/",
    }
    backend = EtcdBackend.from_url(f"etcd://{secure.server.endpoint}", options)
    try:
        assert backend.log.append([ev("s", 1)]) == [1]
        backend.wipe()
    finally:
        backend.close()


def test_without_a_client_certificate_the_handshake_is_refused(secure: Secure) -> None:
    err = _fails_fast(secure.url(client_cert=False), MetadataUnavailable)
    assert "TLS" in str(err)


def test_a_client_certificate_from_another_ca_is_refused(secure: Secure) -> None:
    err = _fails_fast(
        secure.url(cert=secure.other.client_cert, key=secure.other.client_key), MetadataUnavailable
    )
    assert "TLS" in str(err)


def test_a_server_not_signed_by_the_given_ca_is_refused(secure: Secure) -> None:
    err = _fails_fast(secure.url(ca=secure.other.ca_cert), MetadataUnavailable)
    assert "TLS" in str(err)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err)


def test_plaintext_client_against_the_tls_server_fails_fast(secure: Secure) -> None:
    url = f"etcd://{USER}:{PASSWORD}@{secure.server.endpoint}?timeout=1"
    _fails_fast(url, MetadataUnavailable)


def test_wrong_password_raises_config_error(secure: Secure) -> None:
    err = _fails_fast(secure.url(password="not-the-password"), ConfigError)
    assert "authentication failed" in str(err)


def test_unknown_user_raises_config_error(secure: Secure) -> None:
    err = _fails_fast(secure.url(user="mallory"), ConfigError)
    assert "authentication failed" in str(err)


def test_missing_credentials_are_refused_with_config_error(secure: Secure) -> None:
    # Auth is on: the client certificate alone names user "torus-client", which has no role.
    err = _fails_fast(secure.url(user=None), ConfigError)
    assert "permission denied" in str(err)


def test_a_prefix_outside_the_users_role_is_permission_denied(secure: Secure) -> None:
    err = _fails_fast(secure.url(prefix="/elsewhere/"), ConfigError)
    assert "permission denied" in str(err)


def test_unreadable_tls_file_raises_config_error(secure: Secure, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TLS file"):
        EtcdBackend.from_url(secure.url(ca=tmp_path / "missing.crt"))


class _SecureFixtures(BackendFromUrl):
    backend_class = EtcdBackend

    @pytest.fixture
    def url(self, secure: Secure) -> str:
        return secure.url(timeout=2.0)


class TestSecureEtcdEventLog(_SecureFixtures, EventLogContract):
    """EventLogContract over TLS with a client certificate and password auth."""


class TestSecureEtcdLeaseStore(_SecureFixtures, LeaseStoreContract):
    """LeaseStoreContract over TLS with a client certificate and password auth."""


def test_torusctl_takes_an_etcds_url_through_the_schemes_the_plugin_declares(secure: Secure) -> None:
    """Issue 10: ``--metadata etcds://...`` failed with "unknown metadata 'etcds'" before the
    etcd plugin declared its schemes; the same secure cluster is reached under both."""
    from click.testing import CliRunner

    from torus_core.cli.torusctl import cli

    url = secure.url().replace("etcd://", "etcds://", 1)
    runner = CliRunner()
    result = runner.invoke(cli, ["--metadata", url, "init", "--block-size", "4096"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["--metadata", url, "volume", "create-block", "v", "1MiB"])
    assert result.exit_code == 0, result.output
    same = url.replace("etcds://", "etcd://", 1)
    result = runner.invoke(cli, ["--metadata", same, "volume", "list"])
    assert result.exit_code == 0 and "v" in result.output, result.output
