"""The plain-PyTorch reference: lib.patching's reads and blends done with forward hooks, without nnsight.

One forward pre-hook per attention output projection (its input holds the head outputs) and one forward hook
per MLP; inside, every site of that module is blended at its positions: `w * x + (1 - w) * value`, a column
owner per row deciding which weight applies where (the heads of a layer share one row). It uses only the
architecture adapter's module paths and head slices, not lib.patching, so the tests can check the library against
it, and bench/dcm_step.py times the library against the same work.

    rows = capture(module, arch, prompts, sites)              # {(kind, layer, position): (batch, width)}
    logits = blended_logits(module, arch, prompts, sites, weights, rows)   # last-position logits
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from lib.types import EncodedPrompts, Site


def _forward(module: torch.nn.Module, prompts: EncodedPrompts) -> torch.Tensor:
    """Last-position logits with the position ids nnsight derives for left padding."""
    prompts = prompts.to(next(module.parameters()).device)
    position_ids = (prompts.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return module(**prompts.inputs(), position_ids=position_ids).logits[:, -1]


def by_module(arch, sites: Sequence[Site]) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """{(kind, layer): {position: column owner}}: per row, the index of the site owning each column, -1 for none."""
    widths = {"head": arch.n_heads * arch.head_dim, "mlp": arch.d_model}
    out: dict[tuple[str, int], dict[str, torch.Tensor]] = defaultdict(dict)
    for i, site in enumerate(sites):
        comp = site.component
        rows = out[(comp.kind, comp.layer)]
        owner = rows.setdefault(site.position, torch.full((widths[comp.kind],), -1, dtype=torch.long))
        owner[arch.head_slice(comp.head) if comp.is_head else slice(None)] = i
    return dict(out)


def _hook(module: torch.nn.Module, arch, kind: str, layer: int, fn):
    """Register `fn(x) -> x'` on the head outputs (o_proj input) or the MLP output of one layer."""
    if kind == "head":
        return arch.attn_out(module, layer).register_forward_pre_hook(lambda m, args: (fn(args[0]), *args[1:]))
    return arch.mlp(module, layer).register_forward_hook(lambda m, args, out: fn(out))


def capture(module: torch.nn.Module, arch, prompts: EncodedPrompts, sites: Sequence[Site]) -> dict:
    """The rows (batch, width) the sites live in, from one plain forward with no gradient."""
    examples = torch.arange(prompts.size)
    captured, hooks = {}, []
    for (kind, layer), rows in by_module(arch, sites).items():
        def read(x, kind=kind, layer=layer, rows=rows):
            for position in rows:
                captured[(kind, layer, position)] = x[examples, prompts.positions[position]].detach().clone()
            return x
        hooks.append(_hook(module, arch, kind, layer, read))
    try:
        with torch.no_grad():
            _forward(module, prompts)
    finally:
        for h in hooks:
            h.remove()
    return captured


def blended_logits(module: torch.nn.Module, arch, prompts: EncodedPrompts, sites: Sequence[Site],
                   weights: torch.Tensor, values: dict, layers: dict | None = None) -> torch.Tensor:
    """Last-position logits with every site blended (`weights[i]` for `sites[i]`; 1 keeps the run's output).

    values: {(kind, layer, position): (batch, width)} rows to blend in. layers: `by_module(arch, sites)`,
    precomputed (a benchmark builds it once, as lib builds its blend plan once).
    """
    examples = torch.arange(prompts.size)
    padded = torch.cat([weights, torch.ones(1, dtype=weights.dtype)])  # owner -1 -> weight 1 (column left alone)
    hooks = []
    for (kind, layer), rows in (layers or by_module(arch, sites)).items():
        def blend(x, kind=kind, layer=layer, rows=rows):
            new = x.clone()
            for position, owner in rows.items():
                idx = prompts.positions[position]
                w = padded[owner].to(x.device)
                new[examples, idx] = w * x[examples, idx] + (1 - w) * values[(kind, layer, position)]
            return new
        hooks.append(_hook(module, arch, kind, layer, blend))
    try:
        return _forward(module, prompts)
    finally:
        for h in hooks:
            h.remove()


