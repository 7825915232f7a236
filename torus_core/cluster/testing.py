"""Compatibility alias: the in-process cluster harness moved to :mod:`torus_core.testing.cluster`.

Test harnesses live under :mod:`torus_core.testing`; this alias goes once nothing imports it.
"""

from torus_core.testing.cluster import *  # noqa: F403
