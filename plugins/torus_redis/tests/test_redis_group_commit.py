"""Group commit on Redis: the shared GroupCommitContract, stalling writes with SIGSTOP of a private redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from torus_redis.backend import RedisBackend

from torus_core.errors import DataLossDetected
from torus_core.eventlog import MetadataBackend
from torus_core.testing.eventlog import BackendFromUrl, ev
from torus_core.testing.groupcommit import GroupCommitContract
from torus_core.testing.services import RedisServer, redis_service

pytestmark = pytest.mark.needs_redis


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    with redis_service() as srv:
        yield srv


class TestRedisGroupCommit(BackendFromUrl, GroupCommitContract):
    """GroupCommitContract on Redis."""

    backend_class = RedisBackend

    @pytest.fixture
    def url(self, private_redis: RedisServer) -> str:
        return f"{private_redis.url}?timeout=30&prefix=gc-{uuid.uuid4().hex}:"

    @pytest.fixture
    def stall(self, private_redis: RedisServer) -> Callable[[], AbstractContextManager[Any]]:
        return private_redis.paused

    def test_a_caller_expecting_another_cluster_fails_alone_in_a_group(
        self, backend: MetadataBackend, url: str, stall: Callable[[], AbstractContextManager[Any]]
    ) -> None:
        backend.log.append([ev("s", 1)])
        foreign = RedisBackend.from_url(url, {"cluster_id": "some-other-cluster"})
        try:
            committer = backend.log.committer  # type: ignore[attr-defined]
            assert foreign.log.committer is committer  # type: ignore[attr-defined]
            lead, (good, bad, good2), commits = self._grouped(
                backend, stall, [ev("a", 1)], [[ev("b", 1)], (foreign, [ev("c", 1)]), [ev("d", 1)]]
            )
            assert (lead.outcome, good.outcome, good2.outcome) == ([2], [3], [4])
            assert isinstance(bad.outcome, DataLossDetected), bad.outcome
            assert "expected cluster some-other-cluster" in str(bad.outcome)
            assert commits == 2
            assert backend.log.read_stream("c") == []
            assert backend.log.head_position() == 4
        finally:
            foreign.close()


def test_append_reloads_its_script_after_the_server_forgot_it(private_redis: RedisServer) -> None:
    import redis

    b = RedisBackend.from_url(f"{private_redis.url}?prefix=gc-flush-{uuid.uuid4().hex}:")
    try:
        assert b.log.append([ev("s", 1)]) == [1]
        redis.Redis(host="127.0.0.1", port=private_redis.port).script_flush()
        assert b.log.append([ev("s", 2)]) == [2]  # NOSCRIPT -> SCRIPT LOAD -> re-run, once
        assert [e.version for e in b.log.read_stream("s")] == [1, 2]
    finally:
        b.wipe()
        b.close()
