"""Prompts and desiderata for the two papers' tasks, with the token positions later steps need.

A `Prompt` keeps named character spans; `token_positions` maps them to token indices for any fast tokenizer,
and `encode_batch` left-pads a batch the way nnsight does and shifts the positions to match.

This module holds the shared pieces (prompts, triples, batching, JSONL, splits, the correct-answer filter) and
the entity-tracking data of Prakash et al.; variable binding (Davies et al.) lives in `lib.data_gen_vb` and is
re-exported here.

    triples = entity_triples("position", 1000, n_boxes=7, seed=0, tokenizer=tok)   # or "object", "label"
    triples = entity_triples("position", 500, variant="no_comma")                  # Table A11, see VARIANTS
    triples = vb_triples("value_dependence", 1000)                                 # see VB_DESIDERATA
    triples = filter_correct(handle, triples)                                      # what the model can do
    train, val, test = split_triples(triples, (0.8, 0.1, 0.1))
    for batch in iter_batches(train, tok, 32): batch.original, batch.alternate, batch.target_ids

Span names every entity prompt has: object_i / label_i (segment i), query_label, prev_query_label (the queried
label's occurrence in the context), correct_object, last; every program: left_value, right_value, left, op,
right, last (plus var_<name> / value_<name>). encode_batch turns them into padded token positions.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from lib.models import ModelHandle

log = logging.getLogger(__name__)

OBJECTS = (
    "apple", "book", "bell", "bread", "brick", "cake", "camera", "car", "card", "chair", "clock", "coat", "cup",
    "dog", "doll", "drum", "egg", "fan", "file", "flower", "game", "glass", "guitar", "hat", "key", "kite",
    "lamp", "letter", "map", "milk", "mirror", "note", "pen", "phone", "plate", "radio", "ring", "rock",
    "shoe", "sock", "stone", "table", "ticket", "toy", "train", "watch", "wheel",
)
LABELS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass
class Prompt:
    """One prompt: its text, the correct continuation and named character spans (e.g. "query_label")."""

    text: str
    answer: str
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Triple:
    """A desideratum example: patching from `alternate` into `original` should make the model say `target`."""

    original: Prompt
    alternate: Prompt
    target: str
    desideratum: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedBatch:
    """Left-padded token ids with per-example token positions already shifted for the padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: dict[str, torch.Tensor]
    answer_ids: torch.Tensor

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def to(self, device: Any) -> EncodedBatch:
        """The same batch with every tensor on `device` (positions index per example, so they move too)."""
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device),
                            {k: v.to(device) for k, v in self.positions.items()}, self.answer_ids.to(device))


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


OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def variable_binding_prompt(values: dict[str, int], left: str, op: str, right: str) -> Prompt:
    """ "x=12, y=40, z=7. x+y=" -> first digit of 52 ("5"); the full answer is in meta["full_answer"]."""
    text, spans = "", {}
    for i, (name, value) in enumerate(values.items()):
        text += ", " if i else ""
        spans[f"var_{name}"] = (len(text), len(text) + len(name))
        text += f"{name}="
        spans[f"value_{name}"] = (len(text), len(text) + len(str(value)))
        text += str(value)
    text += ". "
    spans["left"] = (len(text), len(text) + len(left))
    text += left
    spans["op"] = (len(text), len(text) + 1)
    text += op
    spans["right"] = (len(text), len(text) + len(right))
    text += right + "="
    spans["last"] = (len(text) - 1, len(text))
    full = OPERATIONS[op](values[left], values[right])
    meta = {"values": dict(values), "left": left, "op": op, "right": right, "full_answer": str(full)}
    return Prompt(text=text, answer=str(full)[0], spans=spans, meta=meta)


def answer_token_id(tokenizer: Any, answer: str) -> int:
    """The single token id of a continuation; multi-token answers are an error (the metrics read one logit)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"target {answer!r} is {len(ids)} tokens for this tokenizer; targets must be one token")
    return ids[0]


def token_positions(prompt: Prompt, tokenizer: Any) -> dict[str, int]:
    """Index (in the unpadded token sequence) of the last token of each named span."""
    enc = tokenizer(prompt.text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    positions = {}
    for name, (start, end) in prompt.spans.items():
        hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
        if not hits:
            raise ValueError(f"span {name!r} ({prompt.text[start:end]!r}) maps to no token in {prompt.text!r}")
        positions[name] = hits[-1]
    return positions


def encode_batch(prompts: list[Prompt], tokenizer: Any, answers: list[str] | None = None) -> EncodedBatch:
    """Tokenize with left padding (as nnsight does) and give each named position in padded coordinates."""
    tokenizer.padding_side = "left"
    enc = tokenizer([p.text for p in prompts], padding=True, return_tensors="pt")
    width = enc["input_ids"].shape[1]
    lengths = enc["attention_mask"].sum(1).tolist()
    per_prompt = [token_positions(p, tokenizer) for p in prompts]
    names = set.intersection(*(set(p) for p in per_prompt))
    positions = {
        name: torch.tensor([width - n + pos[name] for n, pos in zip(lengths, per_prompt)]) for name in sorted(names)
    }
    answers = answers if answers is not None else [p.answer for p in prompts]
    answer_ids = torch.tensor([answer_token_id(tokenizer, a) for a in answers])
    return EncodedBatch(enc["input_ids"], enc["attention_mask"], positions, answer_ids)


# ----------------------------------------------------------------------------------------------------------------
# Batches of triples, JSONL, splits
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TripleBatch:
    """A batch of triples, encoded: original and alternate runs plus the target token of each triple."""

    triples: list[Triple]
    original: EncodedBatch   # answer_ids: each original's own answer
    alternate: EncodedBatch  # answer_ids: each alternate's own answer
    target_ids: torch.Tensor


def iter_batches(
    triples: Sequence[Triple], tokenizer: Any, batch_size: int = 32, shuffle: bool = False, seed: int = 0
) -> Iterator[TripleBatch]:
    """Encoded batches of `triples` (left-padded, positions in padded coordinates), optionally shuffled by seed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(triples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [triples[i] for i in order[start:start + batch_size]]
        original = encode_batch([t.original for t in chunk], tokenizer)
        alternate = encode_batch([t.alternate for t in chunk], tokenizer)
        target_ids = torch.tensor([answer_token_id(tokenizer, t.target) for t in chunk])
        yield TripleBatch(chunk, original, alternate, target_ids)


def _prompt_from_dict(d: dict) -> Prompt:
    return Prompt(d["text"], d["answer"], {k: tuple(v) for k, v in d["spans"].items()}, d.get("meta", {}))


def triple_to_dict(triple: Triple) -> dict:
    return dataclasses.asdict(triple)


def triple_from_dict(d: dict) -> Triple:
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


# ----------------------------------------------------------------------------------------------------------------
# Keep what the model can do
# ----------------------------------------------------------------------------------------------------------------


def answers_correct(handle: ModelHandle, prompts: Sequence[Prompt], batch_size: int = 32) -> list[bool]:
    """Whether the model's top token at the last position is each prompt's answer (batched nnsight traces)."""
    correct: list[bool] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="checking answers", disable=len(starts) < 5, leave=False):
        batch = encode_batch(list(prompts[start:start + batch_size]), handle.tokenizer)
        last = batch.positions.get("last")
        if last is not None and bool((last != batch.input_ids.shape[1] - 1).any()):
            raise ValueError("the tokenizer appends tokens after the prompt's last token (an EOS?); "
                             "load the tokenizer without add_eos_token so the answer is read at the last position")
        unembed = handle.arch.unembed(handle.model)
        with handle.trace(batch.inputs()):
            logits = unembed.output[:, -1, :].save()
        correct += (logits.argmax(-1).cpu() == batch.answer_ids).tolist()
    return correct


def filter_correct(
    handle: ModelHandle, triples: Sequence[Triple], batch_size: int = 32, require_alternate: bool = True
) -> list[Triple]:
    """The triples whose original (and, with `require_alternate`, alternate) prompt the model answers correctly.

    Both papers evaluate interventions only where the model can do the task; the noise pairs of path patching
    need no correct alternate (pass require_alternate=False).
    """
    keep = answers_correct(handle, [t.original for t in triples], batch_size)
    if require_alternate:
        alt = answers_correct(handle, [t.alternate for t in triples], batch_size)
        keep = [a and b for a, b in zip(keep, alt)]
    kept = [t for t, k in zip(triples, keep) if k]
    log.info("%s answers %d of %d triples correctly", handle.name, len(kept), len(triples))
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Entity tracking (Prakash et al.): usable objects and labels, desiderata, noise, positional variants
# ----------------------------------------------------------------------------------------------------------------

ENTITY_DESIDERATA = ("object", "label", "position")
SEGMENT = "the {object} is in Box {label}"
# Neutral words for the random-text and extra-token variants (no single letters: they would read as box labels).
FILLER = ("long", "day", "we", "walked", "home", "after", "rain", "and", "then", "saw", "many", "birds", "near",
          "old", "river", "it", "was", "quiet", "there", "today")


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


from lib.data_gen_vb import *  # noqa: E402,F401,F403  (variable binding, re-exported)
