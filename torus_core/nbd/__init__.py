"""NBD (Network Block Device) server: protocol layer over a pluggable :class:`Export`.

Public API: :class:`NBDServer` / :class:`ServerThread` (server.py), :class:`Export`,
:class:`ExportProvider`, :class:`ExportInfo` (export.py), and the in-memory
:class:`MemoryExport` / :class:`MemoryExportProvider` (memory.py).
"""

from __future__ import annotations

from torus_core.nbd.export import Export, ExportInfo, ExportProvider
from torus_core.nbd.memory import MemoryExport, MemoryExportProvider
from torus_core.nbd.server import NBDServer, ServerThread

__all__ = [
    "Export",
    "ExportInfo",
    "ExportProvider",
    "MemoryExport",
    "MemoryExportProvider",
    "NBDServer",
    "ServerThread",
]
