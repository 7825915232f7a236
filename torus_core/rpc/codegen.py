"""Regenerate ``torus_storage_pb2.py`` / ``torus_storage_pb2_grpc.py`` from ``torus_storage.proto``.

Run from anywhere (the generated modules are checked in)::

    .venv/bin/python -m torus_core.rpc.codegen

which is equivalent to, from the repository root::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \\
        torus_core/rpc/torus_storage.proto

Using the repository root as the include path makes the generated gRPC module import
``from torus_core.rpc import torus_storage_pb2`` (a package-absolute import).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = "torus_core/rpc/torus_storage.proto"
_MYPY_MARK = "# mypy: ignore-errors\n"


def main() -> int:
    """Run protoc through grpc_tools; returns its exit status."""
    from grpc_tools import protoc  # imported lazily: a development-only dependency

    root = Path(__file__).resolve().parents[2]
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        str(root / PROTO),
    ]
    status = int(protoc.main(args))
    if status == 0:
        # The generated gRPC module has no annotations; keep the project's mypy run clean.
        grpc_module = root / "torus_core/rpc/torus_storage_pb2_grpc.py"
        text = grpc_module.read_text()
        if not text.startswith(_MYPY_MARK):
            grpc_module.write_text(_MYPY_MARK + text)
    return status


if __name__ == "__main__":
    sys.exit(main())
