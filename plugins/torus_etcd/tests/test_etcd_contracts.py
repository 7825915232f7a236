"""The shipped event-log and lease-store conformance suites, run against EtcdBackend on a live etcd."""

from __future__ import annotations

import uuid

import pytest
from torus_etcd.backend import EtcdBackend

from torus_core.testing.eventlog import BackendFromUrl, EventLogContract, LeaseStoreContract
from torus_core.testing.services import EtcdServer

pytestmark = pytest.mark.needs_etcd


class _EtcdFixtures(BackendFromUrl):
    backend_class = EtcdBackend

    @pytest.fixture
    def url(self, etcd_server: EtcdServer) -> str:
        # A fresh, empty store per test: a private key prefix on the session's etcd.
        return f"{etcd_server.url}?prefix=/torus-test-{uuid.uuid4().hex}/"


class TestEtcdEventLog(_EtcdFixtures, EventLogContract):
    """EventLogContract on etcd."""


class TestEtcdLeaseStore(_EtcdFixtures, LeaseStoreContract):
    """LeaseStoreContract on etcd."""
