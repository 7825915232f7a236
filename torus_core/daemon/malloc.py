"""Bound glibc's malloc arenas in a serving process: :func:`limit_malloc_arenas`.

glibc gives each thread that contends for the heap an arena of its own, up to 8 per core. A
peer runs many threads (NBD workers, write-behind workers, one per channel connection, gRPC's
pool) that each allocate and free 512 KiB blocks, so freed memory sits in many arenas that do
not return it: measured in ``bench/cluster.py`` (3 peers R=2, 1 GiB), peak RSS 302 / 147 / 156
MiB with the default, 241 / 112 / 118 MiB with two arenas, throughput within the run's noise.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

#: ``mallopt`` parameter number of M_ARENA_MAX (glibc ``malloc.h``)
M_ARENA_MAX = -8
#: Arenas a torus process uses unless ``MALLOC_ARENA_MAX`` says otherwise.
DEFAULT_ARENAS = 2


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's arenas at ``arenas`` (call before starting threads); True if applied.

    Does nothing when the user set ``MALLOC_ARENA_MAX`` (glibc already honours it) or the C
    library is not glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        # the interpreter's own symbols include its C library: no find_library (which runs
        # ldconfig or a compiler) at start-up
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_ARENA_MAX, arenas) != 1:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
        return False
    return True
