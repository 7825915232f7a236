"""The glibc arena limit used by the NBD-serving process."""

from __future__ import annotations

import platform

import pytest

from torus_core.block.malloc import limit_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_limiting_malloc_arenas_is_accepted_by_glibc() -> None:
    assert limit_arenas(1) is True
    assert limit_arenas(2) is True
