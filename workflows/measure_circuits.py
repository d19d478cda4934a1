"""Path patching and circuit metrics on the built-in entity models: the numbers of docs/CIRCUITS.md.

    python workflows/measure_circuits.py [--model toy:entity-base] [--evaluate-on MODEL ...] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import logging

from lib import metrics as M
from lib.builtin.circuits import documented_circuit
from lib.data_gen import encode_pairs, entity_noise_triples
from lib.evaluation import filter_correct
from lib.models import load_model
from lib.path_patching import DEFAULT_POSITIONS, candidate_senders, path_patch, top_senders
from lib.types import Site

log = logging.getLogger("measure_circuits")


def noise_batches(handle, n: int, n_boxes: int, seed: int, correct: bool = False, size: int = 100) -> list:
    """PairBatches of (original, noise) entity prompts; with `correct`, only originals the model answers."""
    triples = entity_noise_triples(n, n_boxes=n_boxes, seed=seed, tokenizer=handle.tokenizer)
    if correct:  # path patching scores relative to p_org: a wrong original's tiny p_org blows the ratio up
        triples = filter_correct(handle, triples, require_alternate=False)
    return [encode_pairs(triples[i:i + size], handle.tokenizer) for i in range(0, len(triples), size)]


def evaluate(handle, evals, means, groups) -> dict:
    """Table 1 (faithfulness, random circuits), completeness per group and for random K, minimality with K empty."""
    circuit = sorted({s for g in groups.values() for s in g})
    row = M.faithfulness(handle, evals, circuit, means)
    row["random_circuits"] = M.random_circuit_accuracy(handle, evals, circuit, means, n=10)
    row["completeness_per_group"] = {g: M.completeness(handle, evals, circuit, k, means) for g, k in groups.items()}
    row["completeness_random_K"] = [M.completeness(handle, evals, circuit, k, means)
                                    for k in M.random_subsets(circuit, 5, seed=0)]
    row["minimality_K_empty"] = {str(s): v for s, v in M.minimality(handle, evals[:2], circuit, means, 0).items()}
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy:entity-base", help="model whose circuit is found by path patching")
    parser.add_argument("--evaluate-on", nargs="*", default=["toy:entity-base", "toy:entity-ft"],
                        help="models the circuit is evaluated on (Table 1 rows)")
    parser.add_argument("--n-boxes", type=int, default=7)
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--n-patch", type=int, default=200)
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    results: dict = {"config": vars(args)}
    handle = load_model(args.model)
    batches = noise_batches(handle, args.n_patch, args.n_boxes, 0, correct=True)
    n_examples = sum(b.size for b in batches)
    results["path_patching_examples"] = n_examples
    iterations, found = {}, {}
    receivers: list[Site] = []
    for step, positions in enumerate([DEFAULT_POSITIONS] * 3):
        scores: dict[Site, float] = {}
        for batch in batches:
            senders = candidate_senders(handle, positions, receivers)
            for s, v in path_patch(handle, batch, senders, receivers).items():
                scores[s] = scores.get(s, 0.0) + v * batch.size / n_examples
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

    for name in args.evaluate_on:
        h = load_model(name)
        evals = noise_batches(h, args.n_eval, args.n_boxes, 1)
        means = M.whole_sequence_means(h, noise_batches(h, 500, args.n_boxes, 2))
        results[name] = {"documented circuit": evaluate(h, evals, means, documented_circuit(name, args.n_boxes)),
                         "path-patching circuit": evaluate(h, evals, means, found)}
        log.info("%s: %s", name, json.dumps(results[name], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
