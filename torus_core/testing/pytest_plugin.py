"""pytest plugin with torus's shared fixtures and options.

Enabled for this repository through ``addopts = -p torus_core.testing.pytest_plugin``; plugin
authors opt in with ``pytest_plugins = ["torus_core.testing.pytest_plugin"]``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "nightly",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Live-server fixtures (etcd_server, redis_server) for the metadata backends' tests.
from torus_core.testing.services import etcd_server, redis_server  # noqa: E402, F401
