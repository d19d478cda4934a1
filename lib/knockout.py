"""Attention knockout (Prakash et al. 2024, Appendix A): stop heads at one token from attending to another token,
from layer L on, and see at which L the model still solves the task.

The attention score of a query token (`from_position`) for a key token (`to_position`) is set to -inf before the
softmax, for the chosen heads (default: every head) of every layer >= L; the rest of the row renormalises, as in
the authors' code (Nix07/finetuning, attn_knockout/). It is done by editing the attention mask each attention
module receives (`attention_mask` keyword: an additive float mask under "eager", a boolean one under "sdpa", or
None when sdpa runs causal without padding, which is then built here), widened to one mask per head. Other
attention implementations (flash attention takes no per-head mask, flex attention a compiled block mask) get a
clear error. Through nnsight, so it runs locally, sharded and remotely alike.

`knockout_curve` is the paper's plot: the mean metric (accuracy) for every starting layer L = 0 .. n_layers
(L = n_layers blocks nothing). If heads in layer l read the key token for the task, the curve is low for
L <= l and recovers for L > l.

    curve = knockout_curve(handle, batches, "last", "correct_object")   # {0: 0.01, 1: 0.02, 2: 0.01, 3: 1.0}
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from lib.core.handle import ModelHandle
from lib.patching import last_logits
from lib.scores import target_hit
from lib.types import Component, EncodedPrompts, Metric, PairBatch

KNOCKOUT_IMPLEMENTATIONS = ("eager", "sdpa")
"""The attention implementations whose mask knockout edits (the adapter's attention modules under them)."""


def _implementation(handle: ModelHandle) -> str:
    return getattr(handle.lm.config, "_attn_implementation", None) or "eager"


def check_knockout(handle: ModelHandle, prompts: EncodedPrompts, from_position: str, to_position: str,
                   heads: Sequence[Component] | None = None) -> None:
    """Clear errors for an unsupported attention implementation, unknown positions, a key token that is not
    earlier than or equal to the query token, and heads the model lacks."""
    impl = _implementation(handle)
    if impl not in KNOCKOUT_IMPLEMENTATIONS:
        raise ValueError(f"attention knockout edits the attention mask, but this model runs attn_implementation="
                         f"{impl!r}, which takes no per-head mask; supported: {', '.join(KNOCKOUT_IMPLEMENTATIONS)}. "
                         "Load the model with attn_implementation='sdpa' (or 'eager')")
    for name in (from_position, to_position):
        if name not in prompts.positions:
            raise ValueError(f"position {name!r} is not defined for these prompts; "
                             f"available: {', '.join(sorted(prompts.positions))}")
    if (prompts.positions[to_position] > prompts.positions[from_position]).any():
        raise ValueError(f"{to_position!r} comes after {from_position!r} in some prompts: a token attends only to "
                         "earlier tokens (and itself), so there is nothing to knock out")
    for c in heads or []:
        if not c.is_head:
            raise ValueError(f"{c}: attention knockout blocks heads, not MLPs")
        c.check(handle.arch)


def _blocked_mask(mask, attention_mask: torch.Tensor, n_heads: int, heads: Sequence[int], rows: torch.Tensor,
                  cols: torch.Tensor) -> torch.Tensor:
    """The attention mask with (query rows[i], key cols[i]) of example i blocked for `heads`: (batch, heads, q, k)."""
    batch, width = attention_mask.shape
    if mask is None:   # sdpa without padding runs causal without a mask: build the causal one it implies
        causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    new = mask.expand(batch, n_heads, mask.shape[-2], mask.shape[-1]).clone()
    dev = new.device
    ex = torch.arange(batch, device=dev)[:, None]
    h = torch.tensor(list(heads), device=dev)[None, :]
    r, c = rows.to(dev)[:, None], cols.to(dev)[:, None]
    new[ex, h, r, c] = False if new.dtype == torch.bool else float("-inf")
    return new


def block_attention(handle: ModelHandle, prompts: EncodedPrompts, layer: int, heads: Sequence[int],
                    from_position: str, to_position: str) -> None:
    """Trace-body helper: in `layer`, `heads` at from_position do not attend to to_position."""
    attn = handle.arch.attn(handle.model, layer)
    args, kwargs = attn.inputs
    if "attention_mask" not in kwargs:
        raise ValueError(f"layer {layer}'s attention module got no attention_mask keyword; knockout cannot edit it")
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = _blocked_mask(kwargs["attention_mask"], prompts.attention_mask, handle.arch.n_heads,
                                             heads, prompts.positions[from_position], prompts.positions[to_position])
    attn.inputs = (args, kwargs)


def _plan(handle: ModelHandle, start: int, heads: Sequence[Component] | None) -> dict[int, list[int]]:
    """{layer >= start: the head indices blocked there}."""
    arch = handle.arch
    if heads is None:
        return {layer: list(range(arch.n_heads)) for layer in range(start, arch.n_layers)}
    plan: dict[int, list[int]] = {}
    for c in sorted(set(heads)):
        if c.layer >= start:
            plan.setdefault(c.layer, []).append(c.head)
    return plan


def knockout_logits(handle: ModelHandle, prompts: EncodedPrompts, from_position: str, to_position: str,
                    start_layer: int = 0, heads: Sequence[Component] | None = None) -> torch.Tensor:
    """Last-position logits (batch, vocab) with the attention from_position -> to_position blocked in every layer
    >= start_layer (for `heads` only, if given; default every head)."""
    check_knockout(handle, prompts, from_position, to_position, heads)
    plan = _plan(handle, start_layer, heads)
    with torch.no_grad(), handle.trace(prompts.inputs()):
        for layer, hs in plan.items():
            block_attention(handle, prompts, layer, hs, from_position, to_position)
        logits = last_logits(handle).save()
    return logits.detach()


def _curve_batch(handle: ModelHandle, batch: PairBatch, from_position: str, to_position: str,
                 heads: Sequence[Component] | None, metric: Metric) -> torch.Tensor:
    """(n_layers + 1,) the summed metric over the batch for each starting layer (remotely: one request)."""
    totals = []
    for start in range(handle.arch.n_layers + 1):
        plan = _plan(handle, start, heads)
        with torch.no_grad(), handle.trace(batch.original.inputs()):
            for layer, hs in plan.items():
                block_attention(handle, batch.original, layer, hs, from_position, to_position)
            logits = last_logits(handle).save()
        totals.append(metric(logits, batch).sum())
    return torch.stack(totals)


def knockout_curve(handle: ModelHandle, batches: Iterable[PairBatch], from_position: str, to_position: str,
                   heads: Sequence[Component] | None = None, metric: Metric = target_hit,
                   progress: bool = True) -> dict[int, float]:
    """The paper's knockout plot: the mean metric with from_position -> to_position blocked from layer L on.

    Args:
        batches: PairBatches; the originals are run and scored against target_ids.
        from_position, to_position: named positions (e.g. "last" -> "correct_object").
        heads: only these heads are blocked (each where its layer >= L); default every head of those layers.
        metric: lib.scores metric (default accuracy).

    Returns:
        {L: mean metric} for L = 0 .. n_layers (L = n_layers: nothing blocked, the model's own score).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("knockout_curve needs at least one batch")
    for batch in batches:
        batch.require_targets("knockout_curve")
        check_knockout(handle, batch.original, from_position, to_position, heads)
    totals = torch.zeros(handle.arch.n_layers + 1)
    count = 0
    for batch in tqdm(batches, desc="knockout", disable=not progress or handle.remote or len(batches) < 3,
                      leave=False):
        totals += handle.in_one_request(_curve_batch, batch, from_position, to_position, heads, metric)
        count += batch.size
    return {start: float(v) / count for start, v in enumerate(totals)}
