"""Entity-tracking prompts of Prakash et al. (2024): the words, the rendering with named spans, and which words a
tokenizer keeps as one token.

"The apple is in Box F, the cup is in Box Q. Box F contains the" -> " apple". Span names every entity prompt
has: object_i / label_i (segment i), query_label, prev_query_label (the queried label's occurrence in the
context), correct_object, last.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from lib.data.encoding import answer_token_id
from lib.types import Prompt

log = logging.getLogger(__name__)

OBJECTS = (
    "apple", "book", "bell", "bread", "brick", "cake", "camera", "car", "card", "chair", "clock", "coat", "cup",
    "dog", "doll", "drum", "egg", "fan", "file", "flower", "game", "glass", "guitar", "hat", "key", "kite",
    "lamp", "letter", "map", "milk", "mirror", "note", "pen", "phone", "plate", "radio", "ring", "rock",
    "shoe", "sock", "stone", "table", "ticket", "toy", "train", "watch", "wheel",
)
LABELS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


SEGMENT = "the {object} is in Box {label}"
# Neutral words for the random-text and extra-token variants (no single letters: they would read as box labels).
FILLER = ("long", "day", "we", "walked", "home", "after", "rain", "and", "then", "saw", "many", "birds", "near",
          "old", "river", "it", "was", "quiet", "there", "today")



def entity_tracking_prompt(objects: list[str], labels: list[str], query: int) -> Prompt:
    """ "The apple is in Box F, the computer is in Box Q. Box F contains the" -> " apple"."""
    text, spans = "", {}
    for i, (obj, label) in enumerate(zip(objects, labels)):
        text += ("The " if i == 0 else ", the ")
        spans[f"object_{i}"] = (len(text), len(text) + len(obj))
        text += f"{obj} is in Box "
        spans[f"label_{i}"] = (len(text), len(text) + len(label))
        text += label
    text += ". Box "
    spans["query_label"] = (len(text), len(text) + len(labels[query]))
    text += f"{labels[query]} contains the"
    spans["prev_query_label"] = spans[f"label_{query}"]
    spans["correct_object"] = spans[f"object_{query}"]
    spans["last"] = (len(text) - 3, len(text))
    meta = {"objects": list(objects), "labels": list(labels), "query": query}
    return Prompt(text=text, answer=" " + objects[query], spans=spans, meta=meta)


def random_entity_prompt(rng: random.Random, n_boxes: int = 7, objects=OBJECTS, labels=LABELS) -> Prompt:
    if n_boxes > min(len(objects), len(labels)):
        raise ValueError(f"{n_boxes} boxes need {n_boxes} distinct objects and labels, got {len(objects)} objects "
                         f"and {len(labels)} labels: use fewer boxes or pass more")
    objs = rng.sample(list(objects), n_boxes)
    labs = rng.sample(list(labels), n_boxes)
    return entity_tracking_prompt(objs, labs, rng.randrange(n_boxes))



def _single_token_in_context(tokenizer: Any, before: str, word: str, after: str) -> int | None:
    """The token id of `word` inside `before + word + after` when it is exactly one known token, else None."""
    text = before + word + after
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    start, end = len(before), len(before) + len(word)
    hits = [(i, s, e) for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > start and e > s]
    if len(hits) != 1:
        return None
    i, s, e = hits[0]
    if e != end or text[s:start].strip():  # the token must not reach into the neighbours (a leading space is fine)
        return None
    token = enc["input_ids"][i]
    return None if token == tokenizer.unk_token_id else token


def _usable(tokenizer: Any, words: Sequence[str], contexts: list[tuple[str, str]], answer: bool) -> list[str]:
    keep, seen = [], set()
    for word in words:
        ids = {_single_token_in_context(tokenizer, b, word, a) for b, a in contexts}
        if len(ids) != 1 or None in ids:
            continue
        token = ids.pop()
        if answer:
            try:
                if answer_token_id(tokenizer, " " + word) != token:
                    continue
            except ValueError:
                continue
        if token not in seen:  # two words on one token (e.g. a lowercasing tokenizer) would be indistinguishable
            seen.add(token)
            keep.append(word)
    return keep


def _check_enough(kind: str, keep: list[str], words: Sequence[str], need: int | None, strict: bool,
                  tokenizer: Any) -> list[str]:
    dropped = [w for w in words if w not in keep]
    log.info("%d of %d %s are single tokens for this tokenizer", len(keep), len(words), kind)
    if strict and dropped:
        shown = ", ".join(f"{w!r} -> {tokenizer.tokenize(' ' + w)}" for w in dropped[:5])
        raise ValueError(f"the tokenizer does not keep {len(dropped)} of the given {kind} as one known token "
                         f"({shown}{', ...' if len(dropped) > 5 else ''}). Remove them, or let "
                         f"usable_{kind}(tokenizer) pick the usable ones from the built-in list")
    if need is not None and len(keep) < need:
        raise ValueError(f"only {len(keep)} of {len(words)} {kind} are single tokens for this tokenizer "
                         f"(dropped e.g. {dropped[:5]}), but {need} are needed: use fewer boxes or pass "
                         f"more {kind} that the tokenizer keeps whole")
    return keep


def usable_objects(tokenizer: Any, objects: Sequence[str] = OBJECTS, need: int | None = None,
                   strict: bool = False) -> list[str]:
    """The objects that are one known token in the prompt and as the answer " object" (logs how many remain).

    need: raise when fewer remain (e.g. n_boxes); strict: raise when any given object is split.
    """
    contexts = [("The ", " is"), ("the ", " is"), ("the ", ",")]
    return _check_enough("objects", _usable(tokenizer, objects, contexts, True), objects, need, strict, tokenizer)


def usable_labels(tokenizer: Any, labels: Sequence[str] = LABELS, need: int | None = None,
                  strict: bool = False) -> list[str]:
    """The box labels that are one known token after "Box " (before "," "." and " contains"); logs how many remain."""
    contexts = [("Box ", ","), ("Box ", "."), ("Box ", " contains")]
    return _check_enough("labels", _usable(tokenizer, labels, contexts, False), labels, need, strict, tokenizer)


def render_entity_prompt(
    pairs: Sequence[tuple[str, str]],
    query_label: str,
    *,
    templates: Sequence[str] | None = None,
    sep: str = ", ",
    prefix: str = "",
    interlude: str = "",
    variant: str | None = None,
) -> Prompt:
    """An entity-tracking prompt from (object, label) segments, with the same spans as `entity_tracking_prompt`.

    With the defaults the text equals `entity_tracking_prompt`'s; the variants change `templates` (one per
    segment, with {object} and {label}), `sep`, the text before the context (`prefix`) and the text between the
    context and the query (`interlude`). Segment i is the i-th (object, label) pair, extra segments included.
    """
    labels = [label for _, label in pairs]
    if query_label not in labels:
        raise ValueError(f"query label {query_label!r} names no box in the context {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"box labels must be distinct, got {labels}")
    templates = list(templates) if templates is not None else [SEGMENT] * len(pairs)
    text, spans = prefix, {}
    for i, ((obj, label), template) in enumerate(zip(pairs, templates)):
        seg_start = len(text)
        text += sep if i else ""
        for piece in _template_pieces(template):
            if piece == "{object}":
                spans[f"object_{i}"] = (len(text), len(text) + len(obj))
                text += obj
            elif piece == "{label}":
                spans[f"label_{i}"] = (len(text), len(text) + len(label))
                text += label
            else:
                text += piece
        if i == 0:  # the context starts a sentence
            text = text[:seg_start] + text[seg_start].upper() + text[seg_start + 1:]
    query = labels.index(query_label)
    text += "." + interlude + " Box "
    spans["query_label"] = (len(text), len(text) + len(query_label))
    text += f"{query_label} contains the"
    spans["prev_query_label"] = spans[f"label_{query}"]
    spans["correct_object"] = spans[f"object_{query}"]
    spans["last"] = (len(text) - 3, len(text))
    meta = {"objects": [o for o, _ in pairs], "labels": labels, "query": query}
    if variant:
        meta["variant"] = variant
    return Prompt(text=text, answer=" " + pairs[query][0], spans=spans, meta=meta)


def _template_pieces(template: str) -> list[str]:
    pieces, rest = [], template
    while rest:
        cut = min((rest.find(k) for k in ("{object}", "{label}") if k in rest), default=-1)
        if cut == -1:
            pieces.append(rest)
            break
        if cut:
            pieces.append(rest[:cut])
        key = "{object}" if rest.startswith("{object}", cut) else "{label}"
        pieces.append(key)
        rest = rest[cut + len(key):]
    return pieces


