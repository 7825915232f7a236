"""``EtcdBackend``: the ``etcd`` metadata backend (URL ``etcd://host:port[,host:port...]``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from torus_core.backend_kit import LogLeaseBackend, check_option_names, parse_prefix, parse_timeout
from torus_core.errors import ConfigError
from torus_etcd._config import TransportConfig

if TYPE_CHECKING:
    from torus_etcd.eventlog import EtcdEventLog

#: Options accepted in the options mapping or the URL query string.
OPTION_NAMES = ("ca_file", "cert_file", "key_file", "user", "password", "timeout", "prefix")


def parse_url(url: str, options: Mapping[str, Any] | None = None) -> tuple[TransportConfig, bytes]:
    """Parse ``etcd://[user:password@]host:port[,host:port...][?opt=value...]`` plus ``options``.

    Options (mapping wins over the query string): ``ca_file``, ``cert_file``, ``key_file`` (TLS;
    ``etcds://`` also selects TLS with the system roots), ``user``, ``password``, ``timeout``
    (seconds per call, default 2), ``prefix`` (default ``/torus/``).
    """
    if not isinstance(url, str):
        raise ConfigError("etcd URL must be a string")
    parts = urlsplit(url)
    if parts.scheme not in ("etcd", "etcds"):
        raise ConfigError(f"not an etcd URL: {url!r} (want etcd://host:port[,host:port])")
    netloc = parts.netloc
    opts: dict[str, Any] = dict(parse_qsl(parts.query))
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, _, password = cred.partition(":")
        opts.setdefault("user", unquote(user))
        opts.setdefault("password", unquote(password))
    opts.update(options or {})
    check_option_names("etcd", opts, OPTION_NAMES)
    endpoints = []
    for ep in netloc.split(","):
        host, sep, port = ep.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad etcd endpoint {ep!r} in {url!r} (want host:port)")
        endpoints.append(f"{host}:{port}")
    timeout = parse_timeout("etcd", opts, 2.0)
    prefix = parse_prefix("etcd", opts, "/torus/")
    cfg = TransportConfig(
        endpoints=endpoints,
        timeout=timeout,
        ca_file=opts.get("ca_file"),
        cert_file=opts.get("cert_file"),
        key_file=opts.get("key_file"),
        user=opts.get("user"),
        password=opts.get("password"),
    )
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise ConfigError("etcd TLS needs both cert_file and key_file")
    return cfg, prefix.encode()


class EtcdBackend(LogLeaseBackend):
    """Event log and lease store on an etcd v3 cluster."""

    name: ClassVar[str] = "etcd"
    _log: EtcdEventLog

    def __init__(self, config: TransportConfig, prefix: bytes, *, tls: bool = False) -> None:
        # Client libraries are imported here, not at plugin registration (hookspecs rule).
        from torus_etcd._transport import EtcdTransport
        from torus_etcd.eventlog import EtcdEventLog
        from torus_etcd.leases import EtcdLeaseStore

        self._transport = EtcdTransport(config, force_tls=tls)
        self.prefix = prefix
        self._log = EtcdEventLog(self._transport, prefix)
        self._leases = EtcdLeaseStore(self._transport, prefix)
        self._closed = False

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any] | None = None) -> EtcdBackend:
        """Connect to the cluster named by ``url`` (no I/O until the first call)."""
        cfg, prefix = parse_url(url, options)
        return cls(cfg, prefix, tls=url.startswith("etcds:"))

    def wipe(self) -> None:
        """Delete every key under the prefix (events, snapshots, lease-store keys)."""
        self._check_open()
        from etcd3 import etcdrpc

        from torus_etcd._append import prefix_end

        req = etcdrpc.DeleteRangeRequest(key=self.prefix, range_end=prefix_end(self.prefix))
        self._transport.call("KV", "DeleteRange", req)
        self._log.reset_cache()

    def close(self) -> None:
        """Close the gRPC channels. Idempotent."""
        self._closed = True
        self._transport.close()
