"""Serve an in-memory export over NBD: ``python -m torus_core.nbd.memory_server --port P --size 1G``.

Used by ``bench/nbd.py`` and for manual experiments. Prints ``LISTENING <port>`` once bound and
runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from torus_core.nbd.memory import MemoryExportProvider
from torus_core.nbd.server import NBDServer
from torus_core.units import parse_size


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=10809)
    p.add_argument("--size", default="1GiB", help="export size, e.g. 1G, 512MiB")
    p.add_argument("--name", default="mem", help="export name (also the default export)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--blocking", action="store_true", help="run export calls in worker threads")
    return p


async def _main(args: argparse.Namespace) -> None:
    provider = MemoryExportProvider(blocking=args.blocking)
    provider.add(args.name, parse_size(args.size), read_only=args.read_only)
    server = NBDServer(provider, host=args.host, port=args.port)
    await server.start()
    print(f"LISTENING {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(server.serve_forever())
    await stop.wait()
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    await server.close(timeout=5.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    asyncio.run(_main(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
