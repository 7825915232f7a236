"""Test helpers for peer RPC: throwaway certificate authorities made with the ``openssl`` CLI."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from torus_core.errors import ConfigError
from torus_core.rpc.tls import TLSConfig

_OPENSSL_TIMEOUT = 30.0


@dataclass(frozen=True)
class TestPKI:
    """Paths of a CA and of a server and a client certificate it signed (all PEM)."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_tls(self, *, require_client_cert: bool = True) -> TLSConfig:
        """Server-side mutual TLS settings."""
        return TLSConfig(str(self.server_cert), str(self.server_key), str(self.ca_cert), require_client_cert)

    def client_tls(self) -> TLSConfig:
        """Client-side settings presenting the client certificate."""
        return TLSConfig(str(self.client_cert), str(self.client_key), str(self.ca_cert))


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise ConfigError("the openssl command is needed to make test certificates")
    proc = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=_OPENSSL_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise ConfigError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _issue(directory: Path, name: str, ca: str, *, server: bool) -> None:
    ext = directory / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n" if server else ""
    ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=torus-{name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", ext.name, "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip


def make_test_pki(directory: Path, prefix: str = "") -> TestPKI:
    """Create a CA plus server (SAN localhost/127.0.0.1/::1) and client certificates in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = f"{prefix}ca"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=torus-test-{ca}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _issue(directory, f"{prefix}server", ca, server=True)
    _issue(directory, f"{prefix}client", ca, server=False)
    return TestPKI(
        ca_cert=directory / f"{ca}.crt",
        ca_key=directory / f"{ca}.key",
        server_cert=directory / f"{prefix}server.crt",
        server_key=directory / f"{prefix}server.key",
        client_cert=directory / f"{prefix}client.crt",
        client_key=directory / f"{prefix}client.key",
    )
