"""The logit lens: the residual stream after each layer, and each component's output, read through the final norm
and the unembedding at one token position.

Two readings, and how exact each is:

- **Residual stream after layer L** (the input of block L+1; after the last block, the final norm's input): the
  model's own final norm and unembedding applied to it, `unembed(final_norm(resid_L))` (nostalgebraist 2020). At
  the last layer this *is* the model's computation: the lens equals the model's logits.
- **A component's output** (a head's part of the attention output, an MLP's output): a component is one summand
  of the final residual stream x, and LayerNorm / RMSNorm are not linear, so `final_norm(c)` alone would
  normalise c by its own scale, a quantity with no meaning for the model. Instead the norm is read with its
  scale frozen at the full residual stream's, as TransformerLens's direct logit attribution does
  (`apply_ln_to_stack`): with P the centring of a LayerNorm (the identity for RMSNorm) and
  s(z) = sqrt(mean(P(z)^2) + eps) the norm's scale,

      frozen(c) = gain * P(c) / s(x)        (computed as (final_norm(c) - final_norm(0)) * s(c) / s(x))
      logits(c) = unembed(frozen(c)) - unembed(0)

  frozen is linear, and the frozen readings of all the summands of x (embeddings, every head, the attention
  output biases, every MLP) add up to `final_norm(x) - final_norm(0)`: the components' logits plus the norm's
  bias read through the unembedding are the model's logits. The formula uses the module's own forward for the
  gain (so Gemma's `1 + weight` needs no special case) and only needs to know whether the norm centres
  (torch.nn.LayerNorm) and its epsilon.

Families that normalise a block's attention / MLP output before the residual add (gemma2) have no such
decomposition; their components are refused (the residual stream reading still works).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nnsight
import numpy as np
import torch

from lib import report
from lib.attribution import POST_NORM_FAMILIES
from lib.core.handle import ModelHandle
from lib.types import EncodedPrompts, PairBatch

LensValue = Literal["rank", "logprob"]
"""What the lens heatmap shows per cell: the target's rank (0 = top token) or its log-probability."""


# ---- the frozen final norm --------------------------------------------------------------------------------------


def norm_kind(handle: ModelHandle) -> tuple[bool, float]:
    """(centres, epsilon) of the model's final norm: LayerNorm centres, RMSNorm does not."""
    norm = handle.arch.final_norm(handle.lm._module)
    if isinstance(norm, torch.nn.LayerNorm):
        return True, float(norm.eps)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise ValueError(f"the final norm {type(norm).__name__} is neither a torch LayerNorm nor an RMSNorm with "
                         "`variance_epsilon` / `eps`: the logit lens cannot freeze its scale")
    return False, float(eps)


def norm_scale(z: torch.Tensor, center: bool, eps: float) -> torch.Tensor:
    """s(z) = sqrt(mean(P(z)^2) + eps) over the last dimension, kept as (..., 1)."""
    z = z.float()
    if center:
        z = z - z.mean(-1, keepdim=True)
    return (z.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def frozen_norm(handle: ModelHandle, parts: torch.Tensor, final: torch.Tensor, center: bool,
                eps: float) -> torch.Tensor:
    """The final norm's linear part at the full residual stream `final`, applied to `parts`.

    Args:
        parts: (..., batch, d_model) summands of the residual stream (components' outputs).
        final: (batch, d_model) the full final residual stream (the final norm's input) of the same examples.
        center, eps: norm_kind(handle).

    Returns:
        (..., batch, d_model) gain * P(parts) / s(final); sums of parts map to sums. Inside a trace it calls the
        norm module ad hoc; outside one it is a plain module call.
    """
    norm = handle.arch.final_norm(handle.model)
    own = norm(parts) - norm(torch.zeros_like(parts))
    return own.float() * norm_scale(parts, center, eps) / norm_scale(final, center, eps)


def component_logits(handle: ModelHandle, parts: torch.Tensor, final: torch.Tensor, center: bool,
                     eps: float) -> torch.Tensor:
    """(..., batch, vocab) direct logits of residual-stream summands: unembed(frozen_norm(parts)) - unembed(0)."""
    unembed = handle.arch.unembed(handle.model)
    frozen = frozen_norm(handle, parts, final, center, eps).to(final.dtype)
    return (unembed(frozen) - unembed(torch.zeros_like(frozen))).float()


# ---- the lens ---------------------------------------------------------------------------------------------------


@dataclass
class LogitLens:
    """The lens of a batch at one position: per example, layer and column (heads H0.., "MLP", "resid").

    target_rank: (batch, n_layers, n_columns) tokens with a higher logit than the target (0 = top), tied tokens
        counted half.
    target_logprob: (batch, n_layers, n_columns) log-softmax of the reading at the target.
    top_ids, top_logits: (batch, n_layers, n_columns, k) the k highest tokens of each reading.
    model_logits: (batch, vocab) the model's own logits at the position (the last layer's "resid" reading).
    """

    position: str
    columns: list[str]
    target_ids: torch.Tensor
    target_rank: torch.Tensor
    target_logprob: torch.Tensor
    top_ids: torch.Tensor
    top_logits: torch.Tensor
    model_logits: torch.Tensor

    @property
    def n_layers(self) -> int:
        """Number of layers read."""
        return self.target_rank.shape[1]

    def mean(self, value: LensValue = "rank") -> np.ndarray:
        """(n_layers, n_columns) mean over examples of the target's rank or log-probability."""
        table = self.target_rank.float() if value == "rank" else self.target_logprob
        return table.mean(0).numpy()


def _summaries(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(batch, columns, vocab) readings -> target rank, target log-prob, top-k ids and logits."""
    logits = logits.float()
    target = logits.gather(-1, targets[:, None, None].expand(-1, logits.shape[1], 1))
    # tokens above the target, ties counted half (a reading with every logit equal puts the target mid-table,
    # not on top)
    rank = (logits > target).sum(-1) + ((logits == target).sum(-1) - 1) / 2
    logprob = logits.log_softmax(-1).gather(-1, targets[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
    top = logits.topk(k, dim=-1)
    return rank, logprob, top.indices, top.values


def _lens_batch(handle: ModelHandle, prompts: EncodedPrompts, targets: torch.Tensor, position: str, k: int,
                components: bool, center: bool, eps: float) -> tuple[torch.Tensor, ...]:
    """One forward pass and the lens of every layer and column (one request remotely)."""
    arch = handle.arch
    n_heads, width = arch.n_heads, arch.n_heads * arch.head_dim
    with torch.no_grad(), handle.trace(prompts.inputs()):
        examples = torch.arange(prompts.size)
        resid, heads, mlps = [], [], []
        for layer in range(arch.n_layers):
            if components:
                z = arch.attn_out(handle.model, layer).input
                heads.append(z[examples.to(z.device), prompts.positions[position].to(z.device)])
                out = arch.mlp(handle.model, layer).output
                mlps.append(out[examples.to(out.device), prompts.positions[position].to(out.device)])
            following = arch.layer(handle.model, layer + 1) if layer + 1 < arch.n_layers else arch.final_norm(
                handle.model)
            x = following.input
            resid.append(x[examples.to(x.device), prompts.positions[position].to(x.device)])
        logits = arch.unembed(handle.model).output
        model_logits = logits[examples.to(logits.device), prompts.positions[position].to(logits.device)].float()
        final = resid[-1]
        targets = targets.to(final.device)
        blocks = []
        for layer in range(arch.n_layers):
            x = resid[layer].to(final.device)
            readings = [arch.unembed(handle.model)(arch.final_norm(handle.model)(x)).float()[:, None]]
            if components:
                z = heads[layer].to(final.device)
                masks = torch.zeros(n_heads, width, device=z.device, dtype=z.dtype)
                for h in range(n_heads):
                    masks[h, arch.head_slice(h)] = 1
                out_proj = arch.attn_out(handle.model, layer)
                per_head = out_proj(z[None] * masks[:, None]) - out_proj(torch.zeros_like(z))[None]  # (H, batch, d)
                parts = torch.cat([per_head, mlps[layer].to(final.device)[None]])        # (H + 1, batch, d)
                direct = component_logits(handle, parts.to(final.dtype), final, center, eps)
                readings = [direct.transpose(0, 1), *readings]
            blocks.append(_summaries(torch.cat(readings, 1), targets, k))
        out = tuple(torch.stack([b[i] for b in blocks], 1).cpu() for i in range(4))
        result = nnsight.save((*out, model_logits.cpu()))
    return result


def logit_lens(handle: ModelHandle, batch: PairBatch, position: str = "last", k: int = 5,
               components: bool = True) -> LogitLens:
    """Read every layer's residual stream (and each head's and MLP's output) at `position` as logits.

    Args:
        batch: its original run is read; `target_ids` (batch,) is the token whose rank is reported (e.g. the
            answer: lib.data_gen.encode_answers / encode_pairs).
        position: a named position of the prompts ("last" = where the answer is read).
        k: top tokens kept per reading.
        components: also read each head and MLP output (direct logits through the frozen final norm).

    Returns:
        LogitLens with columns ["H0".."H{n-1}", "MLP", "resid"] (or ["resid"]); one request remotely.
    """
    targets = batch.require_targets("the logit lens")
    if position not in batch.original.positions:
        raise ValueError(f"position {position!r} is not defined for these prompts; available: "
                         f"{', '.join(sorted(batch.original.positions))}")
    vocab = handle.lm.config.vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    if components and handle.arch.model_type in POST_NORM_FAMILIES:
        raise ValueError(f"{handle.arch.model_type} normalises each block's attention and MLP outputs before the "
                         "residual add, so its components have no direct logits; use components=False (the residual "
                         "stream reading)")
    center, eps = norm_kind(handle)
    rank, logprob, top_ids, top_logits, model_logits = handle.in_one_request(
        _lens_batch, batch.original, targets, position, k, components, center, eps)
    columns = ([f"H{h}" for h in range(handle.arch.n_heads)] + ["MLP"] if components else []) + ["resid"]
    return LogitLens(position, columns, targets.cpu(), rank, logprob, top_ids, top_logits, model_logits)


# ---- showing it -------------------------------------------------------------------------------------------------


def _token(tokenizer: Any, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(int(token_id)).replace("|", "\\|")


def lens_table(lens: LogitLens, tokenizer: Any, example: int = 0, columns: Sequence[str] | None = None) -> str:
    """A markdown table (lib.report.markdown_table) of one example's lens: per layer and column, the top tokens,
    the target's rank and log-probability; `columns` keeps a subset (e.g. ["resid"])."""
    if not 0 <= example < lens.target_rank.shape[0]:
        raise ValueError(f"example {example} out of range: the lens holds {lens.target_rank.shape[0]} examples")
    keep = list(columns) if columns is not None else lens.columns
    unknown = [c for c in keep if c not in lens.columns]
    if unknown:
        raise ValueError(f"unknown lens columns {unknown}; available: {', '.join(lens.columns)}")
    target = _token(tokenizer, lens.target_ids[example])
    rows = []
    for layer in range(lens.n_layers):
        for name in keep:
            j = lens.columns.index(name)
            tops = " ".join(f"`{_token(tokenizer, t)}`" for t in lens.top_ids[example, layer, j])
            rows.append([layer, name, tops, f"{float(lens.target_rank[example, layer, j]):g}",
                         f"{float(lens.target_logprob[example, layer, j]):.2f}"])
    return report.markdown_table(["layer", "reading", "top tokens", f"rank of `{target}`", "log-prob"], rows)


def lens_heatmap(path: Path, lens: LogitLens, value: LensValue = "rank", title: str | None = None) -> Path:
    """A PNG of the mean (over examples) target rank or log-probability per layer x column."""
    if value not in ("rank", "logprob"):
        raise ValueError(f"value={value!r}; choose 'rank' or 'logprob'")
    grid = lens.mean(value)
    title = title or f"logit lens at {lens.position}: mean target {'rank (0 = top)' if value == 'rank' else 'log-prob'}"
    low, high = (0.0, max(float(grid.max()), 1.0)) if value == "rank" else (min(float(grid.min()), -1e-3), 0.0)
    cmap = "viridis_r" if value == "rank" else "viridis"
    return report.heatmap(path, grid, title, xlabel="reading", vmin=low, vmax=high, cmap=cmap,
                          xticklabels=lens.columns)
