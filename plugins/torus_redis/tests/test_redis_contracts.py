"""The shipped event-log and lease-store conformance suites, run against RedisBackend on live Redis."""

from __future__ import annotations

import uuid

import pytest
from torus_redis.backend import RedisBackend

from torus_core.testing.eventlog import BackendFromUrl, EventLogContract, LeaseStoreContract
from torus_core.testing.services import RedisServer

pytestmark = pytest.mark.needs_redis


class _RedisFixtures(BackendFromUrl):
    backend_class = RedisBackend

    @pytest.fixture
    def url(self, redis_server: RedisServer) -> str:
        # A fresh, empty store per test: a private key prefix on the session's redis.
        return f"{redis_server.url}?prefix=torus-test-{uuid.uuid4().hex}:"


class TestRedisEventLog(_RedisFixtures, EventLogContract):
    """EventLogContract on Redis."""


class TestRedisLeaseStore(_RedisFixtures, LeaseStoreContract):
    """LeaseStoreContract on Redis."""
