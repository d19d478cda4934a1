"""Entity-tracking prompts of Prakash et al. (2024): the words, the rendering with named spans (in any
`EntityTemplate` wording), and which words a tokenizer keeps as one token in that wording.

"The apple is in Box F, the cup is in Box Q. Box F contains the" -> " apple". Span names every entity prompt
has: object_i / label_i (segment i), query_label, prev_query_label (the queried label's occurrence in the
context), correct_object, last (the prompt's final word).
"""
from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from typing import Any

from lib.data.encoding import answer_token_id, unknown_words
from lib.data.templates import EntityTemplate
from lib.types import Prompt

log = logging.getLogger(__name__)

OBJECTS = (
    "apple", "book", "bell", "bread", "brick", "cake", "camera", "car", "card", "chair", "clock", "coat", "cup",
    "dog", "doll", "drum", "egg", "fan", "file", "flower", "game", "glass", "guitar", "hat", "key", "kite",
    "lamp", "letter", "map", "milk", "mirror", "note", "pen", "phone", "plate", "radio", "ring", "rock",
    "shoe", "sock", "stone", "table", "ticket", "toy", "train", "watch", "wheel",
)
LABELS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


DEFAULT_TEMPLATE = EntityTemplate()
SEGMENT = DEFAULT_TEMPLATE.segment
# Neutral words for the random-text and extra-token variants (no single letters: they would read as box labels).
FILLER = ("long", "day", "we", "walked", "home", "after", "rain", "and", "then", "saw", "many", "birds", "near",
          "old", "river", "it", "was", "quiet", "there", "today")



def entity_tracking_prompt(objects: list[str], labels: list[str], query: int,
                           template: EntityTemplate | None = None) -> Prompt:
    """ "The apple is in Box F, the computer is in Box Q. Box F contains the" -> " apple" (or `template`'s wording)."""
    return render_entity_prompt(list(zip(objects, labels)), labels[query], template=template)


def random_entity_prompt(rng: random.Random, n_boxes: int = 7, objects=OBJECTS, labels=LABELS,
                         template: EntityTemplate | None = None) -> Prompt:
    """A prompt with `n_boxes` random distinct objects and labels and a random queried box."""
    if n_boxes > min(len(objects), len(labels)):
        raise ValueError(f"{n_boxes} boxes need {n_boxes} distinct objects and labels, got {len(objects)} objects "
                         f"and {len(labels)} labels: use fewer boxes or pass more")
    objs = rng.sample(list(objects), n_boxes)
    labs = rng.sample(list(labels), n_boxes)
    return entity_tracking_prompt(objs, labs, rng.randrange(n_boxes), template)


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


def _fill(text: str, **values: str) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _around(template: str, key: str, **others: str) -> tuple[str, str]:
    """The text of `template` before and after {key}, the other placeholders filled."""
    before, after = template.split("{" + key + "}")
    return _fill(before, **others), _fill(after, **others)


def _object_contexts(t: EntityTemplate, label: str) -> list[tuple[str, str]]:
    """Where an object stands in prompts of this template: first segment (maybe capitalised) and later ones."""
    before, after = _around(t.segment, "object", label=label)
    out = [(before, after + t.separator), (t.separator + before, after + t.context_end)]
    if t.capitalize and before:
        out.append((t.prefix + before[0].upper() + before[1:], after + t.separator))
    return out


def _label_contexts(t: EntityTemplate, obj: str) -> list[tuple[str, str]]:
    """Where a label stands: in a segment before the separator, before the context's end, and in the query."""
    before, after = _around(t.segment, "label", object=obj)
    q_before, q_after = _around(t.query, "label")
    return [(before, after + t.separator), (before, after + t.context_end), (t.context_end + q_before, q_after)]


def _answer_context(t: EntityTemplate, label: str) -> str:
    return t.context_end + _fill(t.query, label=label)


def _usable(tokenizer: Any, words: Sequence[str], contexts: list[tuple[str, str]],
            answer_after: str | None, answer_prefix: str) -> list[str]:
    keep, seen = [], set()
    for word in words:
        ids = {_single_token_in_context(tokenizer, b, word, a) for b, a in contexts}
        if len(ids) != 1 or None in ids:
            continue
        token = ids.pop()
        if answer_after is not None:
            try:
                if answer_token_id(tokenizer, answer_prefix + word, answer_after) != token:
                    continue
            except ValueError:
                continue
        if token not in seen:  # two words on one token (e.g. a lowercasing tokenizer) would be indistinguishable
            seen.add(token)
            keep.append(word)
    return keep


def _check_enough(kind: str, keep: list[str], words: Sequence[str], need: int | None, strict: bool,
                  tokenizer: Any, where: str) -> list[str]:
    dropped = [w for w in words if w not in keep]
    log.debug("%d of %d %s are single tokens for this tokenizer", len(keep), len(words), kind)
    shown = ", ".join(f"{w!r} -> {tokenizer.tokenize(' ' + w)}" for w in dropped[:5])
    if strict and dropped:
        raise ValueError(f"the tokenizer does not keep {len(dropped)} of the given {kind} as one known token "
                         f"{where} ({shown}{', ...' if len(dropped) > 5 else ''}). Remove them, or let "
                         f"usable_{kind}(tokenizer) pick the usable ones from the built-in list")
    if need is not None and len(keep) < need:
        raise ValueError(f"only {len(keep)} of {len(words)} {kind} are single tokens for this tokenizer {where} "
                         f"(dropped e.g. {shown}), but {need} are needed: use fewer boxes, pass more "
                         f"{kind} that the tokenizer keeps whole, or a template in the model's own format")
    return keep


def check_template_words(tokenizer: Any, template: EntityTemplate | None = None,
                         objects: Sequence[str] = OBJECTS, labels: Sequence[str] = LABELS) -> None:
    """Raise ValueError naming the template's own words (not its objects or labels) the tokenizer does not know."""
    t = template or DEFAULT_TEMPLATE
    sample = render_entity_prompt(list(zip(objects[:3], labels[:3])), labels[0], template=t)
    holes = sorted((span for name, span in sample.spans.items() if name.startswith(("object_", "label_"))
                    or name == "query_label"), reverse=True)
    fixed = sample.text
    for start, end in holes:  # blank the words, keep the template's own text
        fixed = fixed[:start] + " " + fixed[end:]
    unknown = unknown_words(tokenizer, fixed)
    if unknown:
        raise ValueError(f"the entity template's own words {unknown} are unknown to this tokenizer (<unk>), e.g. in "
                         f"{sample.text!r}: write the template in the model's own format (an EntityTemplate, "
                         "--template FILE with segment / separator / context_end / query)")


def usable_objects(tokenizer: Any, objects: Sequence[str] = OBJECTS, need: int | None = None,
                   strict: bool = False, template: EntityTemplate | None = None) -> list[str]:
    """The objects that are one known token where the template puts them and as the answer after its query (logs
    how many remain).

    need: raise when fewer remain (e.g. n_boxes); strict: raise when any given object is split.
    """
    t = template or DEFAULT_TEMPLATE
    label = (t.labels or LABELS)[0]
    keep = _usable(tokenizer, objects, _object_contexts(t, label), _answer_context(t, label), t.answer_prefix)
    where = f"in the template's segment {t.segment!r} and as the answer after {t.query!r}"
    return _check_enough("objects", keep, objects, need, strict, tokenizer, where)


def usable_labels(tokenizer: Any, labels: Sequence[str] = LABELS, need: int | None = None,
                  strict: bool = False, template: EntityTemplate | None = None) -> list[str]:
    """The box labels that are one known token where the template puts them (in a segment and in the query)."""
    t = template or DEFAULT_TEMPLATE
    keep = _usable(tokenizer, labels, _label_contexts(t, (t.objects or OBJECTS)[0]), None, "")
    where = f"in the template's segment {t.segment!r} and query {t.query!r}"
    return _check_enough("labels", keep, labels, need, strict, tokenizer, where)


def _last_word(text: str) -> tuple[int, int]:
    """Span of the prompt's final word (with any trailing spaces): where "last" reads the answer."""
    match = re.search(r"\S+\s*$|\s+$", text)
    return (match.start(), len(text)) if match else (max(len(text) - 1, 0), len(text))


def render_entity_prompt(
    pairs: Sequence[tuple[str, str]],
    query_label: str,
    *,
    template: EntityTemplate | None = None,
    templates: Sequence[str] | None = None,
    sep: str | None = None,
    prefix: str | None = None,
    suffix: str = "",
    interlude: str = "",
    capitalize: bool | None = None,
    variant: str | None = None,
) -> Prompt:
    """An entity-tracking prompt from (object, label) segments, in `template`'s wording (default: this project's).

    The variants change `templates` (one segment text per segment, with {object} and {label}), `sep`, the text
    before the context (`prefix`), after its last segment (`suffix`), between the context's end and the query
    (`interlude`) and whether the first letter is upper-cased (`capitalize`). Segment i is the i-th (object, label)
    pair, extra segments included.
    """
    t = template or DEFAULT_TEMPLATE
    labels = [label for _, label in pairs]
    if query_label not in labels:
        raise ValueError(f"query label {query_label!r} names no box in the context {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"box labels must be distinct, got {labels}")
    templates = list(templates) if templates is not None else [t.segment] * len(pairs)
    sep = t.separator if sep is None else sep
    capitalize = t.capitalize if capitalize is None else capitalize
    text, spans = t.prefix if prefix is None else prefix, {}
    for i, ((obj, label), segment) in enumerate(zip(pairs, templates)):
        seg_start = len(text)
        text += sep if i else ""
        for piece in _template_pieces(segment):
            if piece == "{object}":
                spans[f"object_{i}"] = (len(text), len(text) + len(obj))
                text += obj
            elif piece == "{label}":
                spans[f"label_{i}"] = (len(text), len(text) + len(label))
                text += label
            else:
                text += piece
        if i == 0 and capitalize and len(text) > seg_start:  # the context starts a sentence
            text = text[:seg_start] + text[seg_start].upper() + text[seg_start + 1:]
    query = labels.index(query_label)
    text += suffix + t.context_end + interlude
    for piece in _template_pieces(t.query):
        if piece == "{label}":
            spans["query_label"] = (len(text), len(text) + len(query_label))
            text += query_label
        else:
            text += piece
    spans["prev_query_label"] = spans[f"label_{query}"]
    spans["correct_object"] = spans[f"object_{query}"]
    spans["last"] = _last_word(text)
    meta = {"objects": [o for o, _ in pairs], "labels": labels, "query": query}
    if not t.is_default:
        meta["template"] = t.name
    if variant:
        meta["variant"] = variant
    return Prompt(text=text, answer=t.answer_prefix + pairs[query][0], spans=spans, meta=meta)


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
