"""NBD (Network Block Device) server: protocol layer over a pluggable :class:`Export`.

Public API: :class:`NBDServer` / :class:`ServerThread` (server.py), :class:`Export`,
:class:`ExportProvider`, :class:`ExportInfo` (export.py), and the in-memory
:class:`MemoryExport` / :class:`MemoryExportProvider` (memory.py).

Design decisions:

* Data path: ``BufferedStream`` (an asyncio ``BufferedProtocol``) parses requests synchronously
  in ``buffer_updated`` and receives write payloads straight into (pooled) buffers; replies are
  written by the loop thread in completion order (out of order across requests).
* Exports with ``blocking = False`` run on the loop (fastest for memory); others run on a
  ``WorkerPool`` whose completions wake the loop once per batch.
* ``NBD_FLAG_CAN_MULTI_CONN`` is advertised only when ``Export.multi_conn`` is true. A volume
  export may claim it only if all connections to one volume share one open File in this process
  (so a flush on any connection syncs every connection's writes); otherwise leave it false.
* A locked export (``Locked`` from ``open_export``) is refused with ``NBD_REP_ERR_POLICY`` and
  the error's message (who holds it), logged at WARNING; an unknown one with
  ``NBD_REP_ERR_UNKNOWN`` (libnbd words that "server has no export named ...").
* Spec errors: EINVAL for unknown commands/flags, out-of-range reads and oversized payloads
  (which are discarded in 1 MiB chunks, keeping the connection), ENOSPC for modifications past
  the end, EPERM on read-only exports; flush/FUA failures are error replies, never success.
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
