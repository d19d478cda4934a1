"""Table A11 of Prakash et al. (2024): positional variants of the entity-tracking prompt.

Each variant rewrites one prompt (random text, extra segments, another wording...) and keeps its spans and
meta (segments, query) right, so the desiderata's targets follow the rewritten prompt.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lib.data.entity import FILLER, SEGMENT, render_entity_prompt
from lib.types import Prompt

def _pairs(prompt: Prompt) -> list[tuple[str, str]]:
    return list(zip(prompt.meta["objects"], prompt.meta["labels"]))


def _words(rng: random.Random, filler: Sequence[str], n: int) -> str:
    return " ".join(rng.choice(filler) for _ in range(n))


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


def _qlabel(p: Prompt) -> str:
    return p.meta["labels"][p.meta["query"]]


# name -> (how it rewrites a prompt, how many segments it inserts before the queried one); Table A11 of Prakash et al.
VARIANTS = {
    "random_text_start": (_v_random_text_start, 0),      # random words before the context
    "random_text_end": (_v_random_text_end, 0),          # random words between the context and the query
    "extra_tokens_between": (_v_extra_tokens, 0),        # "the apple long day is in Box F"
    "extra_segment_start": (_v_extra_segment_start, 1),  # one more (object, box) segment first
    "extra_segment_end": (_v_extra_segment_end, 0),      # one more segment last
    "extra_boxes_before": (_v_extra_boxes_before, 2),    # two more segments right before the queried one
    "incorrect_box_segment": (_v_incorrect_box_segment, 0),  # one other segment puts its object in a "Bag"
    "box_object_order": (_v_box_object_order, 0),        # "Box F contains the apple"
    "altered_association": (_v_altered_association, 0),  # "the apple belongs to Box F"
    "no_comma": (_v_no_comma, 0),                        # segments joined by a space
    "extra_comma": (_v_extra_comma, 0),                  # "the apple, is in Box F"
}


def apply_variant(prompt: Prompt, name: str, rng: random.Random, spare_objects: Sequence[str] = (),
                  spare_labels: Sequence[str] = (), filler: Sequence[str] = FILLER) -> Prompt:
    """The prompt rewritten by one of Table A11's variants; spans and meta (segments, query) stay right.

    spare_objects / spare_labels: unused objects and labels for the variants that add segments.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    spare_o, spare_l = list(spare_objects), list(spare_labels)
    rng.shuffle(spare_o)
    rng.shuffle(spare_l)
    out = VARIANTS[name][0](prompt, _VariantContext(rng, spare_o, spare_l, filler))
    out.meta["variant"] = name
    return out


