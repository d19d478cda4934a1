"""What a run is scored by: `Metric`s, per-example functions of last-position logits and the `PairBatch`.

Every method that scores runs (patching_scan, accuracy, CMAP, circuit metrics, path patching) takes one of these
as its `metric` argument, so one scan serves accuracy, probability and logit difference alike.

    target_hit    1.0 where the argmax is the target token (accuracy, averaged)
    target_prob   softmax probability of the target
    target_logit  the target's logit
    logit_diff    logit[target] - logit[foil]

Answer rules (`ANSWER_RULES`): "token" compares token ids, as above. "first_digit" is for answers judged on their
first digit (variable binding, Davies et al.) under tokenizers that merge digits (Llama-3, GPT-4o: "52" is one
token, so the digit "5" alone is not what the model says): a token counts as the digit its text starts with
(leading spaces ignored). `FirstDigit` scores with that rule: a hit when the model's top token starts with the
target's digit; the digit's probability is the summed probability of every token starting with it, and its logit
the log-sum-exp of their logits (the log of that summed probability, up to the shared normaliser). Where each
digit is its own token and no other token starts with one (word-level tokenizers) the two rules agree exactly.
"""
from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from lib.types import Metric, PairBatch

AnswerRule = Literal["token", "first_digit"]
"""How an answer token is judged: "token" = that token id; "first_digit" = any token starting with its digit."""
ANSWER_RULES: tuple[str, ...] = get_args(AnswerRule)


def _targets(logits: torch.Tensor, batch: PairBatch, what: str) -> torch.Tensor:
    return batch.require_targets(what).to(logits.device)


def target_hit(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """(batch,) 1.0 where the last-position argmax is the target token, else 0.0."""
    return (logits.argmax(-1) == _targets(logits, batch, "accuracy")).float().cpu()


def target_prob(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """(batch,) softmax probability of the target token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits.float().softmax(-1)[rows, _targets(logits, batch, "target_prob")].cpu()


def target_logit(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """(batch,) logit of the target token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits.float()[rows, _targets(logits, batch, "target_logit")].cpu()


def logit_diff(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """(batch,) logit of the target minus logit of the foil (needs a batch with foil_ids, e.g. encode_pairs)."""
    if batch.foil_ids is None:
        raise ValueError("logit_diff needs foil tokens: encode the batch from triples (lib.data_gen.encode_pairs)")
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return (logits[rows, _targets(logits, batch, "logit_diff")] - logits[rows, batch.foil_ids.to(logits.device)]).cpu()


METRICS: dict[str, Metric] = {"accuracy": target_hit, "target_prob": target_prob, "target_logit": target_logit,
                              "logit_diff": logit_diff}
"""The metrics by the names the command lines use."""


# ---- the first-digit rule ---------------------------------------------------------------------------------------


_SPACE_MARKS = " \t\n\u2581\u0120\u010a\u0109"  # space, tab, newline; SentencePiece "▁"; byte-level "Ġ" "Ċ" "ĉ"


def _first_digit(piece: str) -> int:
    if piece.startswith("<0x3") and len(piece) == 6 and piece[4].isdigit() and piece.endswith(">"):
        return int(piece[4])  # SentencePiece byte-fallback token of an ASCII digit, e.g. <0x35> = "5"
    rest = piece.lstrip(_SPACE_MARKS)[:1]
    return int(rest) if rest.isascii() and rest.isdigit() else -1


def first_digit_classes(tokenizer: Any) -> torch.Tensor:
    """(vocab,) the digit 0-9 each token's text starts with (leading whitespace ignored), -1 for other tokens.

    Read from the token strings (convert_ids_to_tokens), whose space markers ("▁", "Ġ") are stripped: decoding
    262k single tokens one by one takes seconds, this a fraction of one.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([-1 if p is None else _first_digit(p) for p in pieces], dtype=torch.long)


def describe_first_digit_rule(classes: torch.Tensor) -> str:
    """One line for a report: how many tokens the first-digit rule counts per digit."""
    counts = torch.bincount(classes[classes >= 0], minlength=10)
    return (f"first-digit rule: a prediction counts when the model's top next token starts with the target digit "
            f"(leading spaces ignored); {int(counts.sum())} tokens of this tokenizer start with a digit "
            f"({int(counts.min())}-{int(counts.max())} per digit)")


def _classes_for(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """`classes` on the logits' device, cut or padded with -1 to the logits' vocabulary (models pad it)."""
    vocab = logits.shape[-1]
    classes = classes.to(logits.device)
    if classes.shape[0] >= vocab:
        return classes[:vocab]
    return torch.cat([classes, torch.full((vocab - classes.shape[0],), -1, dtype=classes.dtype, device=logits.device)])


def digit_logits(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(batch, 10) per digit the log-sum-exp of the logits of every token starting with it (-inf where none)."""
    classes = _classes_for(logits, classes)
    logits = logits.float()
    columns = []
    for d in range(10):
        idx = torch.nonzero(classes == d).flatten()
        columns.append(logits[:, idx].logsumexp(-1) if len(idx) else torch.full_like(logits[:, 0], float("-inf")))
    return torch.stack(columns, -1)


def target_digits(ids: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor, what: str) -> torch.Tensor:
    """(batch,) the digit each target / foil token starts with; ValueError for a token that starts with none."""
    digits = _classes_for(logits, classes)[ids.to(logits.device)]
    if (digits < 0).any():
        raise ValueError(f"{what} with the first-digit rule needs targets that start with a digit, got token ids "
                         f"{ids[(digits < 0).cpu()].tolist()[:5]}")
    return digits


def digit_task_logits(logits: torch.Tensor, target_ids: torch.Tensor, foil_ids: torch.Tensor | None,
                      classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(batch,) the target's digit logit and, with foils, the foil's: what DCM's losses read under the rule."""
    grouped = digit_logits(logits, classes)
    rows = torch.arange(logits.shape[0], device=logits.device)
    target = grouped[rows, target_digits(target_ids, logits, classes, "scoring")]
    foil = None if foil_ids is None else grouped[rows, target_digits(foil_ids, logits, classes, "scoring")]
    return target, foil


class FirstDigit:
    """A Metric under the first-digit rule (see the module docstring); `classes` from first_digit_classes.

    kind: "hit" (accuracy: the top token starts with the target's digit), "prob" (summed probability of the
    target digit's tokens), "logit" (their log-sum-exp), "logit_diff" (target digit's minus the foil digit's).
    A plain class with its methods in source, so it can travel to an NDIF server like lib.types.Record.
    """

    KINDS = ("hit", "prob", "logit", "logit_diff")

    def __init__(self, classes: torch.Tensor, kind: str = "hit"):
        if kind not in self.KINDS:
            raise ValueError(f"FirstDigit kind {kind!r}; choose one of {', '.join(self.KINDS)}")
        self.classes = classes
        self.kind = kind

    def __call__(self, logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        targets = batch.require_targets(f"FirstDigit({self.kind})").to(logits.device)
        if self.kind == "hit":
            classes = _classes_for(logits, self.classes)
            wanted = target_digits(targets, logits, self.classes, "accuracy")
            return (classes[logits.argmax(-1)] == wanted).float().cpu()
        rows = torch.arange(logits.shape[0], device=logits.device)
        grouped = digit_logits(logits, self.classes)
        target = grouped[rows, target_digits(targets, logits, self.classes, self.kind)]
        if self.kind == "prob":
            return (target - logits.float().logsumexp(-1)).exp().cpu()
        if self.kind == "logit":
            return target.cpu()
        if batch.foil_ids is None:
            raise ValueError("FirstDigit('logit_diff') needs foil tokens: encode the batch from triples")
        return (target - grouped[rows, target_digits(batch.foil_ids, logits, self.classes, "logit_diff")]).cpu()


def answer_metric(rule: str, tokenizer: Any = None, classes: torch.Tensor | None = None) -> Metric:
    """The accuracy metric of an answer rule: target_hit for "token", FirstDigit(hit) for "first_digit"."""
    if rule not in ANSWER_RULES:
        raise ValueError(f"answer rule {rule!r}; choose one of {', '.join(ANSWER_RULES)}")
    if rule == "token":
        return target_hit
    if classes is None:
        if tokenizer is None:
            raise ValueError("the first-digit rule needs the tokenizer (or its first_digit_classes)")
        classes = first_digit_classes(tokenizer)
    return FirstDigit(classes, "hit")
