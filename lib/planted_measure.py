"""Measure the planted models: accuracy, cross-model patching, the single-component patching table, mean
ablation and DCM, each with the project's own methods.

These numbers are measured, never stored: docs/PLANTED.md is written from `python -m lib.planted_measure`, and
tests/test_planted.py checks them against `lib.planted.ground_truth`.
"""
from __future__ import annotations

import argparse
import json
import logging
import random

import torch
from tqdm.auto import tqdm

from lib import planted
from lib.components import Component, all_components
from lib.data_gen import ENTITY_DESIDERATA, EncodedBatch, encode_batch, entity_triples, random_entity_prompt
from lib.models import ModelHandle, load_model
from lib.patching import Site, clean_logits, collect, mean_ablate, mean_activations, patched_logits

POSITIONS = ("last", "query_label", "prev_query_label")


def predictions(handle: ModelHandle, batch: EncodedBatch) -> torch.Tensor:
    """Argmax token at the last position."""
    return clean_logits(handle, batch).argmax(-1)


def accuracy(handle: ModelHandle, n_boxes: int, n: int = 500, seed: int = 0) -> float:
    """Fraction of `n` random prompts with `n_boxes` boxes answered correctly."""
    rng = random.Random(seed)
    batch = encode_batch([random_entity_prompt(rng, n_boxes) for _ in range(n)], handle.tokenizer)
    return float((predictions(handle, batch) == batch.answer_ids).float().mean())


def triple_batches(handle: ModelHandle, desideratum: str, n: int, seed: int,
                   box_counts=(3, 5, 7)) -> tuple[EncodedBatch, EncodedBatch]:
    """Original (with the desideratum's targets as answers) and alternate batches from lib.data_gen."""
    per = max(1, n // len(box_counts))
    triples = [t for k in box_counts
               for t in entity_triples(desideratum, per, n_boxes=k, seed=seed + k, tokenizer=handle.tokenizer)]
    original = encode_batch([t.original for t in triples], handle.tokenizer, answers=[t.target for t in triples])
    alternate = encode_batch([t.alternate for t in triples], handle.tokenizer)
    return original, alternate


def patching_table(
    handle: ModelHandle, desideratum: str, n: int = 60, seed: int = 0, positions=POSITIONS
) -> dict[str, dict[str, float]]:
    """{position: {component: fraction of triples whose output becomes the target}}, patching one component
    (every head and MLP) at a time with lib.patching: the project's own method checked against the ground truth."""
    original, alternate = triple_batches(handle, desideratum, n, seed)
    sites = [Site(c, p) for p in positions for c in all_components(handle.arch)]
    values = collect(handle, alternate, sites)
    table: dict[str, dict[str, float]] = {p: {} for p in positions}
    for site in tqdm(sites, desc=f"patching {desideratum}", leave=False):
        preds = patched_logits(handle, original, [site], values).argmax(-1)
        table[site.position][str(site.component)] = float((preds == original.answer_ids).float().mean())
    return table


def cross_model_patch(
    receiver: ModelHandle, donor: ModelHandle, batch: EncodedBatch, component: Component, position: str = "last"
) -> torch.Tensor:
    """Predictions of `receiver` with one head's output at `position` taken from `donor` on the same input."""
    from lib import cmap

    return cmap.cross_model_patch(receiver, donor, batch, [Site(component, position)]).argmax(-1)


# Where each circuit head does its work (a site where mean-ablating it should break the model).
CIRCUIT_SITES = {
    "strong": [(planted.BINDER, "prev_query_label"), (planted.MOVER, "last"), (planted.FETCHER, "last")],
    "positional": [(planted.POSITION_DETECTOR, "query_label"), (planted.POSITION_TRANSMITTER, "last"),
                   (planted.FETCHER, "last")],
}
CIRCUIT_SITES["weak"] = CIRCUIT_SITES["strong"]
TASK_POSITIONS = ("last", "query_label", "prev_query_label", "correct_object")


def ablation_accuracies(handle: ModelHandle, variant: str, n: int = 90, seed: int = 0) -> dict[str, float]:
    """Accuracy with lib.patching.mean_ablate (means over other random prompts): the full model, the circuit alone
    (every distractor and MLP ablated at TASK_POSITIONS), and each planted head ablated where it works."""
    def batch(s):
        rng = random.Random(s)
        return encode_batch([random_entity_prompt(rng, k) for k in (3, 5, 7) for _ in range(n // 3)],
                            handle.tokenizer)

    prompts, reference = batch(seed), batch(seed + 1)

    def acc(sites):
        logits = mean_ablate(handle, prompts, sites, mean_activations(handle, [reference], sites))
        return float((logits.argmax(-1) == prompts.answer_ids).float().mean())

    truth = planted.ground_truth(variant)
    outside = [Component.parse(c) for c in truth["distractors"]] + all_components(handle.arch, heads=False)
    out = {"model": float((predictions(handle, prompts) == prompts.answer_ids).float().mean()),
           "circuit only": acc([Site(c, p) for c in outside for p in TASK_POSITIONS])}
    for comp, position in CIRCUIT_SITES[variant]:
        out[f"without {comp}@{position}"] = acc([Site(comp, position)])
    return out


def dcm_selection(handle: ModelHandle, desideratum: str, n_train: int = 48, n_val: int = 24, seed: int = 0,
                  **config) -> dict:
    """DCM over every head and MLP at the last token for one desideratum: the patched sites and val accuracy."""
    from lib.mask_intervention import DCMConfig, train_mask

    def triples(n, s):
        return [t for k in (3, 5, 7)
                for t in entity_triples(desideratum, n // 3, n_boxes=k, seed=s + k, tokenizer=handle.tokenizer)]

    sites = [Site(c, "last") for c in all_components(handle.arch)]
    settings = {"lam": 0.01, "lr": 0.1, "epochs": 12, "batch_size": 24, "prune": False, **config}
    result = train_mask(handle, {desideratum: triples(n_train, seed)}, {desideratum: triples(n_val, seed + 100)},
                        sites, DCMConfig(**settings), progress=False)
    return {"patched": result.patched, "val_accuracy": result.val_accuracy[desideratum], "config": settings}


def measure(n: int = 500, n_patch: int = 150, seed: int = 0) -> dict:
    """Every number docs/PLANTED.md reports."""
    handles = {v: load_model(f"planted:{v}") for v in planted.VARIANTS}
    out: dict = {"accuracy": {}, "cmap": {}, "patching": {}, "dcm": {}, "ablation": {}}
    for name, handle in handles.items():
        out["accuracy"][name] = {k: accuracy(handle, k, n, seed + k) for k in tqdm(range(3, 8), desc=name)}
    strong, weak = handles["strong"], handles["weak"]
    rng = random.Random(seed + 1)
    for k in (3, 5, 7):
        batch = encode_batch([random_entity_prompt(rng, k) for _ in range(n)], strong.tokenizer)
        hits = lambda preds: float((preds == batch.answer_ids).float().mean())  # noqa: E731
        out["cmap"][k] = {
            "weak": hits(predictions(weak, batch)),
            "strong": hits(predictions(strong, batch)),
            "weak + strong fetcher": hits(cross_model_patch(weak, strong, batch, planted.FETCHER)),
            "weak + strong mover": hits(cross_model_patch(weak, strong, batch, planted.MOVER)),
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
    lines += ["", f"Mean ablation (lib.patching.mean_ablate, means over other random prompts; 3, 5, 7 boxes; sites at "
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
