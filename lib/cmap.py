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

import nnsight
import torch

from lib.core.architectures import QKV_KINDS, resolve
from lib.core.handle import ModelHandle
from lib.data.encoding import answer_batches
from lib.evaluation import accuracy
from lib.patching import check_sites, collect, last_logits, patched_logits, patching_scan
from lib.scores import target_hit
from lib.types import EncodedPrompts, Metric, PairBatch, Prompt, Site

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


# ---- the heads' query / key / value inputs instead of their outputs -----------------------------------------------

InputKey = tuple[str, int, str]   # (kind "q"/"k"/"v", layer, position name): the columns of every site there


def _input_modules(handle: ModelHandle, layer: int, kinds: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(module path, kinds it holds)] of a layer in the order the forward pass runs them (fused q/k/v: one)."""
    out: list[tuple[str, list[str]]] = []
    for kind in QKV_KINDS:
        if kind not in kinds:
            continue
        path = handle.arch.qkv_path(kind)
        if out and out[-1][0] == path:
            out[-1][1].append(kind)
        else:
            out.append((path, [kind]))
    return out


def _by_layer(sites: Sequence[Site]) -> dict[int, list[Site]]:
    layers: dict[int, list[Site]] = {}
    for s in sorted(sites):
        if not s.component.is_head:
            raise ValueError(f"{s}: only heads have query / key / value inputs")
        layers.setdefault(s.component.layer, []).append(s)
    return dict(sorted(layers.items()))


def _read_inputs(handle: ModelHandle, prompts: EncodedPrompts, sites: list[Site], kinds: list[str]) -> dict:
    """{(kind, site): (batch, head_dim)} the sites' q / k / v at their positions, from one forward pass."""
    arch, rows = handle.arch, torch.arange(prompts.size)
    with torch.no_grad(), handle.trace(prompts.inputs()):
        out = {}
        for layer, here in _by_layer(sites).items():
            for path, held in _input_modules(handle, layer, kinds):
                value = resolve(arch.layer(handle.model, layer), path).output
                for kind in held:
                    for s in here:
                        out[(kind, str(s))] = value[rows, prompts.positions[s.position]][:, arch.qkv_slice(
                            kind, s.component.head)]
        out = nnsight.save(out)
    return {k: v.detach() for k, v in out.items()}


def _patched_inputs_logits(handle: ModelHandle, prompts: EncodedPrompts, sites: list[Site], kinds: list[str],
                           values: dict) -> torch.Tensor:
    """Last-position logits with the sites' q / k / v at their positions replaced by `values` (one pass)."""
    arch, rows = handle.arch, torch.arange(prompts.size)
    with torch.no_grad(), handle.trace(prompts.inputs()):
        for layer, here in _by_layer(sites).items():
            for path, held in _input_modules(handle, layer, kinds):
                module = resolve(arch.layer(handle.model, layer), path)
                current = module.output
                new = current.clone()
                for kind in held:
                    for s in here:
                        idx = prompts.positions[s.position].to(current.device)
                        new[rows, idx, arch.qkv_slice(kind, s.component.head)] = values[(kind, str(s))].to(
                            current.device, current.dtype)
                module.output = new
        logits = last_logits(handle).save()
    return logits.detach()


def _inputs_scan(handle: ModelHandle, batches: list[PairBatch], groups: list[list[Site]], kinds: list[str],
                 sources: list[dict], metric: Metric) -> torch.Tensor:
    totals = torch.zeros(len(groups))
    for batch, source in zip(batches, sources):
        for j, group in enumerate(groups):
            logits = _patched_inputs_logits(handle, batch.original, group, kinds, source)
            totals[j] += metric(logits, batch).sum()
    return totals


def _read_all(handle: ModelHandle, batches: list[PairBatch], sites: list[Site], kinds: list[str]) -> list[dict]:
    return [_read_inputs(handle, b.original, sites, kinds) for b in batches]


def cmap_input_scores(
    receiver: ModelHandle,
    donor: ModelHandle,
    batches: Sequence[PairBatch],
    groups: Mapping[str, Sequence[Site]],
    kinds: Sequence[str] = QKV_KINDS,
    metric: Metric = target_hit,
) -> dict[str, float]:
    """CMAP through the heads' inputs: the donor's query / key / value of each group's heads (at each head's
    position) written into the receiver, instead of the heads' outputs (the authors' unused variant).

    Under grouped-query attention a head's key / value is its key/value group's, shared with the group's other
    query heads (lib.core.architectures.Architecture.qkv_slice). Remotely: two requests (the donor's reads, the
    receiver's runs).

    Returns:
        {group: mean metric} of the receiver with that group's inputs patched from the donor.
    """
    check_compatible(receiver, donor)
    kinds = [k for k in QKV_KINDS if k in kinds]
    if not kinds:
        raise ValueError(f"kinds must name some of {', '.join(QKV_KINDS)}")
    batches = list(batches)
    if not batches:
        raise ValueError("CMAP needs at least one prompt")
    for batch in batches:
        for sites in groups.values():
            check_sites(receiver, list(sites), batch.original)
    union = sorted({s for sites in groups.values() for s in sites})
    sources = donor.in_one_request(_read_all, batches, union, kinds)
    totals = receiver.in_one_request(_inputs_scan, batches, [list(g) for g in groups.values()], kinds, sources,
                                     metric)
    count = sum(b.size for b in batches)
    return {name: float(v) / count for name, v in zip(groups, totals)}
