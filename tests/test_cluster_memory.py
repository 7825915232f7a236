"""HeapTrimmer: malloc_trim at most once per interval."""

from __future__ import annotations

import platform
import time

import pytest

from torus_core.cluster.memory import HeapTrimmer


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trims_run_at_most_once_per_interval() -> None:
    trimmer = HeapTrimmer(interval=0.2)
    assert trimmer.available
    assert trimmer.maybe_trim() is True
    assert trimmer.maybe_trim() is False  # within the interval
    assert trimmer.trims == 1
    time.sleep(0.25)
    assert trimmer.maybe_trim() is True
    assert trimmer.trims == 2


def test_without_malloc_trim_nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    trimmer = HeapTrimmer(interval=0.0)
    monkeypatch.setattr(trimmer, "_trim", None)
    assert not trimmer.available
    assert trimmer.maybe_trim() is False and trimmer.trims == 0
