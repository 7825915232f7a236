"""Helpers for metadata-backend outage tests (a paused, killed or restarted private server).

:func:`short_timeout_backend` opens a backend whose calls give up after :data:`OUTAGE_TIMEOUT`
seconds; :func:`assert_fails_fast` asserts that a call against an unreachable server raises
:class:`~torus_core.errors.MetadataUnavailable` naming the backend, within that timeout plus
:data:`OUTAGE_SLACK`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, cast

import pytest

from torus_core.errors import MetadataUnavailable
from torus_core.eventlog import MetadataBackend
from torus_core.testing.eventlog import ev
from torus_core.testing.services import ServerProcess

#: Per-call timeout (seconds) of the backends outage tests open.
OUTAGE_TIMEOUT = 1.0
#: A failing call must return within the backend timeout plus this much slack.
OUTAGE_SLACK = 3.0

B = TypeVar("B", bound=MetadataBackend)


@contextlib.contextmanager
def short_timeout_backend(cls: type[B], server_url: str, timeout: float = OUTAGE_TIMEOUT) -> Iterator[B]:
    """A ``cls`` backend on ``server_url`` whose calls time out after ``timeout`` s; closed on exit."""
    backend = cast(B, cls.from_url(f"{server_url}?timeout={timeout}"))
    try:
        yield backend
    finally:
        backend.close()


def assert_fails_fast(
    call: Callable[[], object],
    backend: str,
    timeout: float = OUTAGE_TIMEOUT,
    slack: float = OUTAGE_SLACK,
) -> float:
    """Assert ``call()`` raises MetadataUnavailable of ``backend`` within ``timeout + slack`` s.

    Returns the seconds it took.
    """
    t0 = time.monotonic()
    with pytest.raises(MetadataUnavailable) as info:
        call()
    assert info.value.backend == backend
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + slack
    return elapsed


def assert_pause_fails_fast_and_backend_recovers(
    server: ServerProcess,
    backend: MetadataBackend,
    name: str,
    reads: Sequence[Callable[[], object]] = (),
) -> None:
    """While ``server`` is paused every call fails fast; after it resumes the same backend works.

    Appends two events and puts lease key ``k``, pauses the server, asserts that an append of a
    three-event batch, ``head_position``, each of ``reads`` (backend-specific calls), a lease
    ``get`` and ``grant`` all fail fast, resumes it, and asserts that retrying the batch gives
    positions 3-5 exactly once and the lease key survived.
    """
    backend.log.append([ev("a", 1), ev("b", 1)])
    backend.leases.put("k", b"v")
    batch = [ev("a", 2), ev("b", 2), ev("c", 1)]
    server.pause()
    try:
        assert_fails_fast(lambda: backend.log.append(batch), name)
        assert_fails_fast(backend.log.head_position, name)
        for read in reads:
            assert_fails_fast(read, name)
        assert_fails_fast(lambda: backend.leases.get("k"), name)
        assert_fails_fast(lambda: backend.leases.grant(5), name)
    finally:
        server.resume()
    # The timed-out batch may or may not have committed; an identical retry is safe either way.
    assert backend.log.append(batch) == [3, 4, 5]
    stored = backend.log.read_all()
    assert [(e.stream_id, e.version, e.position) for e in stored] == [
        ("a", 1, 1), ("b", 1, 2), ("a", 2, 3), ("b", 2, 4), ("c", 1, 5)
    ]  # fmt: skip
    assert backend.leases.get("k") == b"v"
