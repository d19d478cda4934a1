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

from lib.components import Component
from lib.data_gen import EncodedBatch
from lib.metrics import absolute, answer_prob, check_same_length, fixed_groups, head_sites
from lib.models import ModelHandle
from lib.patching import (
    Site, clean_logits, collect, last_logits, patched_logits, read_rows, with_token_positions, write_blends,
)

log = logging.getLogger(__name__)

DEFAULT_POSITIONS = ("last", "query_label", "prev_query_label", "correct_object")


def candidate_senders(handle: ModelHandle, positions: Sequence[str] = DEFAULT_POSITIONS,
                      receivers: Sequence[Site] | None = None) -> list[Site]:
    """Every head at each position; with receivers, only heads in layers below the last receiver's, minus R."""
    top = handle.arch.n_layers if not receivers else max(r.component.layer for r in receivers)
    skip = set(receivers or ())
    return [s for layer in range(top) for h in range(handle.arch.n_heads) for p in positions
            if (s := Site(Component(layer, h), p)) not in skip]


def _run_a(handle: ModelHandle, batch: EncodedBatch, sender: Site, receivers: Sequence[Site],
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
    original: EncodedBatch,
    noise: EncodedBatch,
    senders: Sequence[Site] | None = None,
    receivers: Sequence[Site] | None = None,
) -> dict[Site, float]:
    """Score of every sender's path to the receivers (None: the logits); most negative = most important.

    `original` and `noise` are aligned example by example (same template, same token length).
    """
    if original.input_ids.shape != noise.input_ids.shape:
        raise ValueError("original and noise prompts must have the same shape: use entity_noise_triples")
    width = check_same_length([original, noise])
    receivers = list(receivers or [])
    senders = list(senders) if senders is not None else candidate_senders(handle, receivers=receivers)
    named = [s.position for s in senders] + [r.position for r in receivers]
    totals = {s: 0.0 for s in senders}
    n = original.input_ids.shape[0]
    groups = fixed_groups(original, named)
    with tqdm(total=len(groups) * len(senders), desc="path patching", leave=False,
              disable=len(groups) * len(senders) < 50) as bar:
        for group, index, idx in groups:
            group = with_token_positions(group)
            noise_group = EncodedBatch(noise.input_ids[idx], noise.attention_mask[idx], group.positions,
                                       group.answer_ids)  # noise read at the original's token indices
            all_sites = head_sites(handle, width)
            clean = collect(handle, group, all_sites)
            noised = collect(handle, noise_group, all_sites)
            p_org = answer_prob(clean_logits(handle, group), group.answer_ids)
            recv = [absolute(r, index) for r in receivers]
            for sender in senders:
                s_abs = absolute(sender, index)
                if s_abs in recv:
                    bar.update()
                    continue
                out = _run_a(handle, group, s_abs, recv, clean, noised, width)
                logits = out if not recv else patched_logits(handle, group, recv, out)
                p_patch = answer_prob(logits, group.answer_ids)
                totals[sender] += float(((p_patch - p_org) / p_org.clamp_min(1e-12)).sum())
                bar.update()
    return {s: totals[s] / n for s in senders}


def top_senders(scores: dict[Site, float], k: int) -> list[tuple[Site, float]]:
    """The k most negative paths."""
    return sorted(scores.items(), key=lambda item: item[1])[:k]


# ------------------------------------------------------------------------------------------------------------
# Re-measure docs/CIRCUITS.md: python -m lib.path_patching [--model toy:entity-base] [--json FILE]
# ------------------------------------------------------------------------------------------------------------

TOY_CIRCUIT = {  # the toy mechanism of docs/TOY_MODELS.md, as groups of heads at positions
    "binding (label_i)": [("L0H0", "label_{i}"), ("L0H1", "label_{i}")],
    "label matching (query_label)": [("L1H0", "query_label"), ("L1H1", "query_label")],
    "mover (last)": [("L2H0", "last"), ("L2H1", "last")],
}


PLANTED_CIRCUIT = {  # lib.planted.ground_truth("strong" / "weak")
    "binder (label_i)": [("L0H1", "label_{i}")],
    "mover (last)": [("L1H2", "last")],
    "fetcher (last)": [("L2H3", "last")],
}


def toy_groups(n_boxes: int, table: dict | None = None) -> dict[str, list[Site]]:
    """The documented circuit's groups as sites (label_{i} expands to every box label)."""
    out = {}
    for name, members in (table or TOY_CIRCUIT).items():
        sites = []
        for comp, pos in members:
            positions = [pos.format(i=i) for i in range(n_boxes)] if "{i}" in pos else [pos]
            sites += [Site(Component.parse(comp), p) for p in positions]
        out[name] = sites
    return out


def _main() -> None:
    import argparse
    import json

    from lib import metrics as M
    from lib.data_gen import encode_batch, entity_noise_triples, filter_correct
    from lib.models import load_model

    parser = argparse.ArgumentParser(description="Path patching and circuit metrics on the toy entity models.")
    parser.add_argument("--model", default="toy:entity-base", help="model whose circuit is found by path patching")
    parser.add_argument("--evaluate-on", nargs="*", default=["toy:entity-base", "toy:entity-ft"],
                        help="models the circuit is evaluated on (Table 1 rows)")
    parser.add_argument("--n-boxes", type=int, default=7)
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--n-patch", type=int, default=200)
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def batches(handle, n, seed, noise=False, correct=False):
        triples = entity_noise_triples(n, n_boxes=args.n_boxes, seed=seed, tokenizer=handle.tokenizer)
        if correct:  # path patching scores relative to p_org: a wrong original's tiny p_org blows the ratio up
            triples = filter_correct(handle, triples, require_alternate=False)
        chunks = [triples[i:i + 100] for i in range(0, n, 100)]
        pick = (lambda t: t.alternate) if noise else (lambda t: t.original)
        return [encode_batch([pick(t) for t in c], handle.tokenizer) for c in chunks]

    results: dict = {"config": vars(args)}
    handle = load_model(args.model)
    original = batches(handle, args.n_patch, 0, correct=True)
    noise = batches(handle, args.n_patch, 0, noise=True, correct=True)
    results["path_patching_examples"] = sum(b.input_ids.shape[0] for b in original)
    iterations, found = {}, {}
    receivers: list[Site] = []
    for step, positions in enumerate([DEFAULT_POSITIONS] * 3):
        scores: dict[Site, float] = {}
        for o, n in zip(original, noise):
            for s, v in path_patch(handle, o, n, candidate_senders(handle, positions, receivers), receivers).items():
                scores[s] = scores.get(s, 0.0) + v * o.input_ids.shape[0] / results["path_patching_examples"]
        ranked = top_senders(scores, 6)
        iterations[f"iteration {step + 1} (receivers: {', '.join(map(str, receivers)) or 'logits'})"] = [
            (str(s), round(v, 4)) for s, v in ranked]
        log.info("iteration %d: %s", step + 1, ranked)
        receivers = [s for s, v in ranked if v < -0.05]   # keep paths that cost more than 5% of p_org
        if receivers:
            found[f"iteration {step + 1}"] = receivers
        if not receivers or all(s.component.layer == 0 for s in receivers):
            break
    results["path_patching"] = iterations
    results["discovered_circuit"] = {k: [str(s) for s in v] for k, v in found.items()}

    def evaluate(h, evals, means, groups):
        circuit = sorted({s for g in groups.values() for s in g})
        row = M.faithfulness(h, evals, circuit, means)
        row["random_circuits"] = M.random_circuit_accuracy(h, evals, circuit, means, n=10)
        row["completeness_per_group"] = {g: M.completeness(h, evals, circuit, k, means) for g, k in groups.items()}
        row["completeness_random_K"] = [M.completeness(h, evals, circuit, k, means)
                                        for k in M.random_subsets(circuit, 5, seed=0)]
        row["minimality_K_empty"] = {str(s): v for s, v in M.minimality(h, evals[:2], circuit, means, 0).items()}
        return row

    for name in args.evaluate_on:
        h = load_model(name)
        evals = batches(h, args.n_eval, 1)
        means = M.whole_sequence_means(h, batches(h, 500, 2))
        table = PLANTED_CIRCUIT if name in ("planted:strong", "planted:weak") else TOY_CIRCUIT
        results[name] = {"documented circuit": evaluate(h, evals, means, toy_groups(args.n_boxes, table)),
                         "path-patching circuit": evaluate(h, evals, means, found)}
        log.info("%s: %s", name, json.dumps(results[name], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    _main()
