"""Circuit evaluation of Prakash et al. (2024): accuracy, logit difference, faithfulness, completeness, minimality.

A circuit is a set of `Site`s (a head at a named token position, e.g. L2H3@last). "Every head not in the circuit
mean-ablated" means every head at *every* token index, not only at the named positions. Named positions are
per example (prev_query_label depends on which box is queried):

- An ablated run is one forward pass: every layer's head outputs (the o_proj input, at every token) are blended
  with their means through a mask (example, token, head) that is 1 where the circuit keeps a head, so a named
  site is kept at its own token in each example.
- The mean of a head at index t is over reference prompts of the **same length** (entity prompts with a fixed
  number of boxes and single-token objects/labels, e.g. the word-level tokenizer), so index t is the same token
  role in every prompt. Prompts of mixed lengths get a clear error.

MLPs are never ablated (the paper ablates heads). F is a metric of the last position's logits, by default the
accuracy of its argmax (lib.scores.target_hit).

Minimality comes in two readings: `minimality` is the authors' code (per group, pair-drop ranking, K = top 30%,
relative 1% threshold; `minimal_sites` applies it), `greedy_minimality` this project's earlier greedy K.
"""
from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from lib.core.handle import ModelHandle
from lib.patching import (clean_logits, is_token_position, last_logits, mean_activations, read_value, write_value,
                          with_token_positions)
from lib.patching import token_position as tok
from lib.scores import target_hit
from lib.types import Activations, Component, Metric, PairBatch, Site

log = logging.getLogger(__name__)


def check_same_length(batches: Sequence[PairBatch]) -> int:
    """The common prompt length of the original runs; whole-sequence ablation compares token index t across
    prompts."""
    lengths = {int(n) for b in batches for n in b.original.attention_mask.sum(1)}
    widths = {b.original.width for b in batches}
    if len(lengths) != 1 or widths != lengths:
        raise ValueError(f"whole-sequence mean ablation needs prompts of one token length, got lengths "
                         f"{sorted(lengths)}: use one number of boxes and single-token objects and labels")
    return lengths.pop()


def head_sites(handle: ModelHandle, width: int, layers: Iterable[int] | None = None) -> list[Site]:
    """Every head at every token index (of the given layers)."""
    arch = handle.arch
    layers = range(arch.n_layers) if layers is None else layers
    return [Site(Component(layer, h), tok(t)) for layer in layers for h in range(arch.n_heads) for t in range(width)]


def whole_sequence_means(handle: ModelHandle, batches: Sequence[PairBatch]) -> Activations:
    """Mean output of every head at every token index over the original runs of `batches` (one length)."""
    width = check_same_length(batches)
    return mean_activations(handle, [with_token_positions(b).original for b in batches], head_sites(handle, width))


# ------------------------------------------------------------------------------------------------------------
# Ablated runs
# ------------------------------------------------------------------------------------------------------------


def _keep_mask(handle: ModelHandle, batch: PairBatch, sites: Sequence[Site], keep: bool) -> torch.Tensor:
    """(n_layers, batch, tokens, n_heads): 1 where a head's output stays, 0 where it is replaced by its mean.

    keep=True: 1 only at `sites` (everything else ablated); keep=False: 0 only at `sites`. Named positions are
    read per example, absolute ones ("t12") are the same token in every example.
    """
    arch, original = handle.arch, batch.original
    mask = torch.full((arch.n_layers, original.size, original.width, arch.n_heads), 0.0 if keep else 1.0)
    rows = torch.arange(original.size)
    for site in sites:
        if not site.component.is_head:
            raise ValueError(f"{site}: whole-sequence ablation covers heads; MLPs are never ablated")
        site.component.check(arch)
        if is_token_position(site.position):
            index = torch.full((original.size,), int(site.position[1:]), dtype=torch.long)
        elif site.position in original.positions:
            index = original.positions[site.position]
        else:
            raise ValueError(f"position {site.position!r} is not defined for these prompts; "
                             f"available: {', '.join(sorted(original.positions))}")
        mask[site.component.layer, rows, index, site.component.head] = 1.0 if keep else 0.0
    return mask


def _mean_rows(handle: ModelHandle, means: Activations, width: int) -> torch.Tensor:
    """(n_layers, tokens, n_heads * head_dim): the whole-sequence means stacked per layer."""
    arch = handle.arch
    try:
        return torch.stack([torch.stack([means[("head", layer, tok(t))] for t in range(width)])
                            for layer in range(arch.n_layers)])
    except KeyError as err:
        raise ValueError(f"the means have no entry {err.args[0]}: compute them with whole_sequence_means on prompts of "
                         f"this length ({width} tokens)") from None


def _ablated_run(handle: ModelHandle, batch: PairBatch, mask: torch.Tensor, mean_rows: torch.Tensor) -> torch.Tensor:
    """Trace: every head output blended as mask * own + (1 - mask) * mean, at every token, in one forward pass."""
    arch = handle.arch
    with torch.no_grad(), handle.trace(batch.original.inputs()):
        for layer in range(arch.n_layers):
            current = read_value(handle, "head", layer)
            m = mask[layer].repeat_interleave(arch.head_dim, dim=-1).to(current.device, current.dtype)
            mean = mean_rows[layer].to(current.device, current.dtype)
            write_value(handle, "head", layer, m * current + (1 - m) * mean)
        logits = last_logits(handle).save()
    return logits.detach()


def ablated_logits(
    handle: ModelHandle, batch: PairBatch, keep: Sequence[Site] | None, means: Activations,
    ablate: Sequence[Site] | None = None,
) -> torch.Tensor:
    """Last-position logits (batch, vocab) with heads mean-ablated over the whole sequence.

    keep given: every head at every token index except the `keep` sites is ablated (the circuit run F(Cir)).
    ablate given: only those sites are ablated (the model run F(M\\K)). Exactly one of the two. One forward pass:
    every layer's head outputs are blended with their means through a per-example, per-token, per-head mask.
    """
    if (keep is None) == (ablate is None):
        raise ValueError("give either keep (the circuit) or ablate (the sites to remove), not both")
    width = check_same_length([batch])
    mask = _keep_mask(handle, batch, keep if keep is not None else ablate, keep is not None)
    return _ablated_run(handle, batch, mask, _mean_rows(handle, means, width))


def _scores_of(handle: ModelHandle, batches: list[PairBatch], keep: list[Site] | None, ablate: list[Site] | None,
               means: Activations | None, metric: Metric) -> tuple[float, int]:
    total, count = 0.0, 0
    for b in batches:
        if keep is None and not ablate:
            logits = clean_logits(handle, b.original)
        else:
            logits = ablated_logits(handle, b, keep, means, ablate=ablate if keep is None else None)
        total += float(metric(logits, b).sum())
        count += b.size
    return total, count


def _mean_score(handle: ModelHandle, batches: Sequence[PairBatch], keep: Sequence[Site] | None,
                ablate: Sequence[Site] | None, means: Activations | None, metric: Metric) -> float:
    """The mean metric of a (partly) ablated model over every example; remotely one request for all batches."""
    total, count = handle.in_one_request(_scores_of, list(batches), None if keep is None else list(keep),
                                         None if ablate is None else list(ablate), means, metric)
    return total / count


def circuit_accuracy(handle: ModelHandle, batches: Sequence[PairBatch], circuit: Sequence[Site],
                     means: Activations, metric: Metric = target_hit) -> float:
    """F(Cir): the metric (default accuracy) with every head not in `circuit` mean-ablated at every token."""
    return _mean_score(handle, batches, list(circuit), None, means, metric)


def model_accuracy(handle: ModelHandle, batches: Sequence[PairBatch], means: Activations,
                   without: Sequence[Site] = (), metric: Metric = target_hit) -> float:
    """F(M) or, with `without`, F(M\\K): the full model with only the sites K mean-ablated."""
    return _mean_score(handle, batches, None, list(without), means, metric)


def faithfulness(handle: ModelHandle, batches: Sequence[PairBatch], circuit: Sequence[Site],
                 means: Activations) -> dict[str, float]:
    """{"model": F(M), "circuit": F(Cir), "faithfulness": F(Cir) / F(M)}."""
    full = model_accuracy(handle, batches, means)
    cir = circuit_accuracy(handle, batches, circuit, means)
    return {"model": full, "circuit": cir, "faithfulness": cir / full if full else float("nan")}


def completeness(handle: ModelHandle, batches: Sequence[PairBatch], circuit: Sequence[Site],
                 removed: Sequence[Site], means: Activations) -> float:
    """|F(Cir \\ K) - F(M \\ K)|: a complete circuit loses as much as the model when K is knocked out."""
    removed = set(removed)
    cir = circuit_accuracy(handle, batches, [s for s in circuit if s not in removed], means)
    mod = model_accuracy(handle, batches, means, without=sorted(removed))
    return abs(cir - mod)


def random_subsets(circuit: Sequence[Site], n: int, fraction: float = 0.5, seed: int = 0) -> list[list[Site]]:
    """n random subsets K of the circuit, each of round(fraction * size) sites (at least one)."""
    rng = random.Random(seed)
    k = max(1, round(fraction * len(circuit)))
    return [sorted(rng.sample(sorted(circuit), k)) for _ in range(n)]


def random_circuit(handle: ModelHandle, circuit: Sequence[Site], seed: int = 0) -> list[Site]:
    """A random circuit with the same number of heads at each position (heads drawn uniformly at that position)."""
    rng = random.Random(seed)
    heads = [Component(layer, h) for layer in range(handle.arch.n_layers) for h in range(handle.arch.n_heads)]
    counts = Counter(s.position for s in circuit if s.component.is_head)
    return sorted(Site(c, pos) for pos, n in sorted(counts.items()) for c in rng.sample(heads, n))


def random_circuit_accuracy(handle: ModelHandle, batches: Sequence[PairBatch], circuit: Sequence[Site],
                            means: Activations, n: int = 10, seed: int = 0) -> list[float]:
    """F of n random circuits with the circuit's per-position head counts (the paper's baseline, n = 10)."""
    return [circuit_accuracy(handle, batches, random_circuit(handle, circuit, seed + i), means) for i in range(n)]


def circuit_evaluation(handle: ModelHandle, batches: Sequence[PairBatch], circuit: Sequence[Site],
                       means: Activations, groups: Mapping[str, Sequence[Site]] | None = None, n_random: int = 10,
                       n_subsets: int = 5, seed: int = 0) -> dict:
    """One model's circuit evaluation as the paper tabulates it (Table 1 and the completeness table), remotely in
    one NDIF request: the means travel once instead of with each of the ~30 ablated runs.

    The random circuits and subsets are drawn here, on the client, with the same seeds as random_circuit_accuracy
    and random_subsets, so a remote evaluation equals the local one.

    Args:
        circuit: the circuit's sites; means: whole-sequence means (whole_sequence_means).
        groups: {name: sites K} for the per-group completeness rows (none by default).
        n_random: random circuits (seeds seed .. seed + n_random - 1); n_subsets: random halves K of the circuit.

    Returns:
        {"model": F(M), "circuit": F(Cir), "faithfulness", "random_circuits": [F] * n_random,
        "completeness_per_group": {name: value}, "completeness_random_K": [value] * n_subsets}.
    """
    circuit = list(circuit)
    randoms = [random_circuit(handle, circuit, seed + i) for i in range(n_random)]
    subsets = random_subsets(circuit, n_subsets, seed=seed) if n_subsets else []
    named = {name: list(sites) for name, sites in (groups or {}).items()}
    return handle.in_one_request(_circuit_evaluation, list(batches), circuit, means, named, randoms, subsets)


def _circuit_evaluation(handle: ModelHandle, batches: list[PairBatch], circuit: list[Site], means: Activations,
                        groups: dict[str, list[Site]], randoms: list[list[Site]], subsets: list[list[Site]]) -> dict:
    row = faithfulness(handle, batches, circuit, means)
    row["random_circuits"] = [circuit_accuracy(handle, batches, c, means) for c in randoms]
    row["completeness_per_group"] = {name: completeness(handle, batches, circuit, k, means)
                                     for name, k in groups.items()}
    row["completeness_random_K"] = [completeness(handle, batches, circuit, k, means) for k in subsets]
    return row


def greedy_minimality(handle: ModelHandle, batches: Sequence[PairBatch], circuit: Sequence[Site],
                      means: Activations, max_k: int | None = None) -> dict[Site, float]:
    """Per site v: max over greedily grown K of |F(Cir \\ (K + v)) - F(Cir \\ K)| (this project's first reading of
    the paper's minimality; `minimality` is the authors' code).

    K starts empty and grows by the site that most increases the score, up to `max_k` sites (default: 30% of the
    circuit, as in the paper). A site whose score stays below ~0.01 contributes nothing and can be pruned.
    """
    circuit = sorted(set(circuit))
    max_k = max_k if max_k is not None else int(0.3 * len(circuit))
    cache: dict[frozenset, float] = {}

    def f(removed: frozenset) -> float:
        if removed not in cache:
            cache[removed] = circuit_accuracy(handle, batches, [s for s in circuit if s not in removed], means)
        return cache[removed]

    scores = {}
    for v in circuit:
        k: frozenset = frozenset()
        best = abs(f(k | {v}) - f(k))
        for _ in range(max_k):
            options = [s for s in circuit if s != v and s not in k]
            if not options:
                break
            gains = {s: abs(f(k | {s, v}) - f(k | {s})) for s in options}
            s = max(gains, key=gains.get)
            k = k | {s}
            best = max(best, gains[s])
        scores[v] = best
    return scores


MINIMALITY_FRACTION = 0.3
MINIMALITY_THRESHOLD = 0.01


def minimality(handle: ModelHandle, batches: Sequence[PairBatch], groups: Mapping[str, Sequence[Site]],
               means: Activations, fraction: float = MINIMALITY_FRACTION, metric: Metric = target_hit,
               progress: bool = True) -> dict[Site, dict]:
    """The minimality of every site, as the authors' code computes it (Nix07/finetuning, path_patching/).

    For each site v of a group, the other sites vj of the same group are ranked by the pair-drop value
    F(Cir \\ {vj}) - F(Cir \\ {v, vj}) (how much more removing vj costs once v is gone); K = the first
    ceil(fraction * group size) of that ranking, stopping at the first value <= 0. The score is
    F(Cir \\ K) / F(Cir \\ (K + v)) - 1 (relative and signed); v is kept when it is >= 0.01 (`minimal_sites`).
    F: `metric` (default accuracy) with every head outside the remaining circuit mean-ablated (circuit_accuracy);
    the circuit is the union of all groups. A zero denominator gives +inf when F(Cir \\ K) > 0 (v carries all
    that is left) and 0.0 when both are 0 (nothing to lose).

    Where we differ from their code: every pair is evaluated (their loop skips pairs that share a layer index or a
    head index: `layer_1 is not layer_2 and head_1 is not head_2` should be `or`), and F is not rounded to 2 decimals.

    Args:
        groups: {group name: sites}; one group for a flat circuit.
        means: whole-sequence means (whole_sequence_means).

    Returns:
        {site: {"group", "score", "K": [sites], "F_without_K", "F_without_K_and_v"}}.
    """
    circuit = sorted({s for g in groups.values() for s in g})
    cache: dict[frozenset, float] = {}

    def f(removed: frozenset) -> float:
        if removed not in cache:
            kept = [s for s in circuit if s not in removed]
            cache[removed] = _mean_score(handle, batches, kept, None, means, metric)
        return cache[removed]

    out: dict[Site, dict] = {}
    total = sum(len(g) for g in groups.values())
    with tqdm(total=total, desc="minimality", leave=False, disable=not progress or total < 5) as bar:
        for name, group in groups.items():
            group = sorted(set(group))
            size = math.ceil(fraction * len(group))
            for v in group:
                ranked = sorted(((f(frozenset({vj})) - f(frozenset({v, vj})), vj) for vj in group if vj != v),
                                key=lambda item: -item[0])
                k = []
                for value, vj in ranked[:size]:
                    if value <= 0:   # the ranking is sorted: the rest are no better
                        break
                    k.append(vj)
                without_k, without_kv = f(frozenset(k)), f(frozenset(k) | {v})
                if without_kv:
                    score = without_k / without_kv - 1
                else:
                    score = math.inf if without_k > 0 else 0.0
                out[v] = {"group": name, "score": score, "K": k, "F_without_K": without_k,
                          "F_without_K_and_v": without_kv}
                bar.update()
    return out


def minimal_sites(scores: Mapping[Site, dict], threshold: float = MINIMALITY_THRESHOLD) -> list[Site]:
    """The sites `minimality` keeps: score >= threshold (the authors' 1%)."""
    return sorted(s for s, row in scores.items() if row["score"] >= threshold)
