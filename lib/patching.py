"""Activation patching primitives as nnsight traces: read component outputs at positions, write blends back.

A `Site` is a component at a named token position (a key of `EncodedBatch.positions`: "last", "query_label"...).
Reads take whole rows (every head of a layer at once) so that one cached alternate run serves any subset of
heads; writes blend `w * v_orig + (1 - w) * v_new` per site inside one forward pass, so later components see the
earlier patches. DCM (mask_intervention), mean ablation, CMAP and path patching are all built on these.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nnsight
import torch

from lib.components import Component, execution_order
from lib.data_gen import EncodedBatch
from lib.models import ModelHandle

# (kind, layer, position name): the row of a layer's head outputs (n_heads * head_dim) or its MLP output (d_model)
RowKey = tuple[str, int, str]
Activations = dict[RowKey, torch.Tensor]


@dataclass(frozen=True, order=True)
class Site:
    """A component patched at one named token position."""

    component: Component
    position: str = "last"

    def __str__(self) -> str:
        return f"{self.component}@{self.position}"

    @property
    def row_key(self) -> RowKey:
        return (self.component.kind, self.component.layer, self.position)


def token_position(index: int) -> str:
    """Name of the absolute token index `index` as a position ("t0", "t1", ...)."""
    return f"t{index}"


def is_token_position(name: str) -> bool:
    return name.startswith("t") and name[1:].isdigit()


def with_token_positions(batch: EncodedBatch) -> EncodedBatch:
    """The batch with one named position per token column ("t0".."t{width-1}"), so a Site can address any token.

    An absolute index means the same token in every example only without padding: prompts of one length.
    """
    if not bool(batch.attention_mask.all()):
        raise ValueError("token positions need prompts of one token length (no padding): group the prompts by length")
    size, width = batch.input_ids.shape
    extra = {token_position(i): torch.full((size,), i, dtype=torch.long) for i in range(width)}
    return EncodedBatch(batch.input_ids, batch.attention_mask, {**batch.positions, **extra}, batch.answer_ids)


def sites_at(components: Iterable[Component], position: str = "last") -> list[Site]:
    return [Site(c, position) for c in components]


def order_sites(sites: Iterable[Site]) -> list[Site]:
    """Execution order: by layer, heads before the layer's MLP."""
    sites = set(sites)  # read twice below: a generator would be empty the second time
    order = {c: i for i, c in enumerate(execution_order(s.component for s in sites))}
    return sorted(sites, key=lambda s: (order[s.component], s.position))


def check_sites(handle: ModelHandle, sites: Sequence[Site], batch: EncodedBatch | None = None) -> None:
    """Clear errors for an empty set, components the model lacks, and positions the batch lacks or overruns."""
    if not sites:
        raise ValueError("no components to patch: give at least one head or MLP")
    for site in sites:
        site.component.check(handle.arch)
        if batch is None:
            continue
        if site.position not in batch.positions:
            raise ValueError(
                f"{site}: position {site.position!r} is not defined for these prompts; "
                f"available: {', '.join(sorted(batch.positions))}"
            )
        pos = batch.positions[site.position]
        first_real = batch.attention_mask.shape[1] - batch.attention_mask.sum(1)
        if (pos >= batch.input_ids.shape[1]).any() or (pos < first_real).any():
            raise ValueError(f"{site}: position {site.position!r} lies outside the prompt for some examples")


def _rows_by_layer(keys: Iterable[RowKey]) -> dict[int, dict[str, list[str]]]:
    """{layer: {"head": [positions], "mlp": [positions]}}: the modules a trace must visit, in order."""
    layers: dict[int, dict[str, list[str]]] = defaultdict(lambda: {"head": [], "mlp": []})
    for kind, layer, position in sorted(set(keys), key=lambda k: (k[1], k[0] != "head", k[2])):
        layers[layer][kind].append(position)
    return dict(sorted(layers.items()))


def _module(handle: ModelHandle, kind: str, layer: int):
    return handle.arch.attn_out(handle.model, layer) if kind == "head" else handle.arch.mlp(handle.model, layer)


def _read(handle: ModelHandle, kind: str, layer: int):
    module = _module(handle, kind, layer)
    return module.input if kind == "head" else module.output


def _write(handle: ModelHandle, kind: str, layer: int, value) -> None:
    module = _module(handle, kind, layer)
    if kind == "head":
        module.input = value
    else:
        module.output = value


def read_rows(handle: ModelHandle, batch: EncodedBatch, keys: Iterable[RowKey]) -> Activations:
    """Trace-body helper: the saved rows (batch, width) of each key; call inside an open trace."""
    rows = {}
    rng = torch.arange(batch.input_ids.shape[0])
    for layer, kinds in _rows_by_layer(keys).items():
        for kind, positions in kinds.items():
            if not positions:
                continue
            value = _read(handle, kind, layer)
            for position in positions:
                rows[(kind, layer, position)] = value[rng, batch.positions[position]]
    return rows


def collect(handle: ModelHandle, batch: EncodedBatch, sites: Iterable[Site]) -> Activations:
    """The rows the sites live in, from one forward pass on `batch` (no gradient)."""
    keys = {s.row_key for s in sites}
    with torch.no_grad(), handle.trace(batch.inputs()):
        rows = nnsight.save(read_rows(handle, batch, keys))
    return {k: v.detach() for k, v in rows.items()}


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
    batch: EncodedBatch,
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
    rng = torch.arange(batch.input_ids.shape[0])
    for layer, kinds in _rows_by_layer(plan).items():
        for kind, positions in kinds.items():
            if not positions:
                continue
            current = _read(handle, kind, layer)
            patched = current.clone()
            for position in positions:
                key = (kind, layer, position)
                idx = batch.positions[position].to(current.device)
                w = padded.to(current.device)[plan[key].to(current.device)].to(current.dtype)
                row = current[rng, idx]
                patched[rng, idx] = w * row + (1 - w) * values[key].to(current.device, current.dtype)
            _write(handle, kind, layer, patched)


def last_logits(handle: ModelHandle):
    """Trace-body helper: logits at the last position (left padding puts every prompt's end there)."""
    return handle.arch.unembed(handle.model).output[:, -1]


def patched_logits(
    handle: ModelHandle,
    batch: EncodedBatch,
    sites: Sequence[Site],
    values: Activations,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last-position logits of `batch` with `values` blended in at `sites` (one forward pass)."""
    check_sites(handle, sites, batch)
    with torch.no_grad(), handle.trace(batch.inputs()):
        write_blends(handle, batch, sites, values, weights)
        logits = last_logits(handle).save()
    return logits.detach()


def clean_logits(handle: ModelHandle, batch: EncodedBatch) -> torch.Tensor:
    with torch.no_grad(), handle.trace(batch.inputs()):
        logits = last_logits(handle).save()
    return logits.detach()


def activation_patch(
    handle: ModelHandle, original: EncodedBatch, alternate: EncodedBatch, sites: Sequence[Site]
) -> torch.Tensor:
    """Run `original` with each site's output replaced by its output on `alternate` (same named position)."""
    check_sites(handle, sites, original)
    check_sites(handle, sites, alternate)
    return patched_logits(handle, original, sites, collect(handle, alternate, sites))


def mean_activations(handle: ModelHandle, batches: Iterable[EncodedBatch], sites: Sequence[Site]) -> Activations:
    """Mean of each site's row over every example of `batches` (the reference for mean ablation)."""
    sums: Activations = {}
    count = 0
    for batch in batches:
        for key, value in collect(handle, batch, sites).items():
            sums[key] = sums.get(key, 0) + value.sum(0)
        count += batch.input_ids.shape[0]
    if not count:
        raise ValueError("mean_activations needs at least one example")
    return {key: total / count for key, total in sums.items()}


def mean_ablate(
    handle: ModelHandle, batch: EncodedBatch, sites: Sequence[Site], means: Activations
) -> torch.Tensor:
    """Last-position logits with each site's output replaced by its mean."""
    size = batch.input_ids.shape[0]
    values = {key: mean.expand(size, -1) for key, mean in means.items()}
    return patched_logits(handle, batch, sites, values)
