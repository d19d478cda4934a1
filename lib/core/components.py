"""Enumerating, ordering and naming components (attention heads and MLPs) of a model.

The `Component` type itself is in lib.types; this module knows how many a model has and in which order a
forward pass computes them.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from lib.core.architectures import Architecture
from lib.types import Component


def parse_components(names: Iterable[str] | str) -> list[Component]:
    """Components from "L0H1,MLP2" or ["L0H1", "MLP2"]."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    return [Component.parse(n) for n in names]


def all_components(arch: Architecture, heads: bool = True, mlps: bool = True) -> list[Component]:
    """Every head and/or MLP, in execution order (layer by layer, heads before the layer's MLP)."""
    out = []
    for layer in range(arch.n_layers):
        if heads:
            out.extend(Component(layer, h) for h in range(arch.n_heads))
        if mlps:
            out.append(Component(layer))
    return out


def execution_order(components: Iterable[Component]) -> list[Component]:
    """The distinct components sorted as the forward pass computes them (a trace must visit them in this order)."""
    return sorted(set(components), key=lambda c: (c.layer, 0 if c.is_head else 1, c.head or 0))


def by_layer(components: Iterable[Component]) -> dict[int, dict[str, list[Component]]]:
    """{layer: {"head": [...], "mlp": [...]}} in execution order; traces touch each module once per layer."""
    grouped: dict[int, dict[str, list[Component]]] = defaultdict(lambda: {"head": [], "mlp": []})
    for comp in execution_order(components):
        grouped[comp.layer][comp.kind].append(comp)
    return dict(grouped)


def format_components(components: Iterable[Component]) -> str:
    """ "L0H1,L1H3,MLP1": the components in execution order, comma-separated (parse_components reads it back)."""
    return ",".join(str(c) for c in execution_order(components))
