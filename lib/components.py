"""What a component is (an attention head or an MLP at a layer) and where its output lives in a traced model."""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from lib.architectures import Architecture

_NAME = re.compile(r"^(?:L(?P<layer>\d+)H(?P<head>\d+)|MLP(?P<mlp>\d+))$")


@dataclass(frozen=True, order=True)
class Component:
    """A head (layer, head) or an MLP (layer, head=None). Printed as L12H3 / MLP27."""

    layer: int
    head: int | None = None

    @property
    def is_head(self) -> bool:
        return self.head is not None

    @property
    def kind(self) -> str:
        return "head" if self.is_head else "mlp"

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}" if self.is_head else f"MLP{self.layer}"

    @classmethod
    def parse(cls, name: str) -> "Component":
        match = _NAME.match(name.strip())
        if not match:
            raise ValueError(f"bad component name {name!r}: write a head as L<layer>H<head> (L12H3), an MLP as MLP<layer>")
        if match["mlp"] is not None:
            return cls(int(match["mlp"]))
        return cls(int(match["layer"]), int(match["head"]))

    def check(self, arch: Architecture) -> "Component":
        """Raise if the component does not exist in this model."""
        if not 0 <= self.layer < arch.n_layers:
            raise ValueError(f"{self}: layer {self.layer} out of range, the model has {arch.n_layers} layers")
        if self.is_head and not 0 <= self.head < arch.n_heads:
            raise ValueError(f"{self}: head {self.head} out of range, the model has {arch.n_heads} heads per layer")
        return self


def parse_components(names: Iterable[str] | str) -> list[Component]:
    """Parse "L0H1,MLP2" or ["L0H1", "MLP2"]."""
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
    """Sort so a trace visits them in the order the forward pass computes them."""
    return sorted(set(components), key=lambda c: (c.layer, 0 if c.is_head else 1, c.head or 0))


def by_layer(components: Iterable[Component]) -> dict[int, dict[str, list[Component]]]:
    """{layer: {"head": [...], "mlp": [...]}} in execution order; traces touch each module once per layer."""
    grouped: dict[int, dict[str, list[Component]]] = defaultdict(lambda: {"head": [], "mlp": []})
    for comp in execution_order(components):
        grouped[comp.layer][comp.kind].append(comp)
    return dict(grouped)


def format_components(components: Iterable[Component]) -> str:
    return ",".join(str(c) for c in execution_order(components))
