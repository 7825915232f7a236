"""Compatibility alias: the process harness moved to :mod:`torus_core.testing.procs`.

Test harnesses live under :mod:`torus_core.testing`; this alias goes once nothing imports it.
"""

from torus_core.testing.procs import *  # noqa: F403
