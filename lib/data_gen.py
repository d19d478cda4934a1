"""Prompts and desiderata for the two papers' tasks, with the token positions later steps need.

A `Prompt` keeps named character spans; `token_positions` maps them to token indices for any fast tokenizer,
and `encode_batch` left-pads a batch the way nnsight does and shifts the positions to match.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

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


@dataclass
class EncodedBatch:
    """Left-padded token ids with per-example token positions already shifted for the padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: dict[str, torch.Tensor]
    answer_ids: torch.Tensor

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


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
