"""Prompts to token ids: named character spans become per-example token positions under left padding.

`encode_prompts` tokenizes a list of prompts and left-pads them the way nnsight does (pad token: the tokenizer's,
else its EOS), without changing the tokenizer; a prompt with unknown words (<unk>) is an error naming them.
Answers are tokenized in the context of their prompt (`answer_token_ids`). `encode_pairs` builds the `PairBatch` every method takes from
triples, `encode_answers` from plain prompts (scored against their own answers).
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lib.types import EncodedPrompts, PairBatch, Prompt, Triple


def _prompt_text(prompt: str | Prompt) -> str:
    return prompt.text if isinstance(prompt, Prompt) else prompt


def answer_token_ids(tokenizer: Any, prompts: Sequence[str | Prompt], answers: Sequence[str]) -> list[int]:
    """The token the model should produce after each prompt: the first token `prompt + answer` has beyond `prompt`.

    Tokenized in context because a word alone tokenizes differently (SentencePiece tokenizers of the Llama-2 /
    Mistral kind give " apple" alone as "▁", "▁apple", after "contains the" as "▁apple"). The answer must add
    exactly one token and leave the prompt's own tokens as they are (else the model's next token is not the answer's
    first token: the error names the boundary).

    Args:
        prompts: n prompts (texts or Prompts), answers: n continuations.

    Returns:
        n token ids.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    texts = [_prompt_text(p) for p in prompts]
    if not texts:
        return []
    enc = tokenizer([*texts, *(t + a for t, a in zip(texts, answers))], add_special_tokens=False)["input_ids"]
    out = []
    for text, answer, alone, joined in zip(texts, answers, enc[:len(texts)], enc[len(texts):]):
        if joined[:len(alone)] != alone:
            raise ValueError(
                f"the answer {answer!r} merges with the end of the prompt {text[-20:]!r} for this tokenizer "
                f"(prompt ends {tokenizer.convert_ids_to_tokens(alone[-2:])}, prompt + answer ends "
                f"{tokenizer.convert_ids_to_tokens(joined[len(alone) - 2:])}): the model's next token cannot be the "
                "answer. Move the boundary: end the prompt before the space and start the answer with it "
                "(template answer_prefix)")
        rest = joined[len(alone):]
        if len(rest) != 1:
            raise ValueError(f"target {answer!r} is {len(rest)} tokens after its prompt for this tokenizer "
                             f"({tokenizer.convert_ids_to_tokens(rest)}); targets must be one token")
        out.append(rest[0])
    return out


def answer_token_id(tokenizer: Any, answer: str, prompt: str | Prompt | None = None) -> int:
    """The single token id of a continuation: in the context of `prompt` (see answer_token_ids), or alone when no
    prompt is given; multi-token answers are an error (the metrics read one logit)."""
    if prompt is not None:
        return answer_token_ids(tokenizer, [prompt], [answer])[0]
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"target {answer!r} is {len(ids)} tokens for this tokenizer; targets must be one token")
    return ids[0]


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The pieces of `text` this tokenizer maps to its unknown token (<unk>), in order, each once."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    words = [text[s:e] or "?" for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if token == unk]
    return list(dict.fromkeys(words))


def _check_known(prompts: Sequence[Prompt], tokenizer: Any, ids: Sequence[Sequence[int]]) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    bad = [p for p, row in zip(prompts, ids) if unk in row]
    if bad:
        words = list(dict.fromkeys(w for p in bad for w in unknown_words(tokenizer, p.text)))
        raise ValueError(f"{len(bad)} of {len(prompts)} prompts have words this tokenizer does not know (<unk>): "
                         f"{words[:10]}{' ...' if len(words) > 10 else ''}, e.g. in {bad[0].text!r}. Write the "
                         "prompts in the model's own format (an entity or variable-binding template, --template "
                         "FILE) or use words its vocabulary has")


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
    _check_known(prompts, tokenizer, enc["input_ids"])
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
    """A batch of plain prompts scored against their own answers (or `answers`), each tokenized after its prompt;
    no alternate.

    Returns:
        PairBatch(original=encode_prompts(prompts), target_ids=(n,) answer tokens).
    """
    answers = [p.answer for p in prompts] if answers is None else list(answers)
    if len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    targets = torch.tensor(answer_token_ids(tokenizer, prompts, answers))
    return PairBatch(encode_prompts(prompts, tokenizer), target_ids=targets)


def encode_pairs(triples: Sequence[Triple], tokenizer: Any) -> PairBatch:
    """A batch of triples: original and alternate runs, the target and the foil of each triple.

    The foil is the original's answer, or the alternate's where the target is the original's answer (a desideratum
    that asks for no change), so a logit difference always compares the target with its competitor. Both are
    tokenized after the original prompt, the run they are scored on.

    Returns:
        PairBatch with target_ids, foil_ids (n,) and the triples' desideratum (the first one's).
    """
    if not triples:
        raise ValueError("no triples to encode")
    originals = [t.original for t in triples]
    targets = torch.tensor(answer_token_ids(tokenizer, originals, [t.target for t in triples]))
    foils = torch.tensor(answer_token_ids(
        tokenizer, originals,
        [t.original.answer if t.target != t.original.answer else t.alternate.answer for t in triples]))
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
