"""torus: a distributed, replicated block store.

Public names: :data:`hookimpl` for plugins, and :data:`__version__`.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations (``@torus_core.hookimpl``).
hookimpl = pluggy.HookimplMarker("torus")

__all__ = ["__version__", "hookimpl"]
