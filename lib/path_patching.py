"""Path patching (Prakash et al. 2024, after Wang et al. 2023): which head at which token feeds a receiver.

A node is a head at a token position (a `Site`). Noise prompts (lib.data_gen.entity_noise_triples) have the
same template with a random query, labels and objects, so token index t plays the same role in both prompts;
the sender's noise value is its output on the noise prompt **at the same token index** as in the original.

Exactly what is computed for one sender s (all on the original prompt; every head's output is a slice of the
attention output projection's input, MLPs always recompute):

- receivers = None (the logits, first iteration): one forward with s's output replaced by its noise value and
  every other head in the layers after s frozen to its clean value at every token from s's token on (earlier
  layers, s's own layer and earlier tokens cannot see s, so freezing them would change nothing). The change reaches the logits only through the
  residual stream and the MLPs: the direct path s -> logits.
- receivers R given (later iterations): run A as above, except that the receiver sites (head at position) are
  left free, and R's outputs are recorded (frozen layers stop at R's last layer). Run B is a clean forward with
  only R's outputs replaced by the recorded ones; everything downstream recomputes. That is the path s -> R ->
  logits.

Score = mean over examples of (p_patch - p_org) / p_org, p = softmax probability of the original's answer;
the most negative senders matter most. Use originals the model answers correctly (lib.data_gen.filter_correct
with require_alternate=False): a wrong original's tiny p_org makes the ratio explode. Named positions vary per example (prev_query_label follows the query),
so every run works on groups of examples whose named positions sit at one index (lib.metrics.fixed_groups).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from lib.core.handle import ModelHandle
from lib.metrics import absolute, check_same_length, fixed_groups, head_sites
from lib.patching import (clean_logits, collect, last_logits, patched_logits, read_rows, with_token_positions,
                          write_blends)
from lib.scores import target_prob
from lib.types import Component, EncodedPrompts, PairBatch, Site

log = logging.getLogger(__name__)

DEFAULT_POSITIONS = ("last", "query_label", "prev_query_label", "correct_object")


def candidate_senders(handle: ModelHandle, positions: Sequence[str] = DEFAULT_POSITIONS,
                      receivers: Sequence[Site] | None = None) -> list[Site]:
    """Every head at each position; with receivers, only heads in layers below the last receiver's, minus R."""
    top = handle.arch.n_layers if not receivers else max(r.component.layer for r in receivers)
    skip = set(receivers or ())
    return [s for layer in range(top) for h in range(handle.arch.n_heads) for p in positions
            if (s := Site(Component(layer, h), p)) not in skip]


def _run_a(handle: ModelHandle, batch: EncodedPrompts, sender: Site, receivers: Sequence[Site],
           clean: dict, noise: dict, width: int):
    """Sender noised, other heads of later layers frozen clean, receivers free; logits or receiver rows."""
    arch = handle.arch
    top = arch.n_layers - 1 if not receivers else max(r.component.layer for r in receivers)
    free = set(receivers) | {sender}
    start = int(sender.position[1:])  # causal: tokens before the sender's cannot change, freezing them is a no-op
    frozen = [s for s in head_sites(handle, width, range(sender.component.layer + 1, top + 1))
              if s not in free and int(s.position[1:]) >= start]
    sites = frozen + [sender]
    values = {s.row_key: clean[s.row_key] for s in frozen}
    row = clean[sender.row_key].clone()
    cols = arch.head_slice(sender.component.head)
    row[:, cols] = noise[sender.row_key][:, cols]
    values[sender.row_key] = row
    by_layer: dict[int, list[Site]] = {}
    for s in sites:
        by_layer.setdefault(s.component.layer, []).append(s)
    with torch.no_grad(), handle.trace(batch.inputs()):
        if not receivers:
            write_blends(handle, batch, sites, values)
            out = last_logits(handle).save()
        else:
            rows = {}
            for layer in range(sender.component.layer, top + 1):
                if layer in by_layer:
                    write_blends(handle, batch, by_layer[layer], values)
                keys = [r.row_key for r in receivers if r.component.layer == layer]
                if keys:
                    rows.update(read_rows(handle, batch, keys))
            out = nnsight.save(rows)
    return out


def path_patch(
    handle: ModelHandle,
    batch: PairBatch,
    senders: Sequence[Site] | None = None,
    receivers: Sequence[Site] | None = None,
) -> dict[Site, float]:
    """Score of every sender's path to the receivers (None: the logits); most negative = most important.

    Args:
        batch: original runs and their noise prompts as `alternate`, aligned example by example (same template,
            same token length); target_ids = the originals' answers.
        senders: heads at named positions (default: every head at DEFAULT_POSITIONS).
        receivers: heads at named positions the paths must reach; None = the logits.

    Returns:
        {sender: mean over examples of (p_patch - p_org) / p_org} on the target token.
    """
    if batch.alternate is None or batch.original.input_ids.shape != batch.alternate.input_ids.shape:
        raise ValueError("original and noise prompts must have the same shape: use entity_noise_triples")
    batch.require_targets("path patching")
    width = check_same_length([batch, PairBatch(batch.alternate)])
    receivers = list(receivers or [])
    senders = list(senders) if senders is not None else candidate_senders(handle, receivers=receivers)
    named = [s.position for s in senders] + [r.position for r in receivers]
    totals = {s: 0.0 for s in senders}
    groups = fixed_groups(batch, named)
    with tqdm(total=len(groups) * len(senders), desc="path patching", leave=False,
              disable=len(groups) * len(senders) < 50) as bar:
        for group, index, _ in groups:
            group = with_token_positions(group)
            original = group.original
            noise = group.alternate.with_positions(original.positions)  # noise read at the original's indices
            all_sites = head_sites(handle, width)
            clean = collect(handle, original, all_sites)
            noised = collect(handle, noise, all_sites)
            p_org = target_prob(clean_logits(handle, original), group)
            recv = [absolute(r, index) for r in receivers]
            for sender in senders:
                s_abs = absolute(sender, index)
                if s_abs in recv:
                    bar.update()
                    continue
                out = _run_a(handle, original, s_abs, recv, clean, noised, width)
                logits = out if not recv else patched_logits(handle, original, recv, out)
                p_patch = target_prob(logits, group)
                totals[sender] += float(((p_patch - p_org) / p_org.clamp_min(1e-12)).sum())
                bar.update()
    return {s: totals[s] / batch.size for s in senders}


def top_senders(scores: dict[Site, float], k: int) -> list[tuple[Site, float]]:
    """The k most negative paths."""
    return sorted(scores.items(), key=lambda item: item[1])[:k]
