"""Fixtures of the VM tests: one prepared :class:`~torus_core.testing.vm.VM` per session.

The guest (kernel, packages, initramfs) is built into ``.vm-cache/`` on first use; a missing
prerequisite fails the test with a :class:`~torus_core.testing.vm.VMError` naming it.
"""

from __future__ import annotations

import pytest

from torus_core.testing.vm import VM


@pytest.fixture(scope="session")
def vm() -> VM:
    """The project's test VM, prepared (host packages, guest packages, initramfs)."""
    machine = VM()
    machine.prepare()
    return machine
