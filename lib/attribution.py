"""Attribution patching: every site's activation-patching effect to first order, from one clean forward and
backward on the original plus one run of the source; and edge attribution through the residual stream.

Node attribution (Nanda 2023; Syed et al. 2023). For a site s (a head's slice of the attention output
projection's input, or an MLP's output, at a named token position) and a metric M (lib.scores):

    score(s) = mean over examples of  sum_{j in s's slice} (v_src[j] - v_orig[j]) * dM/dv[j]

with the gradient taken at the original (unpatched) run. It is the first-order Taylor estimate of

    patching_scan(handle, batches, [s], metric=M) - lib.evaluation.scores(handle, batches, M).mean()

i.e. the change of the mean metric when s alone is patched, with the clean original run as the baseline:
positive = patching s raises M. Both use the same sources (the alternate prompt at the same named position, a
donor model on the same input, or given values), so the two are directly comparable; where the model is linear
in a site (e.g. a last-layer head read only by a linear unembedding) they are equal. A group of sites scores the
sum of its members (first order: effects add). One batch costs a forward on the source and one forward and
backward on the original, whatever the number of sites: 2.8-3.1 forward passes' time for every head and MLP at
1-3 positions of a GPT-2-small-sized model, where the scan needs 157-469 (bench/BENCHMARKS.md).

Edge attribution (EAP, Syed et al. 2023) scores a sender site s -> receiver r along the direct path through the
residual stream (no other component in between; MLPs are nodes like heads):

    score(s -> r) = mean over examples of  dc_s . dM_r/dx_r[p_s]

where dc_s is the change of s's contribution to the residual stream at s's token p_s (a head: the attention
output projection applied to its slice of v_src - v_orig, bias cancelled; an MLP: v_src - v_orig itself) and
dM_r/dx_r is the gradient of the metric through r alone with respect to the residual stream entering r's layer:

- receiver "logits": x = the final norm's input; dM/dx through the final norm and the unembedding only.
- receiver head, input "output": the receiver's whole input (query, keys and values): with g_r = dM/dz_r the
  receiver's output gradient of the clean run, dM_r/dx = d(g_r . z_r)/dx, which flows through r alone (a head's
  output slice depends on the layer's input only through that head).
- input "q" / "k" / "v" (one of the receiver's three inputs, as in the authors' path patching) need the
  per-head query/key/value inputs from the architecture adapter; `RECEIVER_PATHS` is where they plug in.

An edge whose sender sits in the receiver's layer or above has no path and scores 0. Unlike lib.path_patching,
which lets MLPs recompute, the direct path leaves out the route through later MLPs.

Remotely each batch is one request (`ModelHandle.in_one_request`): the gradients are taken inside the session,
next to the weights, and only the scores come back.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, get_args

import nnsight
import numpy as np
import torch
from tqdm.auto import tqdm

from lib import report
from lib.core.components import all_components
from lib.core.handle import ModelHandle
from lib.patching import (Patch, read_value, rows_by_layer, write_value, check_sites, collect, expand_values, last_logits,
                          order_sites, sites_at)
from lib.scores import target_hit, target_logit
from lib.types import Activations, EncodedPrompts, Metric, PairBatch, RowKey, Site

RankBy = Literal["abs", "increase", "decrease"]
"""How `rank_sites` orders sites. abs: largest |score| first (any strong effect); increase: largest score first
(patching raises the metric most); decrease: most negative first."""

ReceiverInput = Literal["output", "q", "k", "v"]
"""What of a receiver head an edge reaches. output: its whole input (query, keys and values together); q / k / v:
only its query, keys or values (the authors' path-patching receivers; need the adapter's per-head q/k/v)."""

RANK_BY: tuple[str, ...] = get_args(RankBy)
RECEIVER_INPUTS: tuple[str, ...] = get_args(ReceiverInput)
LOGITS = "logits"
"""The receiver name of the direct path to the logits (`edge_attribution(..., receivers=LOGITS)`)."""

POST_NORM_FAMILIES = ("gemma2",)
"""Families whose blocks normalise the attention and MLP outputs before adding them to the residual stream
(sandwich norms): a component's residual contribution is then not its projection, and the direct-path edge
scores are refused."""


# ---- checks -----------------------------------------------------------------------------------------------------


def check_differentiable(metric: Metric, batch: PairBatch, vocab_size: int) -> None:
    """ValueError if `metric` has no gradient with respect to the logits (accuracy counts argmax hits)."""
    name = getattr(metric, "__name__", repr(metric))
    if metric is target_hit:
        raise ValueError("accuracy (target_hit) is not differentiable: it counts argmax hits, whose gradient is zero "
                         "almost everywhere; attribute target_logit, logit_diff or target_prob instead (and compare "
                         "with patching_scan(metric=target_hit) if accuracy is what you report)")
    probe = torch.zeros(batch.size, vocab_size, requires_grad=True)
    value = metric(probe, batch)
    if not isinstance(value, torch.Tensor) or not value.requires_grad:
        raise ValueError(f"metric {name} is not differentiable with respect to the logits (its value carries no "
                         "gradient): use target_logit, logit_diff or target_prob")
    if value.shape != (batch.size,):
        raise ValueError(f"metric {name} must return one value per example, shape ({batch.size},), got "
                         f"{tuple(value.shape)}")


def _check_batches(handle: ModelHandle, batches: list[PairBatch], sites: Sequence[Site], metric: Metric,
                   donor: ModelHandle | None, values: Activations | None, what: str) -> None:
    if not batches:
        raise ValueError(f"{what} needs at least one batch")
    if values is not None and donor is not None:
        raise ValueError("give donor= or values=, not both")
    check_differentiable(metric, batches[0], handle.lm.config.vocab_size)
    for batch in batches:
        check_sites(handle, sites, batch.original)
        if values is None and donor is None:
            if batch.alternate is None:
                raise ValueError("no source to patch from: the batch has no alternate run; give donor= (another "
                                 "model on the same input) or values= (e.g. means)")
            check_sites(handle, sites, batch.alternate)


def _columns(handle: ModelHandle, site: Site) -> slice:
    return handle.arch.head_slice(site.component.head) if site.component.is_head else slice(None)


# ---- the gradient primitive -------------------------------------------------------------------------------------


def _grad_dtype(handle: ModelHandle) -> torch.dtype:
    """float32 for half-precision models (their gradients summed in float32), float64 for float64 ones."""
    first = next(iter(handle.lm._module.parameters()), None)
    return torch.promote_types(first.dtype if first is not None else torch.float32, torch.float32)


def _zero_leaf(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor that requires grad, on `like`'s device: added to an activation, its .grad is dM/d(it)."""
    return torch.zeros(shape, device=like.device, dtype=dtype, requires_grad=True)


def add_row_deltas(handle: ModelHandle, prompts: EncodedPrompts, keys: Iterable[RowKey],
                   dtype: torch.dtype) -> tuple[Activations, dict[RowKey, torch.Tensor]]:
    """Trace-body helper: add a zero leaf (batch, width) to each row; returns the rows as read (live) and the leaves.

    The forward is unchanged (the leaves are zero); after a backward each leaf's .grad is the gradient at its row.
    The leaves are made on the row's own device (sharded models keep each layer where it is). It adds rather than
    writes, so two named positions at the same token both get their gradient, and nothing is done in place on a
    tensor of the graph.
    """
    rows, leaves = {}, {}
    for layer, kinds in rows_by_layer(keys).items():
        for kind, positions in kinds.items():
            if not positions:
                continue
            current = read_value(handle, kind, layer)
            examples = torch.arange(prompts.size, device=current.device)
            added = torch.zeros_like(current)
            for position in positions:
                key = (kind, layer, position)
                idx = prompts.positions[position].to(current.device)
                rows[key] = current[examples, idx]
                leaves[key] = _zero_leaf(rows[key].shape, current, dtype)
                added = added.index_put((examples, idx), leaves[key].to(current.dtype), accumulate=True)
            write_value(handle, kind, layer, current + added)
    return rows, leaves


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.grad.detach() if leaf.grad is not None else torch.zeros_like(leaf.detach())


def row_gradients(handle: ModelHandle, batch: PairBatch, keys: Iterable[RowKey],
                  objective: Metric) -> tuple[Activations, Activations, torch.Tensor]:
    """One forward and backward on the original: the rows, their gradients and the objective.

    Args:
        batch: the original run is traced; `objective(last-position logits, batch)` gives (batch,) values whose
            sum is back-propagated (so each example's gradient is its own).
        keys: rows to read and differentiate.

    Returns:
        ({RowKey: (batch, width)} rows, {RowKey: (batch, width)} d objective / d row, (batch,) objective values),
        detached, on the CPU.
    """
    prompts, dtype = batch.original, _grad_dtype(handle)
    with handle.trace(prompts.inputs()):
        rows, leaves = add_row_deltas(handle, prompts, set(keys), dtype)
        value = objective(last_logits(handle), batch)
        value.sum().backward()
        out = nnsight.save(({k: v.detach().cpu() for k, v in rows.items()},
                            {k: _grad(leaf).cpu() for k, leaf in leaves.items()}, value.detach().cpu()))
    return out


# ---- node attribution -------------------------------------------------------------------------------------------


def _site_scores(handle: ModelHandle, sites: Sequence[Site], source: Activations, rows: Activations,
                 grads: Activations) -> torch.Tensor:
    """(n_sites,) sum over examples of (v_src - v_orig) . grad over each site's slice."""
    out = []
    for site in sites:
        key, cols = site.row_key, _columns(handle, site)
        delta = source[key].to(grads[key].device, grads[key].dtype) - rows[key].to(grads[key].dtype)
        out.append((delta[:, cols] * grads[key][:, cols]).sum())
    return torch.stack(out)


def _attribute_batch(handle: ModelHandle, batch: PairBatch, sites: list[Site], metric: Metric,
                     source: Activations | None) -> torch.Tensor:
    """(n_sites,) summed scores over the batch's examples; every trace of it through `handle` (one request)."""
    if source is None:
        source = collect(handle, batch.alternate, sites)
    rows, grads, _ = row_gradients(handle, batch, [s.row_key for s in sites], metric)
    return _site_scores(handle, sites, source, rows, grads)


def _sources(handle: ModelHandle, batch: PairBatch, sites: list[Site], donor: ModelHandle | None,
             values: Activations | None) -> Activations | None:
    """The patched values when they do not come from the batch's alternate run (which is read in the request)."""
    if values is not None:
        return expand_values(values, batch.size)
    if donor is not None:
        return collect(donor, batch.original, sites)  # a donor is its own request remotely
    return None


def attribution_scan(
    handle: ModelHandle,
    batches: Iterable[PairBatch],
    patches: Sequence[Patch],
    *,
    metric: Metric = target_logit,
    donor: ModelHandle | None = None,
    values: Activations | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """First-order estimate of every patch's effect on the mean metric (attribution patching).

    Args:
        handle: the model patched into.
        batches: PairBatches; `original` is run and differentiated, scored against `target_ids`.
        patches: each a Site, or a sequence of Sites patched together (scored as the sum of its sites).
        metric: a differentiable per-example score of last-position logits (target_logit, logit_diff,
            target_prob; accuracy has no gradient and is refused).
        donor / values: the source of the patched values, as in lib.patching.patching_scan (default: the batch's
            alternate run at the same named positions).
        progress: a progress bar over batches (off remotely).

    Returns:
        (len(patches),) estimated `patching_scan(..., metric=metric)` minus the clean original's mean metric, in
        the order given; positive = patching raises the metric.
    """
    groups = [[p] if isinstance(p, Site) else list(p) for p in patches]
    if not groups or any(not g for g in groups):
        raise ValueError("attribution_scan needs at least one patch, and no empty group")
    sites = order_sites(s for g in groups for s in g)
    batches = list(batches)
    _check_batches(handle, batches, sites, metric, donor, values, "attribution_scan")
    totals, count = torch.zeros(len(sites)), 0
    remote = handle.remote or (donor is not None and donor.remote)
    for batch in tqdm(batches, desc="attribution", disable=not progress or remote or len(batches) < 5, leave=False):
        source = _sources(handle, batch, sites, donor, values)
        totals += handle.in_one_request(_attribute_batch, batch, sites, metric, source).cpu()
        count += batch.size
    per_site = dict(zip(sites, totals / count))
    return torch.stack([sum((per_site[s] for s in set(g)), torch.tensor(0.0)) for g in groups])


def rank_sites(
    handle: ModelHandle,
    batches: Iterable[PairBatch],
    positions: Sequence[str] = ("last",),
    k: int | None = None,
    *,
    sites: Sequence[Site] | None = None,
    heads: bool = True,
    mlps: bool = True,
    by: RankBy = "abs",
    metric: Metric = target_logit,
    donor: ModelHandle | None = None,
    values: Activations | None = None,
    progress: bool = True,
) -> list[tuple[Site, float]]:
    """Rank every component at the positions by attribution and keep the top k: a cheap first pass before DCM or
    path patching (one attribution scan instead of a forward pass per site).

    Args:
        positions: named token positions; every head and/or MLP is taken at each (ignored when `sites` is given).
        k: how many to keep (None = all, ranked).
        by: "abs" (largest |score|), "increase" (largest score) or "decrease" (most negative); see RankBy.
        metric, donor, values: as in attribution_scan.

    Returns:
        [(site, score)] best first, at most k long.
    """
    if by not in RANK_BY:
        raise ValueError(f"by={by!r}; choose one of {', '.join(RANK_BY)}")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1 (or None for every site), got {k}")
    if sites is None:
        components = all_components(handle.arch, heads=heads, mlps=mlps)
        sites = [s for p in positions for s in sites_at(components, p)]
    sites = list(sites)
    scores = attribution_scan(handle, batches, sites, metric=metric, donor=donor, values=values, progress=progress)
    key = {"abs": lambda v: -abs(v), "increase": lambda v: -v, "decrease": lambda v: v}[by]
    ranked = sorted(zip(sites, scores.tolist()), key=lambda item: key(item[1]))
    return ranked[:k] if k is not None else ranked


# ---- edge attribution -------------------------------------------------------------------------------------------


def _output_path(handle: ModelHandle, receiver: Site, row: torch.Tensor, grad: torch.Tensor,
                 residual: torch.Tensor) -> torch.Tensor:
    """d(g_r . z_r)/d(residual entering r's layer), (batch, width, d_model): through the receiver head alone."""
    cols = _columns(handle, receiver)
    (out,) = torch.autograd.grad((grad[:, cols].to(row.dtype) * row[:, cols]).sum(), residual, retain_graph=True,
                                 allow_unused=True)
    return torch.zeros_like(residual) if out is None else out


RECEIVER_PATHS: dict[str, Callable[..., torch.Tensor]] = {"output": _output_path}
"""receiver input -> the function giving a receiver's path gradient at the residual stream entering its layer:
(handle, receiver site, its row as read (batch, H*D), dM/d(row) (batch, H*D), the residual leaf (batch, width,
d_model)) -> (batch, width, d_model). The query / key / value inputs go here once the architecture adapter names
each head's q/k/v: take the gradient of g_r . z_r at that input (masked to the head), then its vector-Jacobian
product back to the residual."""


def _head_contribution(handle: ModelHandle, layer: int, head: int, dz: torch.Tensor) -> torch.Tensor:
    """Trace-body helper: what a change `dz` (n, H*D) of one head's slice adds to the residual stream (n, d_model):
    the attention output projection applied to it, bias cancelled (an ad hoc call of the module)."""
    masked = torch.zeros_like(dz)
    cols = handle.arch.head_slice(head)
    masked[:, cols] = dz[:, cols]
    out_proj = handle.arch.attn_out(handle.model, layer)
    return out_proj(masked) - out_proj(torch.zeros_like(dz))


def _residual_module(handle: ModelHandle, layer: int):
    arch = handle.arch
    return arch.final_norm(handle.model) if layer == arch.n_layers else arch.layer(handle.model, layer)


def _edge_batch(handle: ModelHandle, batch: PairBatch, senders: list[Site], receivers: list[Site] | None,
                kind: str, metric: Metric, source: Activations | None) -> torch.Tensor:
    """(n_receivers, n_senders) summed edge scores over the batch (receivers None = the logits); one request."""
    arch, prompts = handle.arch, batch.original
    if source is None:
        source = collect(handle, batch.alternate, senders)
    recv_layers = {arch.n_layers} if receivers is None else {r.component.layer for r in receivers}
    keys = {s.row_key for s in senders} | {r.row_key for r in receivers or []}
    dtype = _grad_dtype(handle)
    with handle.trace(prompts.inputs()):
        rows, deltas, leaves, residuals = {}, {}, {}, {}
        for layer in range(arch.n_layers + 1):
            if layer in recv_layers:  # a zero leaf on the whole residual stream entering the receiver's layer
                module = _residual_module(handle, layer)
                x = module.input
                leaves[layer] = _zero_leaf(x.shape, x, dtype)
                residuals[layer] = leaves[layer].to(x.dtype)
                module.input = x + residuals[layer]
            if layer < arch.n_layers:
                read, made = add_row_deltas(handle, prompts, [k for k in keys if k[1] == layer], dtype)
                rows.update(read)
                deltas.update(made)
        value = metric(last_logits(handle), batch)
        value.sum().backward(retain_graph=receivers is not None)
        if receivers is None:
            paths = [leaves[arch.n_layers].grad]
        else:
            path = RECEIVER_PATHS[kind]
            paths = [path(handle, r, rows[r.row_key], deltas[r.row_key].grad, residuals[r.component.layer])
                     for r in receivers]
        examples = torch.arange(prompts.size)
        with torch.no_grad():
            changes = []
            for s in senders:
                orig = rows[s.row_key].detach()
                dv = source[s.row_key].to(orig.device, orig.dtype) - orig
                changes.append(_head_contribution(handle, s.component.layer, s.component.head, dv)
                               if s.component.is_head else dv)
            table = []
            for r, w in zip(receivers or [None], paths):
                line = []
                for s, dc in zip(senders, changes):
                    if r is not None and s.component.layer >= r.component.layer:
                        line.append(torch.zeros((), device=w.device))  # no path: r reads s's layer's input
                        continue
                    at = w[examples.to(w.device), prompts.positions[s.position].to(w.device)]
                    line.append((dc.to(at.device, at.dtype) * at).sum().float())
                table.append(torch.stack(line).cpu())
            scores = nnsight.save(torch.stack(table))
    return scores


def edge_attribution(
    handle: ModelHandle,
    batches: Iterable[PairBatch],
    senders: Sequence[Site],
    receivers: Sequence[Site] | str = LOGITS,
    *,
    receiver_input: ReceiverInput = "output",
    metric: Metric = target_logit,
    donor: ModelHandle | None = None,
    values: Activations | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """First-order effect of each sender -> receiver edge on the mean metric, along the direct residual path.

    Args:
        senders: heads or MLPs at named positions; their source values as in attribution_scan (the alternate at
            the same position, `donor=` or `values=`).
        receivers: "logits" (the direct path to the unembedding), or head sites.
        receiver_input: what of a receiver head the edge reaches (ReceiverInput): "output" = its whole input;
            "q" / "k" / "v" need the adapter's per-head q/k/v inputs (not in this version).
        metric: a differentiable metric (as in attribution_scan).

    Returns:
        (n_receivers, n_senders) scores (one row for "logits"): the estimated change of the mean metric when only
        that edge carries the sender's patched value; 0 where the sender is not upstream of the receiver.
    """
    if receiver_input not in RECEIVER_INPUTS:
        raise ValueError(f"receiver_input={receiver_input!r}; choose one of {', '.join(RECEIVER_INPUTS)}")
    if receiver_input not in RECEIVER_PATHS:
        raise NotImplementedError(
            f"receiver input {receiver_input!r} needs each head's query/key/value input from the architecture adapter "
            "(lib/core/architectures.py), which it does not provide yet; use receiver_input='output' (the receiver's "
            "whole input) meanwhile")
    if handle.arch.model_type in POST_NORM_FAMILIES:
        raise ValueError(f"{handle.arch.model_type} normalises each block's attention and MLP outputs before the "
                         "residual add, so a component's residual contribution is not its projection: the direct-path "
                         "edge scores do not apply; use attribution_scan (node attribution) instead")
    senders = list(senders)
    if not senders:
        raise ValueError("edge_attribution needs at least one sender")
    if isinstance(receivers, str):
        if receivers != LOGITS:
            raise ValueError(f"receivers must be {LOGITS!r} or a list of head sites, got {receivers!r}")
        recv = None
    else:
        recv = list(receivers)
        if not recv:
            raise ValueError(f"edge_attribution needs at least one receiver (or receivers={LOGITS!r})")
        mlps = [str(r) for r in recv if not r.component.is_head]
        if mlps:
            raise ValueError(f"receivers must be heads (or {LOGITS!r}); MLP receivers are not supported: {mlps}")
    batches = list(batches)
    _check_batches(handle, batches, senders, metric, donor, values, "edge_attribution")
    if recv is not None:
        for batch in batches:
            check_sites(handle, recv, batch.original)
    totals, count = torch.zeros(1 if recv is None else len(recv), len(senders)), 0
    remote = handle.remote or (donor is not None and donor.remote)
    for batch in tqdm(batches, desc="edge attribution", disable=not progress or remote or len(batches) < 5,
                      leave=False):
        source = _sources(handle, batch, senders, donor, values)
        totals += handle.in_one_request(_edge_batch, batch, senders, recv, receiver_input, metric, source).cpu()
        count += batch.size
    return totals / count


# ---- comparing and showing ----------------------------------------------------------------------------------------


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing their average rank."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_correlation(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor,
                     floor: float = 0.0) -> float:
    """Spearman's rank correlation of two score vectors, e.g. attribution against an activation-patching scan of
    the same sites (ties get their average rank).

    Args:
        floor: values with |v| <= floor * max|v| of their own vector count as 0 (tied). Patching effects that are
            float round-off (about 1e-6 on logits of about 10 in float32) otherwise rank in random order and
            swamp the correlation on models where most sites do nothing (the planted ones); 0 = raw values.
    """
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"rank_correlation needs two vectors of one length >= 2, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if floor:
        a = torch.where(a.abs() <= floor * a.abs().max(), 0.0, a)
        b = torch.where(b.abs() <= floor * b.abs().max(), 0.0, b)
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    if denom == 0:
        raise ValueError("rank_correlation is undefined when one vector is constant")
    return float((ra * rb).sum()) / denom


def site_grid(handle: ModelHandle, sites: Sequence[Site], values: Sequence[float] | torch.Tensor,
              position: str = "last") -> np.ndarray:
    """(n_layers, n_heads + 1) grid of the values of the sites at `position`: head columns, then the MLP; NaN
    where no site was given."""
    arch = handle.arch
    grid = np.full((arch.n_layers, arch.n_heads + 1), np.nan)
    for site, value in zip(sites, torch.as_tensor(values).tolist()):
        if site.position == position:
            c = site.component
            grid[c.layer, c.head if c.is_head else arch.n_heads] = value
    return grid


def site_heatmap(path, handle: ModelHandle, sites: Sequence[Site], values: Sequence[float] | torch.Tensor,
                 position: str, title: str, cmap: str = "RdBu_r"):
    """A layer x (heads, MLP) heatmap PNG of per-site values at one position (lib.report.heatmap); the colour
    scale is symmetric around 0 for signed values."""
    grid = site_grid(handle, sites, values, position)
    finite = grid[np.isfinite(grid)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    top = top or 1.0
    low = -top if finite.size and finite.min() < 0 else 0.0
    labels = [f"H{h}" for h in range(handle.arch.n_heads)] + ["MLP"]
    return report.heatmap(path, grid, title, xlabel="component", vmin=low, vmax=top,
                          cmap=cmap if low < 0 else "viridis", xticklabels=labels)
