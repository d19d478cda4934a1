"""Gradient hints: where to look before patching anything. Per site (a component at a position), the norm of the
gradient of a loss against a deliberately wrong answer, from one forward and backward per batch.

The loss compares the answer the model should give (the batch's target) with a wrong answer w:

    margin:        L = logit[target] - logit[w]   (default; how strongly the run prefers the target over w)
    cross_entropy: L = -log p(w)                  (how far the run is from saying w)

and a site's hint is the mean over examples of ||dL/dv||_2 over its slice (a head's columns of the attention
output projection's input, or the MLP output), at the clean original run. A large norm means the site's output
can move the answer; a site no later computation reads gets a zero gradient. Unlike attribution the hint needs
no alternate prompt: it measures sensitivity, not an effect.

The wrong answer (`wrong=`):
- "most_dissimilar": per example, the candidate token whose unembedding row has the lowest cosine similarity
  with the target's (the answer the model's own read-out points furthest away from); ties, e.g. among
  orthogonal rows, go to the candidate with the lowest clean logit;
- "lowest_logit": per example, the candidate with the lowest clean logit;
- a token id or a token string: that token for every example.
`candidates` restricts the choice (e.g. to the task's answer words); by default every token but the target.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from lib.attribution import _columns, row_gradients, site_heatmap
from lib.core.handle import ModelHandle
from lib.data.encoding import answer_token_id
from lib.patching import check_sites, order_sites
from lib.types import PairBatch, Site

WrongChoice = Literal["most_dissimilar", "lowest_logit"]
"""How the wrong answer is chosen per example (see the module docstring); a token id or string fixes it."""

HintLoss = Literal["margin", "cross_entropy"]
"""The loss whose gradient is taken. margin: logit[target] - logit[wrong]; cross_entropy: -log p(wrong)."""

WRONG_CHOICES: tuple[str, ...] = get_args(WrongChoice)
HINT_LOSSES: tuple[str, ...] = get_args(HintLoss)


def _candidate_mask(vocab: int, targets: torch.Tensor, candidates: Sequence[int] | None) -> torch.Tensor:
    """(batch, vocab) True where a token may be the wrong answer: a candidate, and not the example's target."""
    allowed = torch.ones(vocab, dtype=torch.bool)
    if candidates is not None:
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[torch.as_tensor(list(candidates), dtype=torch.long)] = True
    mask = allowed[None].repeat(len(targets), 1)
    mask[torch.arange(len(targets)), targets] = False
    if not mask.any(-1).all():
        raise ValueError("no wrong answer left to choose: the candidates hold only the target")
    return mask


def choose_wrong(unembedding: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, choice: WrongChoice,
                 candidates: Sequence[int] | None = None) -> torch.Tensor:
    """(batch,) the wrong answer per example.

    Args:
        unembedding: (vocab, d_model) the unembedding matrix (rows = the direction each token's logit reads).
        logits: (batch, vocab) the clean last-position logits.
        targets: (batch,) the right answers.
        choice: "most_dissimilar" or "lowest_logit" (WrongChoice).
        candidates: token ids the wrong answer is chosen from (default every token).
    """
    logits = logits.float().cpu()
    mask = _candidate_mask(logits.shape[1], targets.cpu(), candidates)
    if choice == "lowest_logit":
        return logits.masked_fill(~mask, float("inf")).argmin(-1)
    weight = unembedding.detach()
    picked = weight[targets.to(weight.device)].float()
    norms = weight.float().norm(dim=-1).clamp_min(1e-12)               # a zero row has cosine 0 with everything
    cosine = (picked @ weight.float().T / norms / norms[targets.to(weight.device)][:, None]).cpu()  # (batch, vocab)
    cosine = cosine.masked_fill(~mask, float("inf"))
    lowest = cosine.min(-1, keepdim=True).values
    tied = cosine <= lowest + 1e-6
    return logits.masked_fill(~tied, float("inf")).argmin(-1)


def _fixed_wrong(handle: ModelHandle, batch: PairBatch, wrong: WrongChoice | int | str) -> torch.Tensor | None:
    """(batch,) the given wrong token for every example, or None when it is chosen per example."""
    targets = batch.require_targets("gradient hints")
    if isinstance(wrong, str) and wrong in WRONG_CHOICES:
        return None
    token = wrong
    if isinstance(wrong, str):
        not_a_token = f"wrong={wrong!r} is neither a choice ({', '.join(WRONG_CHOICES)}) nor one token of the vocabulary"
        try:
            token = answer_token_id(handle.tokenizer, wrong)
        except ValueError as err:
            raise ValueError(f"{not_a_token}: {err}") from err
        if token == handle.tokenizer.unk_token_id:
            raise ValueError(not_a_token)
    vocab = handle.lm.config.vocab_size
    if not 0 <= token < vocab:
        raise ValueError(f"wrong answer token id {token} is outside the vocabulary (size {vocab})")
    if (targets == token).any():
        raise ValueError(f"the wrong answer {wrong!r} (token {token}) is the target of some examples: choose another")
    return torch.full_like(targets, token)


def hint_loss(kind: HintLoss, logits: torch.Tensor, targets: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """(batch,) the loss whose gradient norm is the hint."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    if kind == "margin":
        return logits[rows, targets.to(logits.device)] - logits[rows, wrong.to(logits.device)]
    return -logits.log_softmax(-1)[rows, wrong.to(logits.device)]


class _Objective:
    """The hint loss as a Metric (logits, batch) -> (batch,), choosing the wrong answer from the same run's
    logits. A plain class with its methods in source, so it can travel to an NDIF server."""

    def __init__(self, kind: str, choice: str, fixed: torch.Tensor | None, unembedding: torch.Tensor | None,
                 candidates: list[int] | None):
        self.kind = kind
        self.choice = choice
        self.fixed = fixed
        self.unembedding = unembedding
        self.candidates = candidates

    def __call__(self, logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        wrong = self.fixed
        if wrong is None:
            wrong = choose_wrong(self.unembedding, logits.detach(), batch.target_ids, self.choice, self.candidates)
        return hint_loss(self.kind, logits, batch.target_ids, wrong)


def _hints_batch(handle: ModelHandle, batch: PairBatch, sites: list[Site], kind: str, choice: str,
                 fixed: torch.Tensor | None, candidates: list[int] | None) -> torch.Tensor:
    """(n_sites,) summed gradient norms over the batch's examples; one forward and backward, one request."""
    unembedding = None
    if fixed is None and choice == "most_dissimilar":
        unembedding = handle.arch.unembed(handle.lm._module).weight.detach()  # on the server: the real weights
    objective = _Objective(kind, choice, fixed, unembedding, candidates)
    _, grads, _ = row_gradients(handle, batch, [s.row_key for s in sites], objective)
    return torch.stack([grads[s.row_key][:, _columns(handle, s)].float().norm(dim=-1).sum() for s in sites]).cpu()


def gradient_hints(
    handle: ModelHandle,
    batches: Iterable[PairBatch],
    sites: Sequence[Site],
    *,
    wrong: WrongChoice | int | str = "most_dissimilar",
    loss: HintLoss = "margin",
    candidates: Sequence[int] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """The gradient norm of a loss against a wrong answer at every site, averaged over examples.

    Args:
        batches: PairBatches (only `original` and `target_ids` are used; no alternate needed).
        sites: heads and MLPs at named positions.
        wrong: "most_dissimilar", "lowest_logit" (per example), or one token id / token string for all.
        loss: "margin" (logit[target] - logit[wrong]) or "cross_entropy" (-log p(wrong)).
        candidates: token ids the wrong answer is chosen from (e.g. the task's answer words); default all.

    Returns:
        (len(sites),) mean ||dL/dv|| per site, in the order given.
    """
    if loss not in HINT_LOSSES:
        raise ValueError(f"loss={loss!r}; choose one of {', '.join(HINT_LOSSES)}")
    if isinstance(wrong, bool) or not isinstance(wrong, (int, str)):
        raise ValueError(f"wrong={wrong!r}: give {', '.join(WRONG_CHOICES)}, a token id or a token string")
    sites = list(sites)
    order = order_sites(sites)
    batches = list(batches)
    if not batches:
        raise ValueError("gradient_hints needs at least one batch")
    for batch in batches:
        check_sites(handle, order, batch.original)
    totals, count = torch.zeros(len(order)), 0
    for batch in tqdm(batches, desc="gradient hints", disable=not progress or handle.remote or len(batches) < 5,
                      leave=False):
        fixed = _fixed_wrong(handle, batch, wrong)
        choice = wrong if fixed is None else "given"
        totals += handle.in_one_request(_hints_batch, batch, order, loss, choice, fixed,
                                        None if candidates is None else [int(c) for c in candidates])
        count += batch.size
    per_site = dict(zip(order, totals / count))
    return torch.stack([per_site[s] for s in sites])


def hints_heatmap(path: Path, handle: ModelHandle, sites: Sequence[Site], hints: torch.Tensor, position: str,
                  title: str | None = None) -> Path:
    """A layer x (heads, MLP) PNG of the hints at one position (lib.report.heatmap)."""
    return site_heatmap(path, handle, sites, hints, position, title or f"gradient hints at {position}: mean |dL/dv|")
