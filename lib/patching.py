"""Activation patching as nnsight traces: read component outputs at positions, write blends back, and the one
generic scan every patching experiment is an instance of.

A `Site` is a component at a named token position (a key of `EncodedPrompts.positions`: "last", "query_label"...).
Reads take whole rows (every head of a layer at once) so that one cached alternate run serves any subset of
heads; writes blend `w * v_orig + (1 - w) * v_new` per site inside one forward pass, so later components see the
earlier patches. DCM (mask_intervention), mean ablation, CMAP and path patching are all built on these.

`patching_scan(handle, batches, patches, metric=...)` scores each patch (one site, or a group of sites patched
together) with a metric over last-position logits (lib.scores), from one source run per batch: the alternate
prompt (activation patching), another model on the same input (`donor=`, CMAP) or given values (`values=`,
mean ablation).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from lib.core.components import execution_order
from lib.core.handle import ModelHandle
from lib.scores import target_hit
from lib.types import Activations, Component, EncodedPrompts, Metric, PairBatch, RowKey, Site

Patch = Site | Sequence[Site]
"""One entry of a scan: a site patched alone, or several sites patched together in one run."""


# ---- sites and positions ----------------------------------------------------------------------------------------


def token_position(index: int) -> str:
    """Name of the absolute token index `index` as a position ("t0", "t1", ...)."""
    return f"t{index}"


def is_token_position(name: str) -> bool:
    """Whether a position name is an absolute token index ("t12")."""
    return name.startswith("t") and name[1:].isdigit()


def with_token_positions(batch: PairBatch) -> PairBatch:
    """The batch with one named position per token column ("t0".."t{width-1}") on each side, so a Site can
    address any token.

    An absolute index means the same token in every example only without padding: prompts of one length.
    """
    def extend(side: EncodedPrompts | None) -> EncodedPrompts | None:
        if side is None:
            return None
        if not bool(side.attention_mask.all()):
            raise ValueError("token positions need prompts of one token length (no padding): group the prompts by "
                             "length")
        extra = {token_position(i): torch.full((side.size,), i, dtype=torch.long) for i in range(side.width)}
        return side.with_positions({**side.positions, **extra})

    return PairBatch(extend(batch.original), extend(batch.alternate), batch.target_ids, batch.foil_ids,
                     batch.desideratum)


def sites_at(components: Iterable[Component], position: str = "last") -> list[Site]:
    """Each component at one position."""
    return [Site(c, position) for c in components]


def order_sites(sites: Iterable[Site]) -> list[Site]:
    """The distinct sites in execution order: by layer, heads before the layer's MLP."""
    sites = set(sites)  # read twice below: a generator would be empty the second time
    order = {c: i for i, c in enumerate(execution_order(s.component for s in sites))}
    return sorted(sites, key=lambda s: (order[s.component], s.position))


def check_sites(handle: ModelHandle, sites: Sequence[Site], prompts: EncodedPrompts | None = None) -> None:
    """Clear errors for an empty set, components the model lacks, and positions the prompts lack or overrun."""
    if not sites:
        raise ValueError("no components to patch: give at least one head or MLP")
    for site in sites:
        site.component.check(handle.arch)
        if prompts is None:
            continue
        if site.position not in prompts.positions:
            raise ValueError(
                f"{site}: position {site.position!r} is not defined for these prompts; "
                f"available: {', '.join(sorted(prompts.positions))}"
            )
        pos = prompts.positions[site.position]
        first_real = prompts.attention_mask.shape[1] - prompts.attention_mask.sum(1)
        if (pos >= prompts.width).any() or (pos < first_real).any():
            raise ValueError(f"{site}: position {site.position!r} lies outside the prompt for some examples")


# ---- trace-body primitives --------------------------------------------------------------------------------------


def rows_by_layer(keys: Iterable[RowKey]) -> dict[int, dict[str, list[str]]]:
    """Trace-body helper: {layer: {"head": [positions], "mlp": [positions]}}: the modules a trace must visit, in order."""
    layers: dict[int, dict[str, list[str]]] = defaultdict(lambda: {"head": [], "mlp": []})
    for kind, layer, position in sorted(set(keys), key=lambda k: (k[1], k[0] != "head", k[2])):
        layers[layer][kind].append(position)
    return dict(sorted(layers.items()))


def _module(handle: ModelHandle, kind: str, layer: int):
    return handle.arch.attn_out(handle.model, layer) if kind == "head" else handle.arch.mlp(handle.model, layer)


def read_value(handle: ModelHandle, kind: str, layer: int):
    """Trace-body helper: a layer's head outputs (o_proj input, (batch, tokens, n_heads * head_dim)) or MLP output."""
    module = _module(handle, kind, layer)
    return module.input if kind == "head" else module.output


def write_value(handle: ModelHandle, kind: str, layer: int, value) -> None:
    """Trace-body helper: replace what `read_value` reads (a new tensor, never an in-place edit)."""
    module = _module(handle, kind, layer)
    if kind == "head":
        module.input = value
    else:
        module.output = value


def read_rows(handle: ModelHandle, prompts: EncodedPrompts, keys: Iterable[RowKey]) -> Activations:
    """Trace-body helper: the rows (batch, width) of each key; call inside an open trace, save the result."""
    rows = {}
    examples = torch.arange(prompts.size)
    for layer, kinds in rows_by_layer(keys).items():
        for kind, positions in kinds.items():
            if not positions:
                continue
            value = read_value(handle, kind, layer)
            for position in positions:
                rows[(kind, layer, position)] = value[examples, prompts.positions[position]]
    return rows


def blend_plan(handle: ModelHandle, sites: Sequence[Site]) -> dict[RowKey, torch.Tensor]:
    """Per row: for each column, the index of the site that owns it, or len(sites) for columns left alone.

    With it a row's weight vector is one gather from `[weights, 1]`, however many heads share the row.
    """
    arch = handle.arch
    widths = {"head": arch.n_heads * arch.head_dim, "mlp": arch.d_model}
    plan: dict[RowKey, torch.Tensor] = {}
    for i, site in enumerate(sites):
        key = site.row_key
        owner = plan.setdefault(key, torch.full((widths[key[0]],), len(sites), dtype=torch.long))
        owner[arch.head_slice(site.component.head) if site.component.is_head else slice(None)] = i
    return plan


def write_blends(
    handle: ModelHandle,
    prompts: EncodedPrompts,
    sites: Sequence[Site],
    values: Activations,
    weights: torch.Tensor | None = None,
    plan: dict[RowKey, torch.Tensor] | None = None,
) -> None:
    """Trace-body helper: blend `values` into the run at each site (weights None = replace fully).

    `weights[i]` belongs to `sites[i]`: 1 keeps the run's own output, 0 writes the value. No in-place
    operation touches a tensor that carries the weights' gradient.
    """
    plan = plan if plan is not None else blend_plan(handle, sites)
    if weights is None:
        weights = torch.zeros(len(sites))
    padded = torch.cat([weights, torch.ones(1, dtype=weights.dtype, device=weights.device)])
    examples = torch.arange(prompts.size)
    for layer, kinds in rows_by_layer(plan).items():
        for kind, positions in kinds.items():
            if not positions:
                continue
            current = read_value(handle, kind, layer)
            patched = current.clone()
            for position in positions:
                key = (kind, layer, position)
                idx = prompts.positions[position].to(current.device)
                w = padded.to(current.device)[plan[key].to(current.device)].to(current.dtype)
                row = current[examples, idx]
                patched[examples, idx] = w * row + (1 - w) * values[key].to(current.device, current.dtype)
            write_value(handle, kind, layer, patched)


def last_logits(handle: ModelHandle):
    """Trace-body helper: logits at the last position (left padding puts every prompt's end there)."""
    return handle.arch.unembed(handle.model).output[:, -1]


# ---- single runs ------------------------------------------------------------------------------------------------


def collect(handle: ModelHandle, prompts: EncodedPrompts, sites: Iterable[Site]) -> Activations:
    """The rows the sites live in, from one forward pass on `prompts` (no gradient).

    Returns:
        {RowKey: (batch, width)} for every row a site lives in.
    """
    keys = {s.row_key for s in sites}
    with torch.no_grad(), handle.trace(prompts.inputs()):
        rows = nnsight.save(read_rows(handle, prompts, keys))
    return {k: v.detach() for k, v in rows.items()}


def patched_logits(
    handle: ModelHandle,
    prompts: EncodedPrompts,
    sites: Sequence[Site],
    values: Activations,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last-position logits (batch, vocab) of `prompts` with `values` blended in at `sites` (one forward pass)."""
    check_sites(handle, sites, prompts)
    with torch.no_grad(), handle.trace(prompts.inputs()):
        write_blends(handle, prompts, sites, values, weights)
        logits = last_logits(handle).save()
    return logits.detach()


def clean_logits(handle: ModelHandle, prompts: EncodedPrompts) -> torch.Tensor:
    """Last-position logits (batch, vocab) of an unpatched run."""
    with torch.no_grad(), handle.trace(prompts.inputs()):
        logits = last_logits(handle).save()
    return logits.detach()


def activation_patch(handle: ModelHandle, batch: PairBatch, sites: Sequence[Site]) -> torch.Tensor:
    """Logits (batch, vocab) of the original with each site's output replaced by its output on the alternate
    (same named position)."""
    if batch.alternate is None:
        raise ValueError("activation_patch needs a batch with an alternate run (lib.data_gen.encode_pairs)")
    check_sites(handle, sites, batch.original)
    check_sites(handle, sites, batch.alternate)
    return patched_logits(handle, batch.original, sites, collect(handle, batch.alternate, sites))


def mean_activations(handle: ModelHandle, prompts: Iterable[EncodedPrompts], sites: Sequence[Site]) -> Activations:
    """Mean of each site's row over every example of `prompts` (the reference for mean ablation).

    Returns:
        {RowKey: (width,)}.
    """
    sums: Activations = {}
    count = 0
    for side in prompts:
        for key, value in collect(handle, side, sites).items():
            sums[key] = sums.get(key, 0) + value.sum(0)
        count += side.size
    if not count:
        raise ValueError("mean_activations needs at least one example")
    return {key: total / count for key, total in sums.items()}


def expand_values(values: Activations, size: int) -> Activations:
    """Rows of shape (width,) (e.g. means) broadcast to (size, width); (batch, width) rows as they are."""
    return {key: v.expand(size, -1) if v.dim() == 1 else v for key, v in values.items()}


def mean_ablate(handle: ModelHandle, prompts: EncodedPrompts, sites: Sequence[Site], means: Activations) -> torch.Tensor:
    """Last-position logits (batch, vocab) with each site's output replaced by its mean."""
    return patched_logits(handle, prompts, sites, expand_values(means, prompts.size))


# ---- the generic scan -------------------------------------------------------------------------------------------


def _as_group(patch: Patch) -> list[Site]:
    return [patch] if isinstance(patch, Site) else list(patch)


def _collect_all(handle: ModelHandle, sides: list[EncodedPrompts], sites: list[Site]) -> list[Activations]:
    return [collect(handle, side, sites) for side in sides]


def _scan(handle: ModelHandle, batches: list[PairBatch], groups: list[list[Site]], metric: Metric,
          sources: list[Activations] | None, values: Activations | None, progress: bool) -> torch.Tensor:
    """(n_patches,) metric summed over every example; every trace through `handle` (one request remotely)."""
    union = order_sites(s for g in groups for s in g)
    totals = torch.zeros(len(groups))
    bar = tqdm(total=len(batches) * len(groups), desc="patching scan", leave=False,
               disable=not progress or len(batches) * len(groups) < 20)
    for i, batch in enumerate(batches):
        if values is not None:
            source = expand_values(values, batch.size)
        elif sources is not None:
            source = sources[i]
        else:
            source = collect(handle, batch.alternate, union)
        for j, group in enumerate(groups):
            logits = patched_logits(handle, batch.original, group, source)
            totals[j] += metric(logits, batch).sum()
            bar.update()
    bar.close()
    return totals


def patching_scan(
    handle: ModelHandle,
    batches: Iterable[PairBatch],
    patches: Sequence[Patch],
    *,
    metric: Metric = target_hit,
    donor: ModelHandle | None = None,
    values: Activations | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Score every patch: the mean `metric` over all examples of the original run with that patch applied.

    Args:
        handle: the model patched into.
        batches: PairBatches; `original` is run, scored against `target_ids`.
        patches: each a Site patched alone or a sequence of Sites patched together.
        metric: per-example score of last-position logits (lib.scores; default target_hit = accuracy).
        donor: read the patched values from this model on the same original input (cross-model patching);
            must share the handle's architecture sizes and tokenizer (lib.cmap.check_compatible).
        values: patch these rows instead ({RowKey: (width,) or (batch, width)}; e.g. means for mean ablation).
        Without donor or values the values come from the batch's alternate run at the same named positions.
        progress: a progress bar over batches x patches (off remotely).

    Returns:
        (len(patches),) mean score per patch. One source run per batch serves every patch. Remotely the whole scan
        is one request (two with a donor: the donor's reads, then the patched runs).
    """
    groups = [_as_group(p) for p in patches]
    if not groups or any(not g for g in groups):
        raise ValueError("patching_scan needs at least one patch, and no empty group")
    batches = list(batches)
    if not batches:
        raise ValueError("patching_scan needs at least one batch")
    for batch in batches:
        for group in groups:
            check_sites(handle, group, batch.original)
            if values is None and donor is None:
                if batch.alternate is None:
                    raise ValueError("no source to patch from: the batch has no alternate run; give donor= (another "
                                     "model on the same input) or values= (e.g. means)")
                check_sites(handle, group, batch.alternate)
    if values is not None and donor is not None:
        raise ValueError("give donor= or values=, not both")
    count = sum(batch.size for batch in batches)
    sources = None
    if donor is not None:  # another model: its reads are a request of their own (one session is one model)
        union = order_sites(s for g in groups for s in g)
        sources = donor.in_one_request(_collect_all, [b.original for b in batches], union)
    remote = handle.remote or (donor is not None and donor.remote)
    totals = handle.in_one_request(_scan, batches, groups, metric, sources, values, progress and not remote)
    return totals / count
