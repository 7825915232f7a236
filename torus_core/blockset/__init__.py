"""Blockset layers: per-file index from block number to stored blocks.

Public API: :class:`Blockset` (the layer contract), :func:`create_blockset` (from a spec string
like ``"crc,base"``), :func:`unmarshal_blockset` (from an INode's ``(kind, content)`` layers),
:func:`parse_spec`, :data:`DEFAULT_BLOCK_SPEC`. Each takes the blockset-layer registry to
resolve layers with (the process's, or :func:`default_layer_registry`: the built-in layers only).
"""

from torus_core.blockset.layer import Blockset
from torus_core.blockset.spec import (
    DEFAULT_BLOCK_SPEC,
    LayerSpec,
    create_blockset,
    default_layer_registry,
    format_spec,
    parse_spec,
    unmarshal_blockset,
)

__all__ = [
    "DEFAULT_BLOCK_SPEC",
    "Blockset",
    "LayerSpec",
    "create_blockset",
    "default_layer_registry",
    "format_spec",
    "parse_spec",
    "unmarshal_blockset",
]
