"""torus-template: a block store plugin to copy (see plugins/template/README.md)."""

from torus_template.store import DirBlockStore

__all__ = ["DirBlockStore"]
