"""Connection settings of the etcd backend (no client-library imports)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TransportConfig:
    """Connection settings parsed from the URL and options."""

    endpoints: list[str]
    timeout: float = 2.0
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = None
