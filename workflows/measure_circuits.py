"""Circuit discovery (the authors' path-patching schedule), minimality pruning, circuit metrics and attention
knockout on the built-in entity models: the numbers of docs/CIRCUITS.md.

    python workflows/measure_circuits.py [--model toy:entity-base] [--evaluate-on MODEL ...] [--schedule authors]
                                         [--noise absent_query] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import logging

from lib import metrics as M
from lib.builtin.circuits import documented_circuit
from lib.circuit_discovery import SCHEDULES, discover_circuit, prune_circuit
from lib.data_gen import NOISE_KINDS, encode_pairs, path_patching_noise
from lib.evaluation import filter_correct
from lib.knockout import knockout_curve
from lib.models import load_model

log = logging.getLogger("measure_circuits")

KNOCKOUTS = [("last", "correct_object"), ("last", "query_label"), ("last", "prev_query_label"),
             ("query_label", "prev_query_label")]


def noise_batches(handle, n: int, n_boxes: int, seed: int, correct: bool = False, size: int = 100,
                  noise: str = "random") -> list:
    """PairBatches of (original, noise) entity prompts; with `correct`, only originals the model answers."""
    triples = path_patching_noise(noise, n, n_boxes=n_boxes, seed=seed, tokenizer=handle.tokenizer)
    if correct:  # path patching scores relative to p_org: a wrong original's tiny p_org blows the ratio up
        triples = filter_correct(handle, triples, require_alternate=False)
    return [encode_pairs(triples[i:i + size], handle.tokenizer) for i in range(0, len(triples), size)]


def evaluate(handle, evals, means, groups) -> dict:
    """Table 1 (faithfulness, random circuits), completeness per group and for random K, both minimalities."""
    groups = {g: sites for g, sites in groups.items() if sites}
    circuit = sorted({s for g in groups.values() for s in g})
    row = M.faithfulness(handle, evals, circuit, means)
    row["random_circuits"] = M.random_circuit_accuracy(handle, evals, circuit, means, n=10)
    row["completeness_per_group"] = {g: M.completeness(handle, evals, circuit, k, means) for g, k in groups.items()}
    row["completeness_random_K"] = [M.completeness(handle, evals, circuit, k, means)
                                    for k in M.random_subsets(circuit, 5, seed=0)]
    row["greedy_minimality_K_empty"] = {str(s): v for s, v in
                                        M.greedy_minimality(handle, evals[:2], circuit, means, 0).items()}
    row["minimality_authors"] = {str(s): r["score"] for s, r in M.minimality(handle, evals[:1], groups, means).items()}
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy:entity-base", help="model whose circuit is discovered")
    parser.add_argument("--evaluate-on", nargs="*", default=["toy:entity-base", "toy:entity-ft"],
                        help="models the circuit is evaluated on (Table 1 rows)")
    parser.add_argument("--n-boxes", type=int, default=7)
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--n-patch", type=int, default=200)
    parser.add_argument("--noise", choices=NOISE_KINDS, default="absent_query",
                        help="path-patching noise: absent_query (the authors') or random prompts")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="authors",
                        help="path-patching steps: the authors' four (Prakash et al.), 'label' (planted:strong's "
                             "mechanism) or 'query_label' (the toy models': no position transmitter)")
    parser.add_argument("--min-effect", type=float, default=0.05,
                        help="keep a discovered head only if its path costs at least this share of p (0: top-k)")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    results: dict = {"config": vars(args)}
    handle = load_model(args.model)
    batches = noise_batches(handle, args.n_patch, args.n_boxes, 0, correct=True, noise=args.noise)
    results["path_patching_examples"] = sum(b.size for b in batches)
    circuit = discover_circuit(handle, batches, SCHEDULES[args.schedule], min_effect=args.min_effect or None)
    results["discovery"] = circuit.to_dict()
    results["discovery_top"] = {name: [(str(s), round(v, 4)) for s, v in sorted(scores.items(),
                                                                                key=lambda item: item[1])[:6]]
                                for name, scores in circuit.step_scores.items()}
    log.info("discovered: %s", {g: [str(s) for s in sites] for g, sites in circuit.as_groups().items()})
    means = M.whole_sequence_means(handle, noise_batches(handle, 500, args.n_boxes, 2))
    pruned = prune_circuit(handle, circuit, noise_batches(handle, 100, args.n_boxes, 3), means)
    results["pruned"] = pruned.to_dict()
    log.info("pruned: %s", {g: [str(s) for s in sites] for g, sites in pruned.as_groups().items()})
    knock = noise_batches(handle, args.n_eval, args.n_boxes, 4)
    results["knockout"] = {f"{a} -> {b}": knockout_curve(handle, knock, a, b) for a, b in KNOCKOUTS}

    for name in args.evaluate_on:
        h = load_model(name)
        evals = noise_batches(h, args.n_eval, args.n_boxes, 1)
        means = M.whole_sequence_means(h, noise_batches(h, 500, args.n_boxes, 2))
        results[name] = {"documented circuit": evaluate(h, evals, means, documented_circuit(name, args.n_boxes)),
                         "discovered circuit": evaluate(h, evals, means, circuit.as_groups())}
        if pruned.as_groups() != circuit.as_groups():
            results[name]["pruned circuit"] = evaluate(h, evals, means, pruned.as_groups())
        log.info("%s: %s", name, json.dumps(results[name], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
