#!/usr/bin/env python3
"""Turn this template into a new block store plugin: ``new_plugin.py NAME [DEST_DIR]``.

Copies ``plugins/template`` to ``DEST_DIR/torus_blockstore_NAME`` (default: ``plugins/``) and
renames the package (``torus_blockstore_NAME``), the distribution (``torus-blockstore-NAME``),
the entry point and the registered store name (``NAME``). Then::

    .venv/bin/pip install -e plugins/torus_blockstore_NAME
    .venv/bin/pytest -q plugins/torus_blockstore_NAME/tests
    torusd --block-store NAME ...
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent
SKIP = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache", "new_plugin.py")


def scaffold(name: str, dest_dir: Path) -> Path:
    """Create the plugin and return its directory; ValueError for a bad name or existing target."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "template":
        raise ValueError(f"plugin name must match [a-z][a-z0-9_]* and not be 'template', got {name!r}")
    package, dist = f"torus_blockstore_{name}", f"torus-blockstore-{name.replace('_', '-')}"
    target = dest_dir / package
    if target.exists():
        raise ValueError(f"{target} already exists")
    shutil.copytree(TEMPLATE, target, ignore=SKIP)
    (target / "torus_template").rename(target / package)
    for path in target.rglob("*"):
        if path.suffix not in (".py", ".toml", ".md"):
            continue
        text = path.read_text(encoding="utf-8")
        text = text.replace("torus_template", package).replace("torus-template", dist)
        text = text.replace('"template"', f'"{name}"').replace("\ntemplate = ", f"\n{name} = ")
        path.write_text(text, encoding="utf-8")
    return target


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[2]) if len(argv) == 3 else TEMPLATE.parent
    try:
        target = scaffold(argv[1], dest)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
