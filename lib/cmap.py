"""Cross-model activation patching (CMAP, Prakash et al. 2024): the same input to two models of one architecture,
chosen component outputs of the donor (e.g. a fine-tuned model) written into the receiver (its base).

Built on lib.patching: the donor's rows are read on the original input, then the receiver runs with them written
in (`patching_scan(..., donor=...)`). Each is one trace on its own handle, so remotely (one model per request)
CMAP is two requests per batch: save from the donor, send to the receiver. Values move to the receiving layer's
device and dtype inside `write_blends`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from lib.core.handle import ModelHandle
from lib.data.encoding import answer_batches
from lib.evaluation import accuracy
from lib.patching import check_sites, collect, patched_logits, patching_scan
from lib.scores import target_hit
from lib.types import Metric, PairBatch, Prompt, Site

log = logging.getLogger(__name__)

RESERVED = ("none", "donor")   # rows of cmap_accuracy: the receiver alone, the donor alone
_SIZES = ("model_type", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model")


class IncompatibleModels(ValueError):
    """The donor's activations cannot be written into the receiver (other sizes or another vocabulary)."""


def check_compatible(receiver: ModelHandle, donor: ModelHandle) -> None:
    """Raise IncompatibleModels unless both models have the same architecture sizes and tokenizer vocabulary."""
    diffs = [f"{k}: {getattr(receiver.arch, k)} vs {getattr(donor.arch, k)}"
             for k in _SIZES if getattr(receiver.arch, k) != getattr(donor.arch, k)]
    if diffs:
        raise IncompatibleModels(
            f"cannot patch {donor.name} into {receiver.name}: architectures differ ({'; '.join(diffs)}). "
            "CMAP needs a model and its fine-tune (same architecture and sizes)."
        )
    r_vocab, d_vocab = receiver.tokenizer.get_vocab(), donor.tokenizer.get_vocab()
    if r_vocab != d_vocab:
        only_r, only_d = sorted(set(r_vocab) - set(d_vocab)), sorted(set(d_vocab) - set(r_vocab))
        moved = sum(1 for t in set(r_vocab) & set(d_vocab) if r_vocab[t] != d_vocab[t])
        raise IncompatibleModels(
            f"cannot patch {donor.name} into {receiver.name}: tokenizer vocabularies differ "
            f"({len(r_vocab)} vs {len(d_vocab)} tokens; only in receiver: {only_r[:5]}, only in donor: "
            f"{only_d[:5]}, {moved} shared tokens with other ids). The same input must be the same token ids "
            "in both: load both models with the same tokenizer."
        )


def cross_model_patch(
    receiver: ModelHandle, donor: ModelHandle, batch: PairBatch, sites: Sequence[Site]
) -> torch.Tensor:
    """Receiver's last-position logits (batch, vocab) on `batch.original` with the donor's outputs (same input)
    written in at `sites`."""
    check_compatible(receiver, donor)
    check_sites(receiver, sites, batch.original)
    return patched_logits(receiver, batch.original, sites, collect(donor, batch.original, sites))


def cmap_scores(
    receiver: ModelHandle,
    donor: ModelHandle,
    batches: Sequence[PairBatch],
    groups: Mapping[str, Sequence[Site]],
    metric: Metric = target_hit,
) -> dict[str, float]:
    """The mean `metric` of the receiver with each group's sites patched from the donor (same input).

    Returns:
        {"none": receiver alone, "donor": donor alone, group: receiver with that group patched}. Per batch the
        donor runs once for the union of every group's sites; each group is then one receiver run.
    """
    check_compatible(receiver, donor)
    if not batches:
        raise ValueError("CMAP needs at least one prompt")
    clash = [g for g in groups if g in RESERVED]
    if clash:
        raise ValueError(f"group names {clash} are reserved for the unpatched rows {RESERVED}: rename them")
    result = {"none": accuracy(receiver, batches, metric), "donor": accuracy(donor, batches, metric)}
    if groups:
        scores = patching_scan(receiver, batches, list(groups.values()), metric=metric, donor=donor)
        result.update({name: float(v) for name, v in zip(groups, scores)})
    log.info("CMAP %s -> %s on %d prompts: %s", donor.name, receiver.name, sum(b.size for b in batches),
             ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def cmap_accuracy(
    receiver: ModelHandle,
    donor: ModelHandle,
    prompts: Sequence[Prompt],
    groups: Mapping[str, Sequence[Site]],
    batch_size: int = 50,
) -> dict[str, float]:
    """Accuracy (argmax at the last token == answer) of `cmap_scores` on plain prompts."""
    if not prompts:
        raise ValueError("cmap_accuracy needs at least one prompt")
    return cmap_scores(receiver, donor, answer_batches(prompts, receiver.tokenizer, batch_size), groups)
