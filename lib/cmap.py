"""Cross-model activation patching (CMAP, Prakash et al. 2024): the same input to two models of one architecture,
chosen component outputs of the donor (e.g. a fine-tuned model) written into the receiver (its base).

Built only on lib.patching: `collect` on the donor, then `patched_logits` on the receiver. Each is one trace on
its own handle, so remotely (one model per request) CMAP is two requests: save from the donor, send to the
receiver. Values move to the receiving layer's device and dtype inside `write_blends`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from lib.data_gen import EncodedBatch, Prompt, encode_batch
from lib.models import ModelHandle
from lib.patching import Site, check_sites, clean_logits, collect, order_sites, patched_logits

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
    receiver: ModelHandle, donor: ModelHandle, batch: EncodedBatch, sites: Sequence[Site]
) -> torch.Tensor:
    """Receiver's last-position logits on `batch` with the donor's outputs (same input) written in at `sites`."""
    check_compatible(receiver, donor)
    check_sites(receiver, sites, batch)
    return patched_logits(receiver, batch, sites, collect(donor, batch, sites))


def _accuracy(logits: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    return (logits.argmax(-1).cpu() == batch.answer_ids.cpu()).sum()


def cmap_accuracy(
    receiver: ModelHandle,
    donor: ModelHandle,
    prompts: Sequence[Prompt],
    groups: Mapping[str, Sequence[Site]],
    batch_size: int = 50,
) -> dict[str, float]:
    """Accuracy (argmax at the last token == answer) of the receiver with each group's sites patched from the donor.

    Returns {"none": receiver alone, "donor": donor alone, group: receiver with that group patched}. Per batch the
    donor runs once for the union of every group's sites; each group is then one receiver run.
    """
    check_compatible(receiver, donor)
    if not prompts:
        raise ValueError("cmap_accuracy needs at least one prompt")
    clash = [g for g in groups if g in RESERVED]
    if clash:
        raise ValueError(f"group names {clash} are reserved for the unpatched rows {RESERVED}: rename them")
    union = order_sites([s for sites in groups.values() for s in sites])
    hits = {name: torch.tensor(0) for name in (*RESERVED, *groups)}
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"CMAP {donor.name} -> {receiver.name}", disable=len(starts) < 3):
        batch = encode_batch(list(prompts[start:start + batch_size]), receiver.tokenizer)
        for name, sites in groups.items():
            check_sites(receiver, sites, batch)
        hits["none"] += _accuracy(clean_logits(receiver, batch), batch)
        hits["donor"] += _accuracy(clean_logits(donor, batch), batch)
        values = collect(donor, batch, union) if union else {}
        for name, sites in groups.items():
            hits[name] += _accuracy(patched_logits(receiver, batch, sites, values), batch)
    result = {name: float(h) / len(prompts) for name, h in hits.items()}
    log.info("CMAP %s -> %s on %d prompts: %s", donor.name, receiver.name, len(prompts),
             ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def with_every_position(batch: EncodedBatch) -> EncodedBatch:
    """The batch with one more named position per token column ("token_0", "token_1", ...).

    With them a Site can address every token, e.g. to patch a component everywhere. Left padding would put some
    examples' padding in a column, so the prompts must all have the same length.
    """
    if not bool(batch.attention_mask.all()):
        raise ValueError("with_every_position needs prompts of one token length (no padding): "
                         "group the prompts by length first")
    size, width = batch.input_ids.shape
    extra = {f"token_{j}": torch.full((size,), j, dtype=torch.long) for j in range(width)}
    return EncodedBatch(batch.input_ids, batch.attention_mask, {**batch.positions, **extra}, batch.answer_ids)
