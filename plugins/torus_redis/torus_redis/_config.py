"""URL and option parsing of the redis backend (no client-library imports)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from torus_core.backend_kit import check_option_names, parse_prefix, parse_timeout
from torus_core.errors import ConfigError

#: torus options; everything else in the query string is handed to redis-py unchanged.
OPTION_NAMES = (
    "prefix",
    "timeout",
    "cluster_id",
    "username",
    "password",
    "ca_file",
    "cert_file",
    "key_file",
)


@dataclass
class RedisConfig:
    """Connection settings of one redis backend."""

    url: str
    prefix: str = "torus:"
    timeout: float = 2.0
    cluster_id: str | None = None
    client_kwargs: dict[str, Any] = field(default_factory=dict)


def parse_url(url: str, options: Mapping[str, Any] | None = None) -> RedisConfig:
    """Parse ``redis://[[user]:password@]host:port/db`` or ``rediss://`` (TLS) plus options.

    torus options (in ``options`` or the query string; ``options`` wins): ``prefix`` (key
    prefix, default ``torus:``), ``timeout`` (seconds per call, default 2), ``cluster_id`` (the
    cluster id the caller recorded; an empty or different server raises DataLossDetected),
    ``username``/``password`` (AUTH), ``ca_file``/``cert_file``/``key_file`` (TLS).
    """
    if not isinstance(url, str):
        raise ConfigError("redis URL must be a string")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"not a redis URL: {url!r} (want redis://host:port/db or rediss://...)")
    if not parts.hostname:
        raise ConfigError(f"redis URL names no host: {url!r}")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in redis URL {url!r}") from exc
    query = dict(parse_qsl(parts.query))
    ours = {k: query.pop(k) for k in list(query) if k in OPTION_NAMES}
    ours.update(options or {})
    check_option_names("redis", ours, OPTION_NAMES)
    timeout = parse_timeout("redis", ours, 2.0)
    prefix = parse_prefix("redis", ours, "torus:")
    kwargs: dict[str, Any] = {}
    if ours.get("username") is not None:
        kwargs["username"] = ours["username"]
    if ours.get("password") is not None:
        kwargs["password"] = ours["password"]
    tls_files = {"ca_file": "ssl_ca_certs", "cert_file": "ssl_certfile", "key_file": "ssl_keyfile"}
    for opt, kw in tls_files.items():
        if ours.get(opt):
            if parts.scheme != "rediss":
                raise ConfigError(f"redis option {opt} needs a rediss:// URL")
            kwargs[kw] = ours[opt]
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    cid = ours.get("cluster_id")
    return RedisConfig(clean, prefix, timeout, str(cid) if cid else None, kwargs)
