"""Blockset spec strings (``"crc,base"``, ``"rep=3,crc,base"``) and stack construction.

A spec lists layers outer → inner, comma-separated, each ``name`` or ``name=option``. If the
innermost layer is not ``base``, ``base`` is appended (as the original's ``init`` did).
Layers are looked up by name (or alias) in a blockset-layer registry, which every function here
takes: the process's (``Registries.blockset_layers``, built at the composition root), or
:func:`default_layer_registry` (the built-in layers only) in tests and plugin-free tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torus_core.blockset.layer import Blockset
from torus_core.blockstore import BlockStore
from torus_core.errors import InvalidArgument
from torus_core.registry import Registry, cached_builtin_registry

#: The original's default block spec.
DEFAULT_BLOCK_SPEC = "crc,base"


@dataclass(frozen=True)
class LayerSpec:
    """One parsed layer: its canonical name, the class, and the option text (or None)."""

    name: str
    cls: type[Blockset]
    option: str | None = None

    def __str__(self) -> str:
        return self.name if self.option is None else f"{self.name}={self.option}"


def default_layer_registry() -> Registry:
    """A registry holding only the built-in layers (base, crc, rep); built once and shared."""
    from torus_core.blockset import builtin

    return cached_builtin_registry(
        "blockset layer", "builtin-blockset", builtin.torus_register_blockset_layers
    )


def _lookup(name: str, reg: Registry) -> type[Blockset]:
    for registered, cls in reg.subclasses(Blockset):
        if registered == name or name in cls.aliases:
            return cls
    raise InvalidArgument(f"unknown blockset layer {name!r}; known layers: {', '.join(reg.names())}")


def layer_class_by_kind(kind: int, registry: Registry) -> type[Blockset]:
    """The layer class with numeric ``kind``; InvalidArgument if none is registered."""
    for _name, cls in registry.subclasses(Blockset):
        if cls.kind == kind:
            return cls
    raise InvalidArgument(f"unknown blockset layer kind {kind}")


def parse_spec(spec: str, registry: Registry) -> list[LayerSpec]:
    """Parse a spec string into layers, outermost first, with ``base`` appended if missing."""
    if not isinstance(spec, str):
        raise InvalidArgument(f"blockset spec must be a string, got {type(spec).__name__}")
    reg = registry
    out: list[LayerSpec] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            if spec.strip():
                raise InvalidArgument(f"empty layer name in blockset spec {spec!r}")
            continue
        name, sep, option = part.partition("=")
        cls = _lookup(name.strip().lower(), reg)
        out.append(LayerSpec(cls.name, cls, option.strip() if sep else None))
    if not out or out[-1].cls.kind != 0:
        out.append(LayerSpec("base", layer_class_by_kind(0, reg)))
    for layer in out[:-1]:
        if layer.cls.kind == 0:
            raise InvalidArgument(f"the base layer must be innermost in blockset spec {spec!r}")
    return out


def format_spec(layers: Sequence[LayerSpec]) -> str:
    """The spec string of parsed layers."""
    return ",".join(str(layer) for layer in layers)


def create_blockset(spec: str | Sequence[LayerSpec], store: BlockStore, registry: Registry) -> Blockset:
    """Build an empty blockset stack from a spec; returns the outermost layer.

    ``registry`` resolves the layer names of a spec string (parsed layers carry their classes).
    """
    layers = parse_spec(spec, registry) if isinstance(spec, str) else list(spec)
    cur: Blockset | None = None
    for layer in reversed(layers):
        cur = layer.cls(store, cur, layer.option)
    assert cur is not None
    return cur


def unmarshal_blockset(
    layers: Sequence[tuple[int, bytes]], store: BlockStore, registry: Registry
) -> Blockset:
    """Rebuild a stack from ``(kind, content)`` pairs, outermost first (Go: UnmarshalFromProto)."""
    if not layers:
        raise InvalidArgument("an INode must hold at least one blockset layer")
    cur: Blockset | None = None
    for kind, content in reversed(list(layers)):
        cls = layer_class_by_kind(kind, registry)
        if (cls.kind == 0) != (cur is None):
            raise InvalidArgument("stored blockset layers must end with exactly one base layer")
        cur = cls.from_content(store, cur, bytes(content))
    assert cur is not None
    return cur
