"""Pieces shared by the metadata backends that reach a server (etcd, redis).

:func:`check_option_names`, :func:`parse_timeout` and :func:`parse_prefix` validate the options
both URL parsers accept, with the same messages; :class:`LogLeaseBackend` is a
:class:`~torus_core.eventlog.MetadataBackend` holding one event log and one lease store that
refuses access once closed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from torus_core.errors import Closed, ConfigError
from torus_core.eventlog import EventLog, LeaseStore, MetadataBackend


def check_option_names(backend: str, options: Mapping[str, Any], known: Collection[str]) -> None:
    """Raise :class:`ConfigError` naming every option of ``options`` not in ``known``."""
    unknown = set(options) - set(known)
    if unknown:
        raise ConfigError(
            f"unknown {backend} options: {', '.join(sorted(unknown))}; known: {', '.join(known)}"
        )


def parse_timeout(backend: str, options: Mapping[str, Any], default: float) -> float:
    """The ``timeout`` option in seconds (``default`` if absent); ConfigError unless a number > 0."""
    try:
        timeout = float(options.get("timeout", default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{backend} timeout must be a number: {options.get('timeout')!r}") from exc
    if not timeout > 0:
        raise ConfigError(f"{backend} timeout must be > 0")
    return timeout


def parse_prefix(backend: str, options: Mapping[str, Any], default: str) -> str:
    """The ``prefix`` option (``default`` if absent); ConfigError if empty."""
    prefix = str(options.get("prefix", default))
    if not prefix:
        raise ConfigError(f"{backend} key prefix must not be empty")
    return prefix


class LogLeaseBackend(MetadataBackend):
    """A backend made of ``_log`` and ``_leases``, set by the subclass's ``__init__``.

    :attr:`log` and :attr:`leases` raise :class:`Closed` once ``_closed`` is set (by ``close``).
    """

    _log: EventLog
    _leases: LeaseStore
    _closed: bool = False

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"{self.name} backend is closed")

    @property
    def log(self) -> EventLog:
        """The event log."""
        self._check_open()
        return self._log

    @property
    def leases(self) -> LeaseStore:
        """The lease store."""
        self._check_open()
        return self._leases
