"""Helpers for metadata-backend security tests (TLS, client certificates, passwords).

:func:`smoke_log_and_leases` exercises a freshly opened, empty backend end to end;
:func:`open_fails_fast` asserts that a backend opened with wrong security settings fails its
first call with the expected typed error, quickly.
"""

from __future__ import annotations

import time

import pytest

from torus_core.errors import CompareFailed, LeaseNotFound
from torus_core.eventlog import MetadataBackend
from torus_core.testing.eventlog import ev

#: Seconds within which a refused connection must fail.
FAIL_FAST = 5.0


def smoke_log_and_leases(backend: MetadataBackend) -> None:
    """Append, read, a stale append (CompareFailed), and a lease's grant/put/keepalive/revoke."""
    log = backend.log
    assert log.append([ev("vol", 1), ev("vol", 2)]) == [1, 2]
    assert [e.version for e in log.read_stream("vol")] == [1, 2]
    with pytest.raises(CompareFailed):
        log.append([ev("vol", 2, state=b"stale")])
    assert log.head_position() == 2
    leases = backend.leases
    lease = leases.grant(5)
    leases.put("peers/a", b"up", lease)
    leases.keepalive(lease)
    assert leases.get("peers/a") == b"up"
    leases.revoke(lease)
    assert leases.get("peers/a") is None
    with pytest.raises(LeaseNotFound):
        leases.keepalive(lease)


def open_fails_fast(
    cls: type[MetadataBackend], url: str, expected: type[Exception], within: float = FAIL_FAST
) -> Exception:
    """Open ``url`` with ``cls``, make one call; assert it raises ``expected`` within ``within`` s."""
    backend = cls.from_url(url)
    started = time.monotonic()
    try:
        with pytest.raises(expected) as info:
            backend.log.head_position()
    finally:
        backend.close()
    assert time.monotonic() - started < within
    return info.value
