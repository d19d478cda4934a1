"""Measure the planted models: accuracy, cross-model patching, the single-component patching table, mean
ablation and DCM, each with the project's own methods.

These numbers are measured, never stored: docs/PLANTED.md is written from `python workflows/measure_planted.py`,
and tests/integration/test_planted.py checks the same functions against `lib.builtin.planted.ground_truth`.
"""
from __future__ import annotations

import argparse
import json
import logging
import random

from tqdm.auto import tqdm

from lib.builtin import planted
from lib.builtin.circuits import planted_working_sites
from lib.cmap import cross_model_patch
from lib.core.components import all_components
from lib.data_gen import ENTITY_DESIDERATA, encode_answers, encode_pairs, entity_triples, random_entity_prompt
from lib.evaluation import prompt_accuracy, scores
from lib.models import ModelHandle, load_model
from lib.mask_intervention import DCMConfig, train_mask
from lib.patching import mean_activations, patching_scan
from lib.scores import target_hit
from lib.types import Component, PairBatch, Site

POSITIONS = ("last", "query_label", "prev_query_label")
TASK_POSITIONS = ("last", "query_label", "prev_query_label", "correct_object")


def random_prompt_accuracy(handle: ModelHandle, n_boxes: int, n: int = 500, seed: int = 0) -> float:
    """Fraction of `n` random prompts with `n_boxes` boxes answered correctly."""
    rng = random.Random(seed)
    return prompt_accuracy(handle, [random_entity_prompt(rng, n_boxes) for _ in range(n)], batch_size=n)


def triple_batch(handle: ModelHandle, desideratum: str, n: int, seed: int, box_counts=(3, 5, 7)) -> PairBatch:
    """One PairBatch of the desideratum's triples (targets = the desideratum's), n // 3 per box count."""
    per = max(1, n // len(box_counts))
    triples = [t for k in box_counts
               for t in entity_triples(desideratum, per, n_boxes=k, seed=seed + k, tokenizer=handle.tokenizer)]
    return encode_pairs(triples, handle.tokenizer)


def patching_table(
    handle: ModelHandle, desideratum: str, n: int = 60, seed: int = 0, positions=POSITIONS
) -> dict[str, dict[str, float]]:
    """{position: {component: fraction of triples whose output becomes the target}}, patching one component
    (every head and MLP) at a time with lib.patching.patching_scan."""
    batch = triple_batch(handle, desideratum, n, seed)
    sites = [Site(c, p) for p in positions for c in all_components(handle.arch)]
    moved = patching_scan(handle, [batch], sites)
    table: dict[str, dict[str, float]] = {p: {} for p in positions}
    for site, value in zip(sites, moved.tolist()):
        table[site.position][str(site.component)] = value
    return table


def cross_model_hits(receiver: ModelHandle, donor: ModelHandle, batch: PairBatch, component: Component,
                     position: str = "last") -> float:
    """Accuracy of `receiver` with one head's output at `position` taken from `donor` on the same input."""
    logits = cross_model_patch(receiver, donor, batch, [Site(component, position)])
    return float(target_hit(logits, batch).mean())


def ablation_accuracies(handle: ModelHandle, variant: str, n: int = 90, seed: int = 0) -> dict[str, float]:
    """Accuracy with mean ablation (means over other random prompts): the full model, the circuit alone (every
    distractor and MLP ablated at TASK_POSITIONS), and each planted head ablated where it works."""
    def batch(s):
        rng = random.Random(s)
        return encode_answers([random_entity_prompt(rng, k) for k in (3, 5, 7) for _ in range(n // 3)],
                              handle.tokenizer)

    prompts, reference = batch(seed), batch(seed + 1)
    truth = planted.ground_truth(variant)
    outside = [Component.parse(c) for c in truth["distractors"]] + all_components(handle.arch, heads=False)
    ablations = {"circuit only": [Site(c, p) for c in outside for p in TASK_POSITIONS]}
    ablations.update({f"without {site}": [site] for site in planted_working_sites(variant)})
    out = {"model": float(scores(handle, [prompts]).mean())}
    for name, sites in ablations.items():
        means = mean_activations(handle, [reference.original], sites)
        out[name] = float(patching_scan(handle, [prompts], [sites], values=means)[0])
    return out


def dcm_selection(handle: ModelHandle, desideratum: str, n_train: int = 48, n_val: int = 24, seed: int = 0,
                  **config) -> dict:
    """DCM over every head and MLP at the last token for one desideratum: the patched sites and val accuracy."""

    def triples(n, s):
        return [t for k in (3, 5, 7)
                for t in entity_triples(desideratum, n // 3, n_boxes=k, seed=s + k, tokenizer=handle.tokenizer)]

    sites = [Site(c, "last") for c in all_components(handle.arch)]
    settings = {"lam": 0.01, "lr": 0.1, "epochs": 12, "batch_size": 24, "prune": False, **config}
    result = train_mask(handle, {desideratum: triples(n_train, seed)}, {desideratum: triples(n_val, seed + 100)},
                        sites, DCMConfig(**settings), progress=False)
    return {"patched": result.selected_patched, "val_accuracy": result.selected_val_accuracy[desideratum],
            "config": settings}


def measure(n: int = 500, n_patch: int = 150, seed: int = 0) -> dict:
    """Every number docs/PLANTED.md reports."""
    handles = {v: load_model(f"planted:{v}") for v in planted.VARIANTS}
    out: dict = {"accuracy": {}, "cmap": {}, "patching": {}, "dcm": {}, "ablation": {}}
    for name, handle in handles.items():
        out["accuracy"][name] = {k: random_prompt_accuracy(handle, k, n, seed + k) for k in tqdm(range(3, 8), desc=name)}
    strong, weak = handles["strong"], handles["weak"]
    rng = random.Random(seed + 1)
    for k in (3, 5, 7):
        batch = encode_answers([random_entity_prompt(rng, k) for _ in range(n)], strong.tokenizer)
        out["cmap"][k] = {
            "weak": float(scores(weak, [batch]).mean()),
            "strong": float(scores(strong, [batch]).mean()),
            "weak + strong fetcher": cross_model_hits(weak, strong, batch, planted.FETCHER),
            "weak + strong mover": cross_model_hits(weak, strong, batch, planted.MOVER),
        }
    for variant in ("strong", "positional"):
        out["ablation"][variant] = ablation_accuracies(handles[variant], variant, n=3 * (n // 3), seed=seed)
        out["patching"][variant] = {d: patching_table(handles[variant], d, n_patch, seed) for d in
                                    tqdm(ENTITY_DESIDERATA, desc=f"patching {variant}")}
        out["dcm"][variant] = {d: dcm_selection(handles[variant], d, seed=seed) for d in
                               tqdm(ENTITY_DESIDERATA, desc=f"DCM {variant}")}
    return out


def markdown(results: dict) -> str:
    """The measured tables as markdown."""
    counts = list(results["accuracy"]["strong"])
    lines = ["Accuracy on random prompts (argmax == answer):", "",
             "| model | " + " | ".join(f"{k} boxes" for k in counts) + " |", "|---|" + "---|" * len(counts)]
    for name, accs in results["accuracy"].items():
        lines.append(f"| planted:{name} | " + " | ".join(f"{a:.3f}" for a in accs.values()) + " |")
    columns = list(next(iter(results["cmap"].values())))
    lines += ["", "Cross-model patching (same input to both; one head's output at the last token from strong):", "",
              "| boxes | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for k, row in results["cmap"].items():
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    lines += ["", "Single-component activation patching (lib.patching; every head and MLP at last, query_label, "
              "prev_query_label): fraction of triples whose output becomes the desideratum's target. Entries "
              ">= 0.05 are shown; every other component x position is below.", "",
              "| model | desideratum | position | component | moved to target |", "|---|---|---|---|---|"]
    for variant, tables in results["patching"].items():
        for desideratum, table in tables.items():
            shown = [(p, c, v) for p, comps in table.items() for c, v in comps.items() if v >= 0.05]
            for position, comp, value in shown:
                lines.append(f"| {variant} | {desideratum} | {position} | {comp} | {value:.3f} |")
            if not shown:
                top = max((v, c, p) for p, comps in table.items() for c, v in comps.items())
                lines.append(f"| {variant} | {desideratum} | none (largest: {top[1]} at {top[2]}) | - | "
                             f"{top[0]:.3f} |")
    lines += ["", f"Mean ablation (lib.patching.patching_scan with values=means over other random prompts; 3, 5, 7 "
              f"boxes; sites at "
              f"{', '.join(TASK_POSITIONS)} for 'circuit only'):", "",
              "| model | ablated | accuracy |", "|---|---|---|"]
    for variant, row in results["ablation"].items():
        for what, value in row.items():
            lines.append(f"| {variant} | {what} | {value:.3f} |")
    config = next(iter(next(iter(results["dcm"].values())).values()))["config"]
    lines += ["", f"DCM (lib.mask_intervention, {config}) over every head and MLP at the last token:", "",
              "| model | desideratum | patched | val accuracy of that mask |", "|---|---|---|---|"]
    for variant, rows in results["dcm"].items():
        for desideratum, row in rows.items():
            lines.append(f"| {variant} | {desideratum} | {', '.join(row['patched']) or '(none)'} | "
                         f"{row['val_accuracy']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=500, help="prompts per box count for accuracy / CMAP")
    parser.add_argument("--n-patch", type=int, default=150, help="triples per desideratum for the patching table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every number to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = measure(args.n, args.n_patch, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), **results}, f, indent=1)
    print(markdown(results))  # noqa: T201 (the command's output)


if __name__ == "__main__":
    main()
