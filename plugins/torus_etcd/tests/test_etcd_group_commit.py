"""Group commit on etcd: the shared GroupCommitContract, stalling writes with SIGSTOP of a private etcd."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from torus_etcd._append import MAX_TXN_OPS
from torus_etcd.backend import EtcdBackend

from torus_core.eventlog import MetadataBackend
from torus_core.testing.eventlog import BackendFromUrl, ev
from torus_core.testing.groupcommit import GroupCommitContract
from torus_core.testing.services import EtcdServer, etcd_service

pytestmark = pytest.mark.needs_etcd


@pytest.fixture(scope="module")
def private_etcd() -> Iterator[EtcdServer]:
    with etcd_service() as srv:
        yield srv


class TestEtcdGroupCommit(BackendFromUrl, GroupCommitContract):
    """GroupCommitContract on etcd."""

    backend_class = EtcdBackend

    @pytest.fixture
    def url(self, private_etcd: EtcdServer) -> str:
        return f"{private_etcd.url}?timeout=30&prefix=/gc-{uuid.uuid4().hex}/"

    @pytest.fixture
    def stall(self, private_etcd: EtcdServer) -> Callable[[], AbstractContextManager[Any]]:
        return private_etcd.paused

    def test_queued_batches_beyond_the_txn_op_limit_are_split_into_several_groups(
        self, backend: MetadataBackend, stall: Callable[[], AbstractContextManager[Any]]
    ) -> None:
        per_batch = 25  # 50 puts each: three batches exceed etcd's 128 ops in one txn
        batches = [[ev(f"big{i}", v + 1) for v in range(per_batch)] for i in range(3)]
        assert 3 * 2 * per_batch + 1 > MAX_TXN_OPS
        lead, queued, commits = self._grouped(backend, stall, [ev("a", 1)], batches)
        assert lead.outcome == [1]
        outcomes = [t.outcome for t in queued]
        assert outcomes == [list(range(2 + i * per_batch, 2 + (i + 1) * per_batch)) for i in range(3)]
        assert commits == 3  # the lead alone, then two batches, then the third
        assert backend.log.head_position() == 1 + 3 * per_batch


def test_a_closed_connection_cannot_append_through_another_open_one(private_etcd: EtcdServer) -> None:
    import uuid

    from torus_core.errors import Closed

    url = f"{private_etcd.url}?prefix=/gc-closed-{uuid.uuid4().hex}/"
    open_one = EtcdBackend.from_url(url)
    try:
        closed = EtcdBackend.from_url(url)
        log = closed.log
        assert log.committer is open_one.log.committer  # type: ignore[attr-defined]
        closed.close()
        with pytest.raises(Closed):
            log.append([ev("s", 1)])
        assert open_one.log.head_position() == 0
        assert open_one.log.append([ev("s", 1)]) == [1]
    finally:
        open_one.wipe()
        open_one.close()
