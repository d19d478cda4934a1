"""The entity-tracking desiderata of Prakash et al. (2024) (Object, Label, Position) and the noise pairs of path
patching, as (original, alternate, target) triples.

    triples = entity_triples("position", 1000, n_boxes=7, seed=0, tokenizer=tok)   # or "object", "label"
    triples = entity_triples("position", 500, variant="no_comma")                  # Table A11, see VARIANTS
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from lib.data.entity import (FILLER, LABELS, OBJECTS, entity_tracking_prompt, random_entity_prompt, usable_labels,
                             usable_objects)
from lib.data.variants import VARIANTS, apply_variant
from lib.types import Prompt, Triple

ENTITY_DESIDERATA = ("object", "label", "position")

def _entity_pair(rng: random.Random, n: int, objects: list[str], labels: list[str],
                 shift: int) -> tuple[Prompt, Prompt]:
    """An original and an alternate whose four candidate answers are four different objects.

    The alternate queries segment p != q with a label that sits in the original at a third segment j, and its
    answer object appears nowhere in the original: original answer o_q, Object target a_p, Label target o_j and
    Position target o_(p+shift) all differ (`shift`: segments a variant will insert before the queried one).
    """
    objs, labs = rng.sample(objects, n), rng.sample(labels, n)
    p = rng.randrange(shift, n) - shift
    q = rng.choice([i for i in range(n) if i != p + shift])
    j = rng.choice([i for i in range(n) if i not in (p + shift, q)])
    rest = [o for o in objects if o not in objs]
    if len(rest) >= n:  # the alternate shares no object with the original
        alt_objs = rng.sample(rest, n)
    else:  # too few objects: only the alternate's answer is guaranteed new
        fresh = rng.choice(rest)
        alt_objs = rng.sample([o for o in objects if o != fresh], n - 1)
        alt_objs.insert(p, fresh)
    others = [lab for lab in labs if lab != labs[j]]
    rng.shuffle(others)
    alt_labs = others[:p] + [labs[j]] + others[p:]
    return entity_tracking_prompt(objs, labs, q), entity_tracking_prompt(alt_objs, alt_labs, p)


def entity_targets(original: Prompt, alternate: Prompt) -> dict[str, str]:
    """The target of each entity desideratum for one (original, alternate) pair, as PAPERS.md defines them."""
    objs, labs = original.meta["objects"], original.meta["labels"]
    alt_label = alternate.meta["labels"][alternate.meta["query"]]
    position = alternate.meta["query"]
    return {
        "object": alternate.answer,
        "label": " " + objs[labs.index(alt_label)] if alt_label in labs else None,
        "position": " " + objs[position] if position < len(objs) else None,
    }


def _distinct(original: Prompt, alternate: Prompt, targets: dict[str, str | None]) -> bool:
    answers = [original.answer, *targets.values()]
    return None not in answers and len(set(answers)) == 4 and alternate.answer.strip() not in original.meta["objects"]


def _entity_pools(tokenizer: Any, objects: Sequence[str] | None, labels: Sequence[str] | None,
                  n_boxes: int, extra: int) -> tuple[list[str], list[str]]:
    if n_boxes < 1:
        raise ValueError(f"n_boxes must be at least 1, got {n_boxes}")
    objs = list(objects) if objects is not None else list(OBJECTS)
    labs = list(labels) if labels is not None else list(LABELS)
    if tokenizer is not None:
        objs = usable_objects(tokenizer, objs, strict=objects is not None)
        labs = usable_labels(tokenizer, labs, strict=labels is not None)
    if len(set(objs)) != len(objs) or len(set(labs)) != len(labs):
        raise ValueError("objects and labels must not repeat")
    if n_boxes + extra > len(labs):
        raise ValueError(f"{n_boxes} boxes (+{extra} for variants) need as many distinct labels, but only "
                         f"{len(labs)} are available: use fewer boxes or pass more labels")
    if n_boxes + 1 + extra > len(objs):
        raise ValueError(f"{n_boxes} boxes need at least {n_boxes + 1 + extra} distinct objects (the alternate's "
                         f"answer must be new to the original), only {len(objs)} available: use fewer boxes "
                         "or pass more objects")
    return objs, labs


def entity_triples(
    desideratum: str,
    n: int,
    *,
    n_boxes: int = 7,
    seed: int = 0,
    tokenizer: Any = None,
    objects: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    variant: str | None = None,
    variant_on: str = "alternate",
    filler: Sequence[str] = FILLER,
) -> list[Triple]:
    """`n` (original, alternate, target) triples of the Object, Label or Position desideratum.

    Object: target = the alternate's answer, an object absent from the original. Label: target = the original's
    object in the box labelled with the alternate's queried label. Position: target = the original's object in
    the segment at the alternate's correct-object segment index. In every triple the original answer and the
    three targets are four different objects, so one run tells the desiderata apart. `variant` (see VARIANTS)
    rewrites the alternate (or, with variant_on="original", the original) and the targets follow the rewritten
    prompts' segments. With a tokenizer, the objects and labels are filtered to single tokens (explicitly given
    ones must all be single tokens). Original texts are unique within the returned list.
    """
    if desideratum not in ENTITY_DESIDERATA:
        raise ValueError(f"unknown entity desideratum {desideratum!r}; valid: {', '.join(ENTITY_DESIDERATA)}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if variant_on not in ("alternate", "original"):
        raise ValueError(f"variant_on must be 'alternate' or 'original', got {variant_on!r}")
    if n_boxes < 3:
        raise ValueError(f"the desiderata need at least 3 boxes (original answer, label and position targets "
                         f"differ), got n_boxes={n_boxes}")
    shift = VARIANTS[variant][1] if variant and variant_on == "alternate" else 0
    extra = 2 if variant in ("extra_segment_start", "extra_segment_end", "extra_boxes_before") else 0
    objs, labs = _entity_pools(tokenizer, objects, labels, n_boxes, extra)
    if shift >= n_boxes:
        raise ValueError(f"variant {variant!r} needs more than {shift} boxes to keep the targets distinct")
    rng = random.Random(seed)
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"could not build {n} distinct {desideratum} triples with {n_boxes} boxes from "
                               f"{len(objs)} objects and {len(labs)} labels: ask for fewer or give more words")
        original, alternate = _entity_pair(rng, n_boxes, objs, labs, shift)
        if variant:
            used_o = set(original.meta["objects"]) | set(alternate.meta["objects"])
            used_l = set(original.meta["labels"]) | set(alternate.meta["labels"])
            spare_o, spare_l = [o for o in objs if o not in used_o], [lab for lab in labs if lab not in used_l]
            if variant_on == "alternate":
                alternate = apply_variant(alternate, variant, rng, spare_o, spare_l, filler)
            else:
                original = apply_variant(original, variant, rng, spare_o, spare_l, filler)
        targets = entity_targets(original, alternate)
        if original.text in seen or not _distinct(original, alternate, targets):
            continue
        seen.add(original.text)
        meta = {"n_boxes": n_boxes, "variant": variant, "variant_on": variant_on if variant else None,
                "targets": targets}
        out.append(Triple(original, alternate, targets[desideratum], desideratum, meta))
    return out


def entity_noise_triples(
    n: int, *, n_boxes: int = 7, seed: int = 0, tokenizer: Any = None,
    objects: Sequence[str] | None = None, labels: Sequence[str] | None = None,
) -> list[Triple]:
    """(original, noise, original answer) for path patching: the noise prompt has the same number of boxes and a
    random query, labels and objects, so its token positions line up with the original's."""
    objs, labs = _entity_pools(tokenizer, objects, labels, n_boxes, 0)
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        original = random_entity_prompt(rng, n_boxes, objs, labs)
        noise = random_entity_prompt(rng, n_boxes, objs, labs)
        if original.text in seen:
            continue
        seen.add(original.text)
        out.append(Triple(original, noise, original.answer, "noise", {"n_boxes": n_boxes}))
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct originals exist for these settings; ask for fewer")
    return out


