"""The entity-tracking desiderata of Prakash et al. (2024) (Object, Label, Position), a Structure desideratum, and
the noise pairs of path patching, as (original, alternate, target) triples.

    triples = entity_triples("position", 1000, n_boxes=7, seed=0, tokenizer=tok)   # or "object", "label"
    triples = entity_triples("position", 500, variant="no_comma")                  # Table A11, see VARIANTS
    mine = Desideratum("mine", lambda o, a: ..., positions=("last",))              # a desideratum as data
    triples = entity_triples(mine, 100)

A desideratum is data (`Desideratum`): a name, a function (original, alternate) -> target answer (None: this pair
cannot serve) and the token positions its patches go to. Every triple's original and alternate come from the same
pair generator, so a new desideratum needs no change to lib/.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lib.data.entity import (DEFAULT_TEMPLATE, FILLER, LABELS, OBJECTS, check_template_words, entity_tracking_prompt,
                             random_entity_prompt, usable_labels, usable_objects)
from lib.data.templates import EntityTemplate
from lib.data.variants import A11_VARIANTS, VARIANTS, NotApplicable, apply_variant
from lib.types import Prompt, Triple

ENTITY_DESIDERATA = ("object", "label", "position")
"""The paper's three desiderata (Prakash et al. Sec. 5); DESIDERATA holds these and "structure"."""


@dataclass(frozen=True)
class Desideratum:
    """A desideratum as data.

    name: recorded in each triple. target: (original, alternate) -> the answer patching should produce (a string
    like the prompts' answers, e.g. " apple"), or None where this pair cannot serve. positions: the token positions
    its patches go to, as names or as a function of a prompt (e.g. every label_i). distinct: keep only pairs where
    the target differs from the original's answer and from the paper's three targets, so one run tells them apart.
    """

    name: str
    target: Callable[[Prompt, Prompt], str | None]
    positions: tuple[str, ...] | Callable[[Prompt], Sequence[str]] = ("last",)
    distinct: bool = True
    doc: str = ""

    def position_names(self, prompt: Prompt) -> list[str]:
        """The positions to patch for prompts shaped like `prompt`."""
        return list(self.positions(prompt) if callable(self.positions) else self.positions)


def as_answer(original: Prompt, obj: str) -> str:
    """`obj` written as an answer of the original's wording (its answer prefix, e.g. a leading space)."""
    correct = original.meta["objects"][original.meta["query"]]
    return original.answer[: len(original.answer) - len(correct)] + obj


def _object_target(original: Prompt, alternate: Prompt) -> str:
    return alternate.answer


def _label_target(original: Prompt, alternate: Prompt) -> str | None:
    labs, alt_label = original.meta["labels"], alternate.meta["labels"][alternate.meta["query"]]
    return as_answer(original, original.meta["objects"][labs.index(alt_label)]) if alt_label in labs else None


def _position_target(original: Prompt, alternate: Prompt) -> str | None:
    # the authors' Table A11 variants count the alternate's segment before their rewrite (source_query)
    index = alternate.meta.get("target_segment", alternate.meta.get("source_query", alternate.meta["query"]))
    objs = original.meta["objects"]
    return as_answer(original, objs[index]) if index < len(objs) else None


def _structure_target(original: Prompt, alternate: Prompt) -> str | None:
    slot, alt_objs = original.meta["query"], alternate.meta["objects"]
    return as_answer(original, alt_objs[slot]) if slot < len(alt_objs) else None


def _every_label(prompt: Prompt) -> list[str]:
    return [f"label_{i}" for i in range(len(prompt.meta["labels"]))]


PAPER_POSITIONS = ("last", "query_label", "prev_query_label")  # where the paper's circuit groups are patched
DESIDERATA = {
    "object": Desideratum("object", _object_target, PAPER_POSITIONS,
                          doc="target = the alternate's answer, an object absent from the original"),
    "label": Desideratum("label", _label_target, PAPER_POSITIONS,
                         doc="target = the original's object in the box with the alternate's queried label"),
    "position": Desideratum("position", _position_target, PAPER_POSITIONS,
                            doc="target = the original's object in the alternate's queried segment slot"),
    "structure": Desideratum("structure", _structure_target, _every_label,
                             doc="patch every context label; target = the alternate's object in the slot where "
                                 "the original has its queried label"),
}
"""Built-in desiderata by name: the paper's Object, Label and Position, and Structure."""


def resolve_desideratum(desideratum: str | Desideratum) -> Desideratum:
    """A Desideratum itself or a built-in one by name (ValueError naming the valid names)."""
    if isinstance(desideratum, Desideratum):
        return desideratum
    if desideratum not in DESIDERATA:
        raise ValueError(f"unknown entity desideratum {desideratum!r}; valid: {', '.join(DESIDERATA)} "
                         "(or a Desideratum)")
    return DESIDERATA[desideratum]


def _entity_pair(rng: random.Random, n: int, objects: list[str], labels: list[str],
                 shift: int, template: EntityTemplate | None = None) -> tuple[Prompt, Prompt]:
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
    return (entity_tracking_prompt(objs, labs, q, template),
            entity_tracking_prompt(alt_objs, alt_labs, p, template))


def entity_targets(original: Prompt, alternate: Prompt) -> dict[str, str | None]:
    """The target of each of the paper's entity desiderata for one (original, alternate) pair (PAPERS.md)."""
    return {name: DESIDERATA[name].target(original, alternate) for name in ENTITY_DESIDERATA}


def _distinct(original: Prompt, alternate: Prompt, targets: dict[str, str | None]) -> bool:
    answers = [original.answer, *targets.values()]
    return (None not in answers and len(set(answers)) == len(answers)
            and alternate.meta["objects"][alternate.meta["query"]] not in original.meta["objects"])


def _entity_pools(tokenizer: Any, objects: Sequence[str] | None, labels: Sequence[str] | None,
                  n_boxes: int, extra: int, template: EntityTemplate | None = None) -> tuple[list[str], list[str]]:
    if n_boxes < 1:
        raise ValueError(f"n_boxes must be at least 1, got {n_boxes}")
    t = template or DEFAULT_TEMPLATE
    given_o = objects if objects is not None else t.objects
    given_l = labels if labels is not None else t.labels
    objs = list(given_o) if given_o is not None else list(OBJECTS)
    labs = list(given_l) if given_l is not None else list(LABELS)
    if tokenizer is not None:
        check_template_words(tokenizer, t, objs, labs)
        objs = usable_objects(tokenizer, objs, need=n_boxes + 1 + extra, strict=given_o is not None, template=t)
        labs = usable_labels(tokenizer, labs, need=n_boxes + extra, strict=given_l is not None, template=t)
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


def entity_word_pools(tokenizer: Any, n_boxes: int, template: EntityTemplate | None = None,
                      objects: Sequence[str] | None = None,
                      labels: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """The objects and labels entity prompts draw from: the template's (or the built-in) words, filtered to single
    known tokens where the template puts them when a tokenizer is given (errors name the template's words or the
    dropped ones).

    Returns:
        (objects, labels).
    """
    return _entity_pools(tokenizer, objects, labels, n_boxes, 0, template)


def entity_triples(
    desideratum: str | Desideratum,
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
    template: EntityTemplate | None = None,
) -> list[Triple]:
    """`n` (original, alternate, target) triples of the Object, Label or Position desideratum.

    Object: target = the alternate's answer, an object absent from the original. Label: target = the original's
    object in the box labelled with the alternate's queried label. Position: target = the original's object in
    the segment at the alternate's correct-object segment index. In every triple the original answer and the
    three targets are four different objects, so one run tells the desiderata apart. `desideratum` is a name of
    DESIDERATA ("structure" too) or your own Desideratum. `variant` (see VARIANTS) rewrites the alternate (or,
    with variant_on="original", the original; our_* variants only): the authors' Table A11 variants count the
    Position target before the rewrite, ours in the rewritten prompt. `template` (an EntityTemplate) words the
    prompts; its objects / labels are used when none are given. With a tokenizer, the objects and labels are
    filtered to single tokens in the template's contexts (explicitly given ones must all be single tokens).
    Original texts are unique within the returned list.
    """
    spec = resolve_desideratum(desideratum)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if variant_on not in ("alternate", "original"):
        raise ValueError(f"variant_on must be 'alternate' or 'original', got {variant_on!r}")
    if variant in A11_VARIANTS and (spec.name != "position" or variant_on != "alternate"):
        raise ValueError(f"the authors' Table A11 variant {variant!r} rewrites the alternate of the Position "
                         f"desideratum only (got desideratum {spec.name!r}, variant_on={variant_on!r}); use "
                         f"'our_{variant}' for the other desiderata or for the original")
    if variant is not None and template is not None and not template.is_default:
        raise ValueError(f"variant {variant!r} rewrites the default English prompt; it is not defined for the "
                         f"custom template {template.name!r}")
    if n_boxes < 3:
        raise ValueError(f"the desiderata need at least 3 boxes (original answer, label and position targets "
                         f"differ), got n_boxes={n_boxes}")
    shift = VARIANTS[variant][1] if variant and variant_on == "alternate" else 0
    extra = 2 if variant in ("our_extra_segment_start", "our_extra_segment_end", "our_extra_boxes_before") else 0
    objs, labs = _entity_pools(tokenizer, objects, labels, n_boxes, extra, template)
    if shift >= n_boxes:
        raise ValueError(f"variant {variant!r} needs more than {shift} boxes to keep the targets distinct")
    rng = random.Random(seed)
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"could not build {n} distinct {spec.name} triples with {n_boxes} boxes from "
                               f"{len(objs)} objects and {len(labs)} labels: ask for fewer or give more words")
        original, alternate = _entity_pair(rng, n_boxes, objs, labs, shift, template)
        if variant:
            used_o = set(original.meta["objects"]) | set(alternate.meta["objects"])
            used_l = set(original.meta["labels"]) | set(alternate.meta["labels"])
            spare_o, spare_l = [o for o in objs if o not in used_o], [lab for lab in labs if lab not in used_l]
            try:
                if variant_on == "alternate":
                    alternate = apply_variant(alternate, variant, rng, spare_o, spare_l, filler)
                else:
                    original = apply_variant(original, variant, rng, spare_o, spare_l, filler)
            except NotApplicable:
                continue
        targets = entity_targets(original, alternate)
        if original.text in seen or not _distinct(original, alternate, targets):
            continue
        if spec.name in ENTITY_DESIDERATA and spec is DESIDERATA[spec.name]:
            target = targets[spec.name]
        else:
            target = spec.target(original, alternate)
            if target is None or (spec.distinct and target in (original.answer, *targets.values())):
                continue
            targets = {**targets, spec.name: target}
        seen.add(original.text)
        meta = {"n_boxes": n_boxes, "variant": variant, "variant_on": variant_on if variant else None,
                "targets": targets}
        out.append(Triple(original, alternate, target, spec.name, meta))
    return out


def entity_noise_triples(
    n: int, *, n_boxes: int = 7, seed: int = 0, tokenizer: Any = None,
    objects: Sequence[str] | None = None, labels: Sequence[str] | None = None,
    template: EntityTemplate | None = None,
) -> list[Triple]:
    """(original, noise, original answer) for path patching: the noise prompt has the same number of boxes and a
    random query, labels and objects, so its token positions line up with the original's."""
    objs, labs = _entity_pools(tokenizer, objects, labels, n_boxes, 0, template)
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        original = random_entity_prompt(rng, n_boxes, objs, labs, template)
        noise = random_entity_prompt(rng, n_boxes, objs, labs, template)
        if original.text in seen:
            continue
        seen.add(original.text)
        out.append(Triple(original, noise, original.answer, "noise", {"n_boxes": n_boxes}))
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct originals exist for these settings; ask for fewer")
    return out


