"""Noise prompts for path patching: what a sender's output is replaced by.

Two kinds, both (original, noise, original answer) triples whose noise prompt has the original's template and
token length, so token index t plays the same role in both:

- "random": a fresh random entity prompt (random objects, labels and query), lib.data.desiderata's
  `entity_noise_triples` (this project's first choice).
- "absent_query": as the authors' path-patching code (Nix07/finetuning, `box_index_aligner_examples` with
  alt_examples): a random example queried at **another slot** than the original, whose query label is then
  replaced by a random letter **absent from its context**, so the noise prompt asks for a box that does not
  exist. Their letter is usually absent; here it always is.

    triples = path_patching_noise("absent_query", 300, n_boxes=7, seed=0, tokenizer=tok)
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal, get_args

from lib.data.desiderata import entity_noise_triples
from lib.data.entity import LABELS, OBJECTS, entity_tracking_prompt, random_entity_prompt, usable_labels, usable_objects
from lib.types import Prompt, Triple

NoiseKind = Literal["random", "absent_query"]
"""How path patching's noise prompt is built: "random" (a random prompt) or "absent_query" (the authors': a random
example at another query slot, its query label replaced by a letter absent from its context)."""
NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)


def _absent_query_prompt(rng: random.Random, n_boxes: int, objects: Sequence[str], labels: Sequence[str],
                         avoid_slot: int) -> Prompt:
    """A random prompt queried at a slot other than `avoid_slot`, its query label replaced by an absent letter.

    The spans of the boxes, "query_label" and "last" are kept; "prev_query_label" and "correct_object" are dropped
    (the query names no box). `answer` is the object of the slot the prompt was drawn at, only so the prompt has a
    one-token answer; the noise prompt has no correct answer.
    """
    objs, labs = rng.sample(list(objects), n_boxes), rng.sample(list(labels), n_boxes)
    slot = rng.choice([i for i in range(n_boxes) if i != avoid_slot])
    base = entity_tracking_prompt(objs, labs, slot)
    absent = rng.choice([lab for lab in labels if lab not in labs])
    start, end = base.spans["query_label"]
    text = base.text[:start] + absent + base.text[end:]
    shift = len(absent) - (end - start)
    spans = {}
    for name, (s, e) in base.spans.items():
        if name in ("prev_query_label", "correct_object"):
            continue
        if name == "query_label":
            spans[name] = (s, start + len(absent))
        else:
            spans[name] = (s, e) if s < start else (s + shift, e + shift)
    meta = {"objects": objs, "labels": labs, "query": None, "slot": slot, "absent_label": absent}
    return Prompt(text=text, answer=base.answer, spans=spans, meta=meta)


def absent_query_noise_triples(
    n: int, *, n_boxes: int = 7, seed: int = 0, tokenizer: Any = None,
    objects: Sequence[str] | None = None, labels: Sequence[str] | None = None,
) -> list[Triple]:
    """`n` (original, noise, original answer) triples with the authors' noise (see the module docstring).

    Args:
        n: number of triples; originals are distinct.
        n_boxes: boxes per prompt (at least 2, so there is another slot).
        tokenizer: keep only objects and labels that are one token for it.
        objects, labels: the word pools (default: lib.data.entity's).

    Returns:
        Triples with desideratum "noise"; target = the original's answer.
    """
    if n_boxes < 2:
        raise ValueError(f"the absent-query noise queries another slot than the original: n_boxes must be at least "
                         f"2, got {n_boxes}")
    objs = list(objects) if objects is not None else list(OBJECTS)
    labs = list(labels) if labels is not None else list(LABELS)
    if tokenizer is not None:
        objs = usable_objects(tokenizer, objs, strict=objects is not None)
        labs = usable_labels(tokenizer, labs, strict=labels is not None)
    if len(labs) < n_boxes + 1 or len(objs) < n_boxes:
        raise ValueError(f"{n_boxes} boxes and an absent query letter need {n_boxes + 1} labels and {n_boxes} objects, "
                         f"got {len(labs)} labels and {len(objs)} objects: use fewer boxes or pass more words")
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        original = random_entity_prompt(rng, n_boxes, objs, labs)
        noise = _absent_query_prompt(rng, n_boxes, objs, labs, original.meta["query"])
        if original.text in seen:
            continue
        seen.add(original.text)
        out.append(Triple(original, noise, original.answer, "noise", {"n_boxes": n_boxes, "noise": "absent_query"}))
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct originals exist for these settings; ask for fewer")
    return out


def path_patching_noise(kind: NoiseKind, n: int, **kwargs: Any) -> list[Triple]:
    """Noise triples of path patching of one kind (NOISE_KINDS); kwargs as `absent_query_noise_triples`
    (n_boxes, seed, tokenizer, objects, labels)."""
    if kind == "random":
        return entity_noise_triples(n, **kwargs)
    if kind == "absent_query":
        return absent_query_noise_triples(n, **kwargs)
    raise ValueError(f"unknown noise kind {kind!r}: use one of {', '.join(NOISE_KINDS)}")
