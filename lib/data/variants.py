"""Table A11 of Prakash et al. (2024): positional variants of the entity-tracking prompt, two sets.

`A11_VARIANTS`, as the authors' code (Nix07/finetuning) builds them (PAPERS.md section 3): only the alternate is
rewritten, only for the Position desideratum, with their exact texts, and the target is the original's object at
the alternate's queried segment index *before* the rewrite (meta["source_query"]; "incorrect_box_segment" is their
control whose target is the next segment's object). Not copied: their box_object_altered_order's stray commas
around a first or last segment.

`OUR_VARIANTS` ("our_*"), this project's earlier set: random filler words, every segment rewritten, usable on
either prompt and with every desideratum, targets counted in the rewritten prompt.

Each variant rewrites one prompt and keeps its spans and meta (segments, query) right. Both sets are written for
the default English wording (lib.data.templates.EntityTemplate()).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lib.data.entity import FILLER, SEGMENT, render_entity_prompt
from lib.types import Prompt


class NotApplicable(ValueError):
    """The variant cannot rewrite this prompt (e.g. its fixed extra segment's object is already in it)."""


def _pairs(prompt: Prompt) -> list[tuple[str, str]]:
    return list(zip(prompt.meta["objects"], prompt.meta["labels"]))


def _words(rng: random.Random, filler: Sequence[str], n: int) -> str:
    return " ".join(rng.choice(filler) for _ in range(n))


def _qlabel(p: Prompt) -> str:
    return p.meta["labels"][p.meta["query"]]


@dataclass
class _VariantContext:
    rng: random.Random
    spare_objects: list[str]  # objects in neither prompt of the triple, for extra segments
    spare_labels: list[str]
    filler: Sequence[str]

    def segment(self) -> tuple[str, str]:
        if not self.spare_objects or not self.spare_labels:
            raise ValueError("an extra segment needs an object and a label used nowhere else in the triple: "
                             "pass more objects / labels or use fewer boxes")
        return self.spare_objects.pop(), self.spare_labels.pop()


# ---- the authors' Table A11 (Nix07/finetuning), Position desideratum, alternate only ---------------------------

AUTHORS_SEGMENT = ("apple", "O")  # their fixed extra segment "The apple is in Box O"


def _queried(p: Prompt, segment: str) -> list[str]:
    """Segment texts with only the queried segment rewritten."""
    templates = [SEGMENT] * len(p.meta["objects"])
    templates[p.meta["query"]] = segment
    return templates


def _fixed_segment(p: Prompt) -> tuple[str, str]:
    obj, label = AUTHORS_SEGMENT
    if obj in p.meta["objects"] or label in p.meta["labels"]:
        raise NotApplicable(f"the fixed segment {AUTHORS_SEGMENT} is already in the prompt")
    return obj, label


def _a_random_text_start(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), prefix="There are a bunch of boxes containing objects, ",
                                capitalize=False)


def _a_random_text_end(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), suffix=", these are a bunch of boxes containing objects")


def _a_extra_tokens(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), templates=_queried(p, "the {object} is contained in the "
                                                                              "Box {label}"))


def _a_extra_segment_start(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt([_fixed_segment(p), *_pairs(p)], _qlabel(p))


def _a_extra_segment_end(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt([*_pairs(p), _fixed_segment(p)], _qlabel(p))


def _a_extra_boxes_before(p: Prompt, c: _VariantContext) -> Prompt:
    extra = "there are three additional boxes, Box PP, Box BB and Box AA, "
    return render_entity_prompt(_pairs(p), _qlabel(p), templates=_queried(p, extra + SEGMENT))


def _a_incorrect_box_segment(p: Prompt, c: _VariantContext) -> Prompt:
    out = render_entity_prompt(_pairs(p), _qlabel(p))  # the text is unchanged; the target moves (see module doc)
    out.meta["target_segment"] = (p.meta["query"] + 1) % len(p.meta["objects"])
    return out


def _a_box_object_order(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), templates=_queried(p, "Box {label} contains the {object}"))


def _a_altered_association(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), templates=_queried(p, "the {object} is not in Box {label}"))


def _a_no_comma(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), sep=" ")


def _a_extra_comma(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), templates=[SEGMENT.replace(" is", ", is")] * len(_pairs(p)))


# ---- this project's earlier variants ----------------------------------------------------------------------------


def _v_random_text_start(p: Prompt, c: _VariantContext) -> Prompt:
    words = _words(c.rng, c.filler, 5)
    return render_entity_prompt(_pairs(p), _qlabel(p), prefix=words[0].upper() + words[1:] + ". ")


def _v_random_text_end(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), interlude=" " + _words(c.rng, c.filler, 5) + ".")


def _every_segment(p: Prompt, template: str) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), templates=[template] * len(p.meta["objects"]))


def _v_extra_tokens(p: Prompt, c: _VariantContext) -> Prompt:
    return _every_segment(p, "the {object} " + _words(c.rng, c.filler, 2) + " is in Box {label}")


def _v_extra_segment_start(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt([c.segment(), *_pairs(p)], _qlabel(p))


def _v_extra_segment_end(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt([*_pairs(p), c.segment()], _qlabel(p))


def _v_extra_boxes_before(p: Prompt, c: _VariantContext) -> Prompt:
    pairs, q = _pairs(p), p.meta["query"]
    return render_entity_prompt(pairs[:q] + [c.segment(), c.segment()] + pairs[q:], _qlabel(p))


def _v_incorrect_box_segment(p: Prompt, c: _VariantContext) -> Prompt:
    pairs, q = _pairs(p), p.meta["query"]
    other = c.rng.choice([i for i in range(len(pairs)) if i != q])
    templates = [SEGMENT] * len(pairs)
    templates[other] = "the {object} is in Bag {label}"
    return render_entity_prompt(pairs, _qlabel(p), templates=templates)


def _v_box_object_order(p: Prompt, c: _VariantContext) -> Prompt:
    return _every_segment(p, "Box {label} contains the {object}")


def _v_altered_association(p: Prompt, c: _VariantContext) -> Prompt:
    return _every_segment(p, "the {object} belongs to Box {label}")


def _v_no_comma(p: Prompt, c: _VariantContext) -> Prompt:
    return render_entity_prompt(_pairs(p), _qlabel(p), sep=" ")


def _v_extra_comma(p: Prompt, c: _VariantContext) -> Prompt:
    return _every_segment(p, "the {object}, is in Box {label}")


# name -> (how it rewrites a prompt, how many segments it inserts before the queried one)
A11_VARIANTS = {
    "random_text_start": (_a_random_text_start, 0),          # "There are a bunch of boxes containing objects, the ..."
    "random_text_end": (_a_random_text_end, 0),              # "..., these are a bunch of boxes containing objects."
    "extra_tokens_between": (_a_extra_tokens, 0),            # queried segment: "the X is contained in the Box L"
    "extra_segment_start": (_a_extra_segment_start, 0),      # "The apple is in Box O, the ..."
    "extra_segment_end": (_a_extra_segment_end, 0),          # "..., the apple is in Box O."
    "extra_boxes_before": (_a_extra_boxes_before, 0),        # "there are three additional boxes, Box PP, ..." first
    "incorrect_box_segment": (_a_incorrect_box_segment, 0),  # control: target = the next segment's object
    "box_object_order": (_a_box_object_order, 0),            # queried segment: "Box L contains the X"
    "altered_association": (_a_altered_association, 0),      # queried segment: "the X is not in Box L"
    "no_comma": (_a_no_comma, 0),                            # segments joined by a space
    "extra_comma": (_a_extra_comma, 0),                      # every segment: "the X, is in Box L"
}
"""Table A11 as the authors' code builds it (Position desideratum, alternate only, pre-insertion targets)."""

OUR_VARIANTS = {
    "our_random_text_start": (_v_random_text_start, 0),      # five random filler words before the context
    "our_random_text_end": (_v_random_text_end, 0),          # five filler words between the context and the query
    "our_extra_tokens_between": (_v_extra_tokens, 0),        # "the apple long day is in Box F", every segment
    "our_extra_segment_start": (_v_extra_segment_start, 1),  # one more (object, box) segment first, fresh words
    "our_extra_segment_end": (_v_extra_segment_end, 0),      # one more segment last
    "our_extra_boxes_before": (_v_extra_boxes_before, 2),    # two more segments right before the queried one
    "our_incorrect_box_segment": (_v_incorrect_box_segment, 0),  # one other segment puts its object in a "Bag"
    "our_box_object_order": (_v_box_object_order, 0),        # "Box F contains the apple", every segment
    "our_altered_association": (_v_altered_association, 0),  # "the apple belongs to Box F", every segment
    "our_no_comma": (_v_no_comma, 0),                        # segments joined by a space
    "our_extra_comma": (_v_extra_comma, 0),                  # "the apple, is in Box F"
}
"""This project's variants: any desideratum, either prompt, targets counted in the rewritten prompt."""

VARIANTS = {**A11_VARIANTS, **OUR_VARIANTS}


def apply_variant(prompt: Prompt, name: str, rng: random.Random, spare_objects: Sequence[str] = (),
                  spare_labels: Sequence[str] = (), filler: Sequence[str] = FILLER) -> Prompt:
    """The prompt rewritten by one of the variants; spans and meta (segments, query) stay right. The authors'
    variants keep the queried segment's index before the rewrite in meta["source_query"] (their Position target).

    spare_objects / spare_labels: unused objects and labels for the variants that add segments.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    spare_o, spare_l = list(spare_objects), list(spare_labels)
    rng.shuffle(spare_o)
    rng.shuffle(spare_l)
    out = VARIANTS[name][0](prompt, _VariantContext(rng, spare_o, spare_l, filler))
    out.meta["variant"] = name
    if name in A11_VARIANTS:
        out.meta["source_query"] = prompt.meta["query"]
    return out
