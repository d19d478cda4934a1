"""Prompts to token ids: named character spans become per-example token positions under left padding.

`encode_prompts` tokenizes a list of prompts and left-pads them the way nnsight does (pad token: the tokenizer's,
else its EOS), without changing the tokenizer. `encode_pairs` builds the `PairBatch` every method takes from
triples, `encode_answers` from plain prompts (scored against their own answers).
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lib.types import EncodedPrompts, PairBatch, Prompt, Triple


def answer_token_id(tokenizer: Any, answer: str) -> int:
    """The single token id of a continuation; multi-token answers are an error (the metrics read one logit)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"target {answer!r} is {len(ids)} tokens for this tokenizer; targets must be one token")
    return ids[0]


def pad_token_id(tokenizer: Any) -> int:
    """The id left padding uses: the tokenizer's pad token, else its EOS (as nnsight sets it), else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _positions(prompt: Prompt, offsets: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Index (in the unpadded token sequence) of the last token of each named span, plus "last"."""
    positions = {}
    for name, (start, end) in prompt.spans.items():
        hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
        if not hits:
            raise ValueError(f"span {name!r} ({prompt.text[start:end]!r}) maps to no token in {prompt.text!r}")
        positions[name] = hits[-1]
    final = len(offsets) - 1
    if positions.setdefault("last", final) != final:
        raise ValueError("the tokenizer appends tokens after the prompt's last token (an EOS?); load the tokenizer "
                         "without add_eos_token so the answer is read at the last position")
    return positions


def token_positions(prompt: Prompt, tokenizer: Any) -> dict[str, int]:
    """{span name: index of its last token} in the unpadded tokenization of one prompt ("last" always included)."""
    enc = tokenizer(prompt.text, return_offsets_mapping=True)
    return _positions(prompt, enc["offset_mapping"])


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Any) -> EncodedPrompts:
    """Tokenize and left-pad (as nnsight does); each named position in padded coordinates.

    Args:
        prompts: n prompts; positions named in every one of them are kept.
        tokenizer: a fast tokenizer (offsets are needed); it is not modified.

    Returns:
        EncodedPrompts with input_ids, attention_mask (n, width) and positions {name: (n,)}.
    """
    if not prompts:
        raise ValueError("no prompts to encode")
    enc = tokenizer([p.text for p in prompts], return_offsets_mapping=True)
    width = max(len(ids) for ids in enc["input_ids"])
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    per_prompt = []
    for i, (prompt, ids, offsets) in enumerate(zip(prompts, enc["input_ids"], enc["offset_mapping"])):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
        per_prompt.append({k: width - len(ids) + v for k, v in _positions(prompt, offsets).items()})
    names = set.intersection(*(set(p) for p in per_prompt))
    positions = {name: torch.tensor([p[name] for p in per_prompt]) for name in sorted(names)}
    return EncodedPrompts(input_ids, attention_mask, positions)


def encode_answers(prompts: Sequence[Prompt], tokenizer: Any, answers: Sequence[str] | None = None) -> PairBatch:
    """A batch of plain prompts scored against their own answers (or `answers`); no alternate.

    Returns:
        PairBatch(original=encode_prompts(prompts), target_ids=(n,) answer tokens).
    """
    answers = [p.answer for p in prompts] if answers is None else list(answers)
    if len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    targets = torch.tensor([answer_token_id(tokenizer, a) for a in answers])
    return PairBatch(encode_prompts(prompts, tokenizer), target_ids=targets)


def encode_pairs(triples: Sequence[Triple], tokenizer: Any) -> PairBatch:
    """A batch of triples: original and alternate runs, the target and the foil of each triple.

    The foil is the original's answer, or the alternate's where the target is the original's answer (a desideratum
    that asks for no change), so a logit difference always compares the target with its competitor.

    Returns:
        PairBatch with target_ids, foil_ids (n,) and the triples' desideratum (the first one's).
    """
    if not triples:
        raise ValueError("no triples to encode")
    targets = torch.tensor([answer_token_id(tokenizer, t.target) for t in triples])
    foils = torch.tensor([
        answer_token_id(tokenizer, t.original.answer if t.target != t.original.answer else t.alternate.answer)
        for t in triples
    ])
    return PairBatch(encode_prompts([t.original for t in triples], tokenizer),
                     encode_prompts([t.alternate for t in triples], tokenizer), targets, foils, triples[0].desideratum)


def iter_pair_batches(
    triples: Sequence[Triple], tokenizer: Any, batch_size: int = 32, shuffle: bool = False, seed: int = 0
) -> Iterator[PairBatch]:
    """`encode_pairs` over consecutive chunks of `triples` (optionally shuffled by `seed`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(triples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield encode_pairs([triples[i] for i in order[start:start + batch_size]], tokenizer)


def answer_batches(prompts: Sequence[Prompt], tokenizer: Any, batch_size: int = 32) -> list[PairBatch]:
    """`encode_answers` over consecutive chunks of `prompts`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [encode_answers(prompts[i:i + batch_size], tokenizer) for i in range(0, len(prompts), batch_size)]
