"""What a run is scored by: `Metric`s, per-example functions of last-position logits and the `PairBatch`.

Every method that scores runs (patching_scan, accuracy, CMAP, circuit metrics, path patching) takes one of these
as its `metric` argument, so one scan serves accuracy, probability and logit difference alike.

    target_hit    1.0 where the argmax is the target token (accuracy, averaged)
    target_prob   softmax probability of the target
    target_logit  the target's logit
    logit_diff    logit[target] - logit[foil]
"""
from __future__ import annotations

import torch

from lib.types import Metric, PairBatch


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
