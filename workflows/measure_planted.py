"""Measure the planted models: accuracy, cross-model patching, the single-component patching table, mean
ablation and DCM, each with the project's own methods; for the paper pair (planted:paper-base / paper-ft) also
the circuit metrics of lib.metrics, CMAP per group, DCM per group and path patching, step by step.

These numbers are measured, never stored: docs/PLANTED.md is written from `python workflows/measure_planted.py`,
and tests/integration/test_planted.py / test_planted_pair.py check the same functions against
`lib.builtin.planted.ground_truth`.
"""
from __future__ import annotations

import argparse
import json
import logging
import random

from tqdm.auto import tqdm

from lib import metrics
from lib.builtin import planted
from lib.builtin.circuits import planted_circuit, planted_working_sites
from lib.cmap import cmap_scores, cross_model_patch
from lib.core.components import all_components
from lib.data_gen import (ENTITY_DESIDERATA, encode_answers, encode_pairs, entity_noise_triples, entity_triples,
                          random_entity_prompt)
from lib.evaluation import filter_correct, prompt_accuracy, scores
from lib.models import ModelHandle, load_model
from lib.mask_intervention import DCMConfig, train_mask
from lib.path_patching import path_patch, top_senders
from lib.patching import mean_activations, patching_scan
from lib.scores import target_hit
from lib.types import Component, PairBatch, Site

POSITIONS = ("last", "query_label", "prev_query_label")
TASK_POSITIONS = ("last", "query_label", "prev_query_label", "correct_object")


def random_prompt_accuracy(handle: ModelHandle, n_boxes: int, n: int = 500, seed: int = 0) -> float:
    """Fraction of `n` random prompts with `n_boxes` boxes answered correctly."""
    rng = random.Random(seed)
    return prompt_accuracy(handle, [random_entity_prompt(rng, n_boxes) for _ in range(n)], batch_size=n)


def triple_batch(handle: ModelHandle, desideratum: str, n: int, seed: int, box_counts=(3, 5, 7),
                 correct_only: bool = False) -> PairBatch:
    """One PairBatch of the desideratum's triples (targets = the desideratum's), n // 3 per box count; with
    `correct_only`, only triples whose original and alternate the model answers correctly (as the workflow)."""
    per = max(1, n // len(box_counts))
    triples = []
    for k in box_counts:
        made = entity_triples(desideratum, 4 * per if correct_only else per, n_boxes=k, seed=seed + k,
                              tokenizer=handle.tokenizer)
        triples += filter_correct(handle, made, batch_size=len(made))[:per] if correct_only else made
    return encode_pairs(triples, handle.tokenizer)


def patching_table(
    handle: ModelHandle, desideratum: str, n: int = 60, seed: int = 0, positions=POSITIONS,
    correct_only: bool = False,
) -> dict[str, dict[str, float]]:
    """{position: {component: fraction of triples whose output becomes the target}}, patching one component
    (every head and MLP) at a time with lib.patching.patching_scan."""
    batch = triple_batch(handle, desideratum, n, seed, correct_only=correct_only)
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


# ---- the paper pair: planted:paper-base and its fine-tune planted:paper-ft ------------------------------------------

PAIR_BOXES = (3, 5, 7)
PAIR_DCM = {"lam": 0.01, "lr": 0.1, "epochs": 4, "batch_size": 32}   # Adam lr 0.1 as the authors; 4 short epochs


def prompt_batch(tokenizer, n_boxes: int, n: int, seed: int) -> PairBatch:
    """n random prompts of one box count (one token length: what whole-sequence mean ablation needs)."""
    rng = random.Random(seed)
    return encode_answers([random_entity_prompt(rng, n_boxes) for _ in range(n)], tokenizer)


def all_sites(groups: dict[str, list[Site]]) -> list[Site]:
    """Every site of every group, in order (a circuit as one list)."""
    return [s for sites in groups.values() for s in sites]


def circuit_evaluation(handle: ModelHandle, variant: str, n_boxes: int, n: int = 200, seed: int = 0,
                       n_random: int = 10) -> dict:
    """The paper's Table 1 row and completeness per group (lib.metrics, whole-sequence mean ablation; means over
    n other random prompts of the same box count): F(M), F(Cir), faithfulness, random circuits' F, and per group
    K: F(Cir \\ K), F(M \\ K) and completeness |F(Cir \\ K) - F(M \\ K)|."""
    groups = planted_circuit(variant, n_boxes)
    circuit = all_sites(groups)
    evals = [prompt_batch(handle.tokenizer, n_boxes, n, seed)]
    means = metrics.whole_sequence_means(handle, [prompt_batch(handle.tokenizer, n_boxes, n, seed + 1)])
    out = metrics.faithfulness(handle, evals, circuit, means)
    out["random circuits"] = metrics.random_circuit_accuracy(handle, evals, circuit, means, n=n_random, seed=seed)
    out["groups"] = {}
    for name, group in groups.items():
        kept = [s for s in circuit if s not in group]
        out["groups"][name] = {
            "circuit without": metrics.circuit_accuracy(handle, evals, kept, means),
            "model without": metrics.model_accuracy(handle, evals, means, without=group),
            "completeness": metrics.completeness(handle, evals, circuit, group, means),
        }
    return out


def circuit_minimality(handle: ModelHandle, variant: str, n_boxes: int = 7, n: int = 100, seed: int = 0) -> dict:
    """lib.metrics.minimality of every circuit head at `n_boxes`: {site name: the largest accuracy change removing
    it causes, over greedily grown K}."""
    circuit = all_sites(planted_circuit(variant, n_boxes))
    evals = [prompt_batch(handle.tokenizer, n_boxes, n, seed)]
    means = metrics.whole_sequence_means(handle, [prompt_batch(handle.tokenizer, n_boxes, n, seed + 1)])
    return {str(s): v for s, v in metrics.minimality(handle, evals, circuit, means).items()}


def cmap_groups(variant: str = "paper-base", n_boxes: int = 7) -> dict[str, list[Site]]:
    """The groups CMAP patches: each of the paper's four groups at its position, the whole circuit, and each value
    fetcher head alone."""
    groups = planted_circuit(variant, n_boxes)
    out = dict(groups)
    out["circuit"] = all_sites(groups)
    out.update({f"{s} only": [s] for s in groups["Value Fetcher"]})
    return out


def pair_cmap(base: ModelHandle, ft: ModelHandle, n_boxes: int, n: int = 500, seed: int = 0) -> dict[str, float]:
    """lib.cmap.cmap_scores: the base's accuracy with each group's outputs taken from the fine-tune (same input)."""
    batch = prompt_batch(base.tokenizer, n_boxes, n, seed)
    return cmap_scores(base, ft, [batch], cmap_groups(n_boxes=n_boxes))


def group_dcm(handle: ModelHandle, group: str, desideratum: str, n_train: int = 96, n_val: int = 48, seed: int = 0,
              **config) -> dict:
    """DCM restricted to one group's heads at the group's position (Prakash et al.'s Table A2 setting), on triples
    the model answers correctly: the sites the final weights patch (w < 0.5), the selected (validated, pruned)
    mask and its held-out accuracy."""
    sites = [Site(c, planted.GROUP_POSITION[group]) for c in planted.GROUPS[group]]
    settings = {**PAIR_DCM, **config}

    def triples(n, s):
        made = [t for k in PAIR_BOXES
                for t in entity_triples(desideratum, 4 * n // len(PAIR_BOXES), n_boxes=k, seed=s + k,
                                        tokenizer=handle.tokenizer)]
        kept = filter_correct(handle, made, batch_size=len(made))
        random.Random(s).shuffle(kept)
        return kept[:n]

    result = train_mask(handle, {desideratum: triples(n_train, seed)}, {desideratum: triples(n_val, seed + 100)},
                        sites, DCMConfig(**settings), progress=False)
    return {"final": sorted(str(s.component) for s, w in zip(sites, result.weights) if w < 0.5),
            "selected": sorted(str(Site.parse(x).component) for x in result.selected_patched),
            "weights": dict(zip((str(s.component) for s in sites), result.weights)),
            "val_accuracy": result.selected_val_accuracy[desideratum], "config": settings}


def pair_path_patching(handle: ModelHandle, n: int = 60, n_boxes: int = 7, seed: int = 0, k: int = 2) -> dict:
    """The authors' four path-patching steps on originals the model answers correctly (noise: a random prompt of
    the same template): A = the top k senders at the last token -> logits; B = at the last token -> A; C = at the
    query label -> B; D = at the previous query label -> C. {step: [(sender, score)], ...} (most negative first)."""
    noise = entity_noise_triples(3 * n, n_boxes=n_boxes, seed=seed, tokenizer=handle.tokenizer)
    noise = filter_correct(handle, noise, batch_size=len(noise), require_alternate=False)[:n]
    batch = encode_pairs(noise, handle.tokenizer)
    heads = all_components(handle.arch, mlps=False)
    steps = {}
    receivers: list[Site] | None = None
    found: list[Site] = []
    for step, position in (("A", "last"), ("B", "last"), ("C", "query_label"), ("D", "prev_query_label")):
        top = max(r.component.layer for r in receivers) if receivers else handle.arch.n_layers
        senders = [Site(c, position) for c in heads if c.layer < top and Site(c, position) not in found]
        scores_ = path_patch(handle, batch, senders, receivers)
        ranked = top_senders(scores_, len(scores_))
        steps[step] = [(str(s), v) for s, v in ranked]
        receivers = [s for s, _ in ranked[:k]]
        found += receivers
    return steps


def measure_pair(n: int = 500, n_patch: int = 150, seed: int = 0) -> dict:
    """Every number of docs/PLANTED.md's section on the paper pair."""
    handles = {v: load_model(f"planted:{v}") for v in planted.PAIR}
    base, ft = handles["paper-base"], handles["paper-ft"]
    out: dict = {"accuracy": {}, "patching": {}, "circuit": {}, "minimality": {}, "cmap": {}, "dcm": {},
                 "path patching": {}}
    for name, handle in handles.items():
        out["accuracy"][name] = {k: random_prompt_accuracy(handle, k, n, seed + k) for k in range(3, 8)}
        out["patching"][name] = {d: patching_table(handle, d, n_patch, seed, correct_only=True)
                                 for d in tqdm(ENTITY_DESIDERATA, desc=f"patching {name}")}
        out["circuit"][name] = {k: circuit_evaluation(handle, name, k, n=3 * (n // 5), seed=seed + k)
                                for k in tqdm(PAIR_BOXES, desc=f"circuit {name}")}
        out["minimality"][name] = circuit_minimality(handle, name, n=n // 5, seed=seed)
        out["dcm"][name] = {g: {d: group_dcm(handle, g, d, seed=seed) for d in ENTITY_DESIDERATA}
                            for g in tqdm(planted.GROUPS, desc=f"DCM {name}")}
    out["cmap"] = {k: pair_cmap(base, ft, k, n, seed + 10 + k) for k in PAIR_BOXES}
    out["path patching"] = pair_path_patching(base, seed=seed)
    return out


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


def _f(v: float) -> str:
    return f"{v:.3f}"


def pair_markdown(results: dict) -> str:
    """The paper pair's measured tables as markdown."""
    acc = results["accuracy"]
    counts = list(next(iter(acc.values())))
    lines = ["Accuracy on random prompts (argmax == answer):", "",
             "| model | " + " | ".join(f"{k} boxes" for k in counts) + " |", "|---|" + "---|" * len(counts)]
    lines += [f"| planted:{name} | " + " | ".join(_f(a) for a in accs.values()) + " |" for name, accs in acc.items()]

    lines += ["", "Single-head activation patching (lib.patching.patching_scan; every head and MLP alone at last, "
              "query_label, prev_query_label; on triples the model answers correctly, original and alternate): "
              "fraction of triples whose output becomes the target. Entries >= 0.05 shown; every other component "
              "x position is below.", "", "| model | desideratum | position | component | moved to target |",
              "|---|---|---|---|---|"]
    for name, tables in results["patching"].items():
        for desideratum, table in tables.items():
            shown = [(p, c, v) for p, comps in table.items() for c, v in comps.items() if v >= 0.05]
            for position, comp, value in sorted(shown, key=lambda x: -x[2]):
                lines.append(f"| {name} | {desideratum} | {position} | {comp} | {_f(value)} |")
            if not shown:
                top = max((v, c, p) for p, comps in table.items() for c, v in comps.items())
                lines.append(f"| {name} | {desideratum} | none (largest: {top[1]} at {top[2]}) | - | {_f(top[0])} |")

    lines += ["", "Circuit evaluation (lib.metrics, every head outside the circuit mean-ablated at every token, means "
              "over other random prompts of the same box count; the paper's Table 1 and completeness per group K):",
              "", "| model | boxes | F(M) | F(Cir) | faithfulness | random circuits (mean, max of 10) | "
              + " | ".join(f"F(Cir \\ {g}) | F(M \\ {g})" for g in planted.GROUPS) + " |",
              "|---|---|---|---|---|---|" + "---|---|" * len(planted.GROUPS)]
    for name, rows in results["circuit"].items():
        for k, row in rows.items():
            rand = row["random circuits"]
            lines.append(f"| {name} | {k} | {_f(row['model'])} | {_f(row['circuit'])} | {_f(row['faithfulness'])} | "
                         f"{_f(sum(rand) / len(rand))}, {_f(max(rand))} | "
                         + " | ".join(f"{_f(g['circuit without'])} | {_f(g['model without'])}"
                                      for g in row["groups"].values()) + " |")

    heads = list(next(iter(results["minimality"].values())))
    lines += ["", "Minimality (lib.metrics.minimality at 7 boxes: the largest accuracy change removing the head "
              "causes, over greedily grown K; the paper keeps heads above 0.01):", "",
              "| model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for name, row in results["minimality"].items():
        lines.append(f"| {name} | " + " | ".join(_f(row[h]) for h in heads) + " |")

    columns = list(next(iter(results["cmap"].values())))
    lines += ["", "CMAP (lib.cmap.cmap_scores: the same input to both; each group's head outputs at its position "
              "taken from paper-ft and written into paper-base; accuracy):", "",
              "| boxes | " + " | ".join({"none": "paper-base", "donor": "paper-ft"}.get(c, f"+ {c}") for c in columns)
              + " |", "|---|" + "---|" * len(columns)]
    for k, row in results["cmap"].items():
        lines.append(f"| {k} | " + " | ".join(_f(v) for v in row.values()) + " |")

    config = next(iter(next(iter(results["dcm"].values())).values()))["object"]["config"]
    lines += ["", f"DCM per group (lib.mask_intervention.train_mask over the group's heads at the group's position, "
              f"{config}, 96 training / 48 validation triples the model answers correctly, 3/5/7 boxes): heads the "
              "final weights patch (w < 0.5) / the selected mask (validated, pruned) and its accuracy:", "",
              "| model | group | object | label | position |", "|---|---|---|---|---|"]
    for name, groups in results["dcm"].items():
        for group, row in groups.items():
            cells = [f"{', '.join(r['final']) or '-'} / {', '.join(r['selected']) or '-'} ({_f(r['val_accuracy'])})"
                     for r in row.values()]
            lines.append(f"| {name} | {group} | " + " | ".join(cells) + " |")

    lines += ["", "Path patching on paper-base (lib.path_patching, 60 originals it answers correctly at 7 boxes, "
              "noise = a random prompt of the same template; each step's top 2 are the next step's receivers): "
              "score (p_patch - p_org) / p_org of the three most negative senders and the best distractor:", "",
              "| step | senders at | receivers | top senders |", "|---|---|---|---|"]
    steps = results["path patching"]
    receivers = "logits"
    for step, where in zip(steps, ("last", "last", "query_label", "prev_query_label")):
        ranked = steps[step]
        lines.append(f"| {step} | {where} | {receivers} | "
                     + ", ".join(f"{s} {v:.3f}" for s, v in ranked[:3]) + " |")
        receivers = ", ".join(s for s, _ in ranked[:2])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=500, help="prompts per box count for accuracy / CMAP")
    parser.add_argument("--n-patch", type=int, default=150, help="triples per desideratum for the patching table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", choices=("all", "variants", "pair"), default="all",
                        help="variants: strong / weak / positional; pair: paper-base / paper-ft")
    parser.add_argument("--json", help="also write every number to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict = {}
    if args.part in ("all", "variants"):
        results["variants"] = measure(args.n, args.n_patch, args.seed)
    if args.part in ("all", "pair"):
        results["pair"] = measure_pair(args.n, args.n_patch, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), **results}, f, indent=1)
    print("\n\n".join(fn(results[key]) for key, fn in (("variants", markdown), ("pair", pair_markdown))  # noqa: T201
                      if key in results))


if __name__ == "__main__":
    main()
