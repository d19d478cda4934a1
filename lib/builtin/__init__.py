"""The built-in models, by name: "toy:<name>" (small Llamas trained here, shipped in lib/builtin/toy_models) and
"planted:<variant>" (GPT-2 models with hand-set weights and a known circuit, built in memory).

`build(name)` gives (module, tokenizer); `saved_dir(name)` the directory a self-hosted NDIF serves it from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

PREFIXES = ("toy:", "planted:")
ROOT = Path(__file__).resolve().parents[2]
NDIF_MODELS = ROOT / ".ndif" / "models"   # where `make ndif-up` saves the planted models it deploys


def is_builtin(name: Any) -> bool:
    """Whether `name` names a built-in model ("toy:..." or "planted:...")."""
    return isinstance(name, str) and name.startswith(PREFIXES)


def build(name: str) -> tuple[Any, Any]:
    """(frozen transformers module, tokenizer) of a built-in model."""
    kind, _, variant = name.partition(":")
    if kind == "toy":
        from lib.builtin import toy

        return toy.load(variant)
    if kind == "planted":
        from lib.builtin import planted

        return planted.build(variant)
    raise ValueError(f"unknown built-in model {name!r}: use toy:<name> or planted:<name> (see README)")


def config(name: str) -> Any:
    """The transformers config of a built-in model, without building or loading its weights."""
    kind, _, variant = name.partition(":")
    if kind == "toy":
        from transformers import AutoConfig

        from lib.builtin import toy

        if variant not in toy.NAMES:
            raise ValueError(f"unknown toy model {variant!r}; the built-in ones are {', '.join(toy.NAMES)}")
        return AutoConfig.from_pretrained(Path(__file__).resolve().parent / "toy_models" / variant)
    if kind == "planted":
        from lib.builtin import planted

        return planted.model_config(variant)
    raise ValueError(f"unknown built-in model {name!r}: use toy:<name> or planted:<name> (see README)")


def saved_dir(name: str) -> Path:
    """A built-in model's saved directory, as `make ndif-up` deploys it: lib/builtin/toy_models/<name> for toy:<name>,
    .ndif/models/planted-<variant> (written by ndif/make_models.py) for planted:<variant>."""
    kind, _, variant = name.partition(":")
    if kind == "toy":
        path = Path(__file__).resolve().parent / "toy_models" / variant
    else:
        path = NDIF_MODELS / f"planted-{variant}"
    if not (path / "config.json").exists():
        raise ValueError(f"{name} has no saved copy at {path} to serve remotely: `make ndif-up` writes and deploys "
                         "the built-in models it knows (ndif/make_models.py); on the public NDIF use a hub id")
    return path
