"""What the unpatched model gets right: per-example scores, accuracy, and keeping the triples it answers.

Both papers evaluate interventions only where the model can do the task, so the workflows filter their triples
with `filter_correct` before patching.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from lib.core.handle import ModelHandle
from lib.data.encoding import answer_batches
from lib.patching import clean_logits
from lib.scores import target_hit
from lib.types import Metric, PairBatch, Prompt, Triple

log = logging.getLogger(__name__)


def _scores(handle: ModelHandle, batches: list[PairBatch], metric: Metric, progress: bool) -> torch.Tensor:
    out = [metric(clean_logits(handle, b.original), b)
           for b in tqdm(batches, desc="scoring", disable=not progress or len(batches) < 5, leave=False)]
    return torch.cat(out) if out else torch.zeros(0)


def scores(handle: ModelHandle, batches: Iterable[PairBatch], metric: Metric = target_hit,
           progress: bool = True) -> torch.Tensor:
    """Per-example `metric` of the unpatched original runs, concatenated over batches: (n_examples,).
    Remotely every batch travels in one request."""
    return handle.in_one_request(_scores, list(batches), metric, progress and not handle.remote)


def accuracy(handle: ModelHandle, batches: Iterable[PairBatch], metric: Metric = target_hit) -> float:
    """Mean `metric` (default: argmax == target) of the unpatched model over every example of `batches`."""
    values = scores(handle, batches, metric)
    if not len(values):
        raise ValueError("accuracy needs at least one example")
    return float(values.mean())


def prompt_accuracy(handle: ModelHandle, prompts: Sequence[Prompt], batch_size: int = 32) -> float:
    """Share of prompts whose last-position argmax is their answer."""
    return accuracy(handle, answer_batches(prompts, handle.tokenizer, batch_size))


def answers_correct(handle: ModelHandle, prompts: Sequence[Prompt], batch_size: int = 32,
                    metric: Metric = target_hit) -> list[bool]:
    """Whether the model's top token at the last position is each prompt's answer (batched traces; `metric` e.g.
    lib.scores.FirstDigit for answers judged on their first digit)."""
    if not prompts:
        return []
    return [bool(v) for v in scores(handle, answer_batches(prompts, handle.tokenizer, batch_size), metric, progress=False)]


def filter_correct(
    handle: ModelHandle, triples: Sequence[Triple], batch_size: int = 32, require_alternate: bool = True,
    metric: Metric = target_hit,
) -> list[Triple]:
    """The triples whose original (and, with `require_alternate`, alternate) prompt the model answers correctly.

    The noise pairs of path patching need no correct alternate (pass require_alternate=False).
    """
    keep = answers_correct(handle, [t.original for t in triples], batch_size, metric)
    if require_alternate:
        alt = answers_correct(handle, [t.alternate for t in triples], batch_size, metric)
        keep = [a and b for a, b in zip(keep, alt)]
    kept = [t for t, k in zip(triples, keep) if k]
    log.debug("%s answers %d of %d triples correctly", handle.name, len(kept), len(triples))
    return kept
