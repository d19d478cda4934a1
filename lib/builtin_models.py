"""Names of the built-in models ("toy:..." trained and shipped, "planted:..." hand-weighted) -> (module, tokenizer)."""
from __future__ import annotations

from typing import Any


def build(name: str) -> tuple[Any, Any]:
    kind, _, variant = name.partition(":")
    if kind == "toy":
        from lib import toy

        return toy.load(variant)
    if kind == "planted":
        from lib import planted

        return planted.build(variant)
    raise ValueError(f"unknown built-in model {name!r}: use toy:<name> or planted:<name> (see README)")
