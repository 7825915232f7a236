"""torus persistent block store: slab file plus checksummed index, crash-safe."""

from torus_blockstore_file.store import FileBlockStore, FileStoreOptions

__all__ = ["FileBlockStore", "FileStoreOptions"]
