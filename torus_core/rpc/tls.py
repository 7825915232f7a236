"""Transport security for peer RPC: mutual TLS, or insecure on loopback only.

A :class:`TLSConfig` names PEM files. Both sides use the same shape: a server presents
``cert_file``/``key_file`` and (when ``require_client_cert``) verifies clients against
``ca_file``; a client verifies the server against ``ca_file`` and presents its own
``cert_file``/``key_file``.

Without TLS, only loopback addresses are allowed unless the caller passes
``allow_insecure=True`` (:func:`check_insecure_allowed`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from torus_core.errors import ConfigError


@dataclass(frozen=True)
class TLSConfig:
    """PEM file paths for mutual TLS.

    :param cert_file: this side's certificate chain.
    :param key_file: this side's private key.
    :param ca_file: CA bundle used to verify the other side.
    :param require_client_cert: server side: refuse clients without a certificate signed by the CA.
    :param server_name: client side: expected name in the server certificate, when it differs
        from the host in the dialled address (sets ``grpc.ssl_target_name_override``).
    """

    cert_file: str
    key_file: str
    ca_file: str
    require_client_cert: bool = True
    server_name: str | None = None

    def _read(self, what: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS {what} {path!r}: {exc}") from exc

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials (mutual TLS when ``require_client_cert``)."""
        key = self._read("key", self.key_file)
        cert = self._read("certificate", self.cert_file)
        ca = self._read("CA bundle", self.ca_file)
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=self.require_client_cert
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials presenting this side's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self._read("CA bundle", self.ca_file),
            private_key=self._read("key", self.key_file),
            certificate_chain=self._read("certificate", self.cert_file),
        )


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raises :class:`ConfigError` when malformed.

    A leading ``http://`` or ``grpc://`` scheme (as stored by the original) is accepted.
    """
    addr = address.strip()
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if addr.startswith(scheme):
            addr = addr[len(scheme) :]
            break
    addr = addr.rstrip("/")
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"malformed peer address {address!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep:
            raise ConfigError(f"peer address {address!r} has no port")
    if not host:
        raise ConfigError(f"peer address {address!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"peer address {address!r} has a bad port") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"peer address {address!r} has a port out of range")
    return host, port


def normalize_address(address: str) -> str:
    """``host:port`` form of ``address`` suitable for gRPC (scheme stripped, v6 bracketed)."""
    host, port = split_host_port(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_insecure_allowed(address: str, allow_insecure: bool) -> None:
    """Refuse plaintext traffic to or from a non-loopback address unless explicitly allowed."""
    host, _ = split_host_port(address)
    if not allow_insecure and not is_loopback(host):
        raise ConfigError(
            f"refusing insecure (plaintext) peer RPC on non-loopback address {address!r}: "
            "configure TLS or set allow_insecure=True"
        )
