"""The shipped event-log and lease-store conformance suites, run against RedisBackend on live Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from torus_redis.backend import RedisBackend

from torus_core.eventlog import MetadataBackend
from torus_core.testing.eventlog import EventLogContract, LeaseStoreContract
from torus_core.testing.services import RedisServer

pytestmark = pytest.mark.needs_redis


class _RedisFixtures:
    @pytest.fixture
    def url(self, redis_server: RedisServer) -> str:
        # A fresh, empty store per test: a private key prefix on the session's redis.
        return f"{redis_server.url}?prefix=torus-test-{uuid.uuid4().hex}:"

    @pytest.fixture
    def backend(self, url: str) -> Iterator[MetadataBackend]:
        b = RedisBackend.from_url(url)
        yield b
        b.wipe()
        b.close()

    @pytest.fixture
    def backend_factory(self, url: str) -> Callable[[], MetadataBackend]:
        return lambda: RedisBackend.from_url(url)


class TestRedisEventLog(_RedisFixtures, EventLogContract):
    """EventLogContract on Redis."""


class TestRedisLeaseStore(_RedisFixtures, LeaseStoreContract):
    """LeaseStoreContract on Redis."""
