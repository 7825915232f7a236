"""The glibc mmap-threshold pin used by the NBD-serving process."""

from __future__ import annotations

import platform

import pytest

from torus_core.block.malloc import pin_mmap_threshold


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_pinning_the_mmap_threshold_is_accepted_by_glibc() -> None:
    assert pin_mmap_threshold() is True
    assert pin_mmap_threshold(256 * 1024) is True
