"""Triples on disk (JSONL) and disjoint splits."""
from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path

from lib.types import Prompt, Triple

def _prompt_from_dict(d: dict) -> Prompt:
    return Prompt(d["text"], d["answer"], {k: tuple(v) for k, v in d["spans"].items()}, d.get("meta", {}))


def triple_to_dict(triple: Triple) -> dict:
    """A triple as JSON-ready data."""
    return dataclasses.asdict(triple)


def triple_from_dict(d: dict) -> Triple:
    """The inverse of triple_to_dict."""
    return Triple(_prompt_from_dict(d["original"]), _prompt_from_dict(d["alternate"]), d["target"],
                  d["desideratum"], d.get("meta", {}))


def save_triples(triples: Sequence[Triple], path: str | Path) -> Path:
    """One JSON object per line; `load_triples` gives back equal triples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for t in triples:
            f.write(json.dumps(triple_to_dict(t)) + "\n")
    return path


def load_triples(path: str | Path) -> list[Triple]:
    """The triples of a JSONL file written by save_triples."""
    with Path(path).open() as f:
        return [triple_from_dict(json.loads(line)) for line in f if line.strip()]


def split_triples(
    triples: Sequence[Triple], sizes: Sequence[float | int] = (0.8, 0.1, 0.1), seed: int = 0
) -> list[list[Triple]]:
    """Disjoint splits (e.g. train / validation / test) in which no original text occurs in two splits.

    sizes: fractions (summing to at most 1) or counts of triples. Triples sharing an original text stay together,
    so a split can come out slightly larger than asked; the last split gets what the others leave when the
    fractions sum to 1.
    """
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be non-negative fractions or counts, got {sizes}")
    n = len(triples)
    if all(isinstance(s, int) for s in sizes):
        counts = list(sizes)
    else:
        if sum(sizes) > 1 + 1e-9:
            raise ValueError(f"fractions {sizes} sum to more than 1; give fractions summing to <= 1 or integer counts")
        counts = [round(s * n) for s in sizes]
        if abs(sum(sizes) - 1) < 1e-9:
            counts[-1] = n - sum(counts[:-1])
    if sum(counts) > n:
        raise ValueError(f"splits of {counts} need {sum(counts)} triples but only {n} were given: generate more")
    groups: dict[str, list[Triple]] = {}
    for t in triples:
        groups.setdefault(t.original.text, []).append(t)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    splits: list[list[Triple]] = [[] for _ in counts]
    i = 0
    for key in keys:
        while i < len(counts) and len(splits[i]) >= counts[i]:
            i += 1
        if i == len(counts):
            break
        splits[i].extend(groups[key])
    return splits


