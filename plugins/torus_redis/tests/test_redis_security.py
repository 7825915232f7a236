"""The redis backend's security options against a live redis-server with TLS and AUTH.

One private redis-server per module listens on a TLS port only, demands a client certificate
signed by its CA (``--tls-auth-clients yes``) and a password (``--requirepass``); an ACL user
``torus`` may touch only keys under ``torus-sec:``. The backend connects with
``rediss://torus:pw@host:port/0?ca_file=&cert_file=&key_file=`` (or ``rediss://:pw@...`` for the
default user); every wrong or missing piece fails fast with a typed error, and the shipped
contracts pass over the secure connection.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from torus_redis.backend import RedisBackend

from torus_core.errors import ConfigError, MetadataUnavailable
from torus_core.testing.eventlog import BackendFromUrl, EventLogContract, LeaseStoreContract, ev
from torus_core.testing.rpc import TestPKI, make_test_pki
from torus_core.testing.security import open_fails_fast, smoke_log_and_leases
from torus_core.testing.services import RedisServer, ServerTLS, redis_service

pytestmark = pytest.mark.needs_redis

#: The default user's password (``--requirepass``).
REQUIREPASS = "default-pw"
USER, PASSWORD = "torus", "torus-pw"
#: The key prefix the ACL user may touch.
ALLOWED = "torus-sec:"
#: Seconds a failing connection attempt may take (the per-call timeout used below is 1 s).
FAIL_FAST = 5.0


class Secure:
    """A running secure redis-server plus the certificates to reach it."""

    def __init__(self, server: RedisServer, pki: TestPKI, other: TestPKI) -> None:
        self.server = server
        self.pki = pki
        self.other = other

    def url(
        self,
        *,
        user: str | None = USER,
        password: str | None = PASSWORD,
        scheme: str = "rediss",
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        prefix: str | None = None,
        client_cert: bool = True,
        timeout: float = 1.0,
    ) -> str:
        """A redis URL with credentials and TLS files (defaults: the ACL user, all correct)."""
        cred = "" if password is None else f"{user or ''}:{password}@"
        query = [f"timeout={timeout}", f"prefix={prefix or ALLOWED + uuid.uuid4().hex + ':'}"]
        if scheme == "rediss":
            query.append(f"ca_file={ca or self.pki.ca_cert}")
            if client_cert:
                query += [
                    f"cert_file={cert or self.pki.client_cert}",
                    f"key_file={key or self.pki.client_key}",
                ]
        return f"{scheme}://{cred}127.0.0.1:{self.server.port}/0?{'&'.join(query)}"


def _add_acl_user(server: RedisServer, pki: TestPKI) -> None:
    """``ACL SETUSER torus on >pw ~torus-sec:* &* +@all`` through an admin TLS connection."""
    admin = redis.Redis(
        host="127.0.0.1",
        port=server.port,
        password=REQUIREPASS,
        ssl=True,
        ssl_ca_certs=str(pki.ca_cert),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
        socket_timeout=5,
    )
    try:
        assert admin.execute_command(
            "ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", f"~{ALLOWED}*", "&*", "+@all"
        ) in (b"OK", "OK", True)
    finally:
        admin.close()


@pytest.fixture(scope="module")
def secure() -> Iterator[Secure]:
    """A private redis-server: TLS port only, client certificates required, passwords on."""
    tmp = Path(tempfile.mkdtemp(prefix="torus-redis-pki-"))
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
        with redis_service(extra_args=("--requirepass", REQUIREPASS), tls=tls) as server:
            _add_acl_user(server, pki)
            yield Secure(server, pki, other)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fails_fast(url: str, expected: type[Exception]) -> Exception:
    return open_fails_fast(RedisBackend, url, expected, FAIL_FAST)


def test_acl_user_over_tls_with_client_cert_runs_log_and_leases(secure: Secure) -> None:
    backend = RedisBackend.from_url(secure.url())
    try:
        smoke_log_and_leases(backend)
        backend.wipe()
    finally:
        backend.close()


def test_requirepass_default_user_over_tls_runs_log_and_leases(secure: Secure) -> None:
    backend = RedisBackend.from_url(secure.url(user=None, password=REQUIREPASS, prefix="any-prefix:"))
    try:
        smoke_log_and_leases(backend)
        backend.wipe()
    finally:
        backend.close()


def test_options_mapping_carries_the_same_security_settings(secure: Secure) -> None:
    options = {
        "username": USER,
        "password": PASSWORD,
        "ca_file": str(secure.pki.ca_cert),
        "cert_file": str(secure.pki.client_cert),
        "key_file": str(secure.pki.client_key),
        "prefix": f"{ALLOWED}{uuid.uuid4().hex}:",
    }
    backend = RedisBackend.from_url(f"rediss://127.0.0.1:{secure.server.port}/0", options)
    try:
        assert backend.log.append([ev("s", 1)]) == [1]
        backend.wipe()
    finally:
        backend.close()


def test_wrong_password_raises_config_error(secure: Secure) -> None:
    err = _fails_fast(secure.url(password="not-the-password"), ConfigError)
    assert "authentication failed" in str(err)


def test_wrong_requirepass_raises_config_error(secure: Secure) -> None:
    _fails_fast(secure.url(user=None, password="not-the-password"), ConfigError)


def test_missing_password_raises_config_error(secure: Secure) -> None:
    err = _fails_fast(secure.url(password=None), ConfigError)
    assert "authentication failed" in str(err)


def test_keys_outside_the_acl_users_pattern_are_refused_with_config_error(secure: Secure) -> None:
    err = _fails_fast(secure.url(prefix="elsewhere:"), ConfigError)
    assert "permission" in str(err).lower() or "NOPERM" in str(err)


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


def test_plaintext_client_against_the_tls_port_fails_fast(secure: Secure) -> None:
    _fails_fast(secure.url(scheme="redis"), MetadataUnavailable)


def test_tls_files_on_a_plain_redis_url_are_a_config_error(secure: Secure) -> None:
    with pytest.raises(ConfigError, match="rediss"):
        RedisBackend.from_url(f"redis://127.0.0.1:{secure.server.port}/0?ca_file={secure.pki.ca_cert}")


class _SecureFixtures(BackendFromUrl):
    backend_class = RedisBackend

    @pytest.fixture
    def url(self, secure: Secure) -> str:
        return secure.url(timeout=2.0)


class TestSecureRedisEventLog(_SecureFixtures, EventLogContract):
    """EventLogContract over TLS with a client certificate and an ACL user."""


class TestSecureRedisLeaseStore(_SecureFixtures, LeaseStoreContract):
    """LeaseStoreContract over TLS with a client certificate and an ACL user."""


def test_torusctl_takes_a_rediss_url_through_the_schemes_the_plugin_declares(secure: Secure) -> None:
    """Issue 10: ``rediss://`` used to work only through a special case in core; now the redis
    plugin declares both schemes, and torusctl reaches the TLS-only server with it."""
    from click.testing import CliRunner

    from torus_core.cli.torusctl import cli

    url = secure.url()
    assert url.startswith("rediss://")
    runner = CliRunner()
    result = runner.invoke(cli, ["--metadata", url, "init", "--block-size", "4096"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["--metadata", url, "volume", "create-block", "v", "1MiB"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["--metadata", url, "volume", "list"])
    assert result.exit_code == 0 and "v" in result.output, result.output
