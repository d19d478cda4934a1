"""Entity tracking (Prakash et al. 2024): which heads carry the object, the label and the position?

Runs on any supported model (default: a built-in model, offline, in minutes on a CPU):
  1. the model's accuracy on the boxes task,
  2. activation patching of every head at each chosen position, for the Object / Label / Position desiderata,
  3. DCM per desideratum over all heads at those positions, each mask evaluated on every desideratum,
and writes results.json, report.md and PNG plots to --out.
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lib import report
from lib.core.components import all_components
from lib.data_gen import (ENTITY_DESIDERATA, entity_triples, entity_word_pools, iter_pair_batches,
                          load_entity_template, random_entity_prompt)
from lib.evaluation import filter_correct, prompt_accuracy
from lib.mask_intervention import evaluate_mask, lambda_sweep, train_mask
from lib.patching import patching_scan, sites_at
from workflows import common

log = logging.getLogger("entity_tracking")
DEFAULT_MODEL = "toy:entity-base"
POSITIONS = ("last", "query_label", "prev_query_label")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p, DEFAULT_MODEL, "toy:entity-base, toy:entity-ft, planted:strong, planted:weak, ...")
    p.add_argument("--n-boxes", type=int, default=7, help="boxes per prompt (the paper: 7)")
    common.add_template_arg(p, "the prompts' wording for this model (default: 'The apple is in Box F, ...')")
    p.add_argument("--n-train", type=int, default=128, help="DCM training triples per desideratum (paper: 1000)")
    p.add_argument("--n-eval", type=int, default=64, help="held-out triples per desideratum (paper: 500)")
    common.add_dcm_args(p, lam=0.01, lam_help="paper: 0.01")
    p.add_argument("--positions", default=",".join(POSITIONS), help="token positions to patch heads at")
    p.add_argument("--desiderata", default=",".join(ENTITY_DESIDERATA), help="subset of object,label,position")
    p.add_argument("--no-scan", action="store_true", help="skip the per-head activation-patching scan")
    p.add_argument("--sweep", default="", help="comma-separated lambdas: also plot mask size and accuracy per lambda")
    p.add_argument("--out", type=Path, default=Path("runs/entity_tracking"), help="output directory")
    return p.parse_args(argv)


def head_grid(arch, sites, values, position):
    grid = np.zeros((arch.n_layers, arch.n_heads))
    for site, v in zip(sites, values):
        if site.position == position and site.component.is_head:
            grid[site.component.layer, site.component.head] = v
    return grid


def main(argv=None) -> dict:
    args = parse_args(argv)
    handle, out, started = common.start_run(args)
    arch = handle.arch
    tok = handle.tokenizer
    desiderata = [d.strip() for d in args.desiderata.split(",") if d.strip()]
    positions = [p.strip() for p in args.positions.split(",") if p.strip()]
    log.info("model %s: %d layers x %d heads", handle.name, arch.n_layers, arch.n_heads)

    # 1. the model's own accuracy
    template = load_entity_template(args.template)
    objects, labels = entity_word_pools(tok, args.n_boxes, template)
    rng = random.Random(args.seed)
    prompts = [random_entity_prompt(rng, args.n_boxes, objects, labels, template) for _ in range(args.n_eval)]
    model_acc = prompt_accuracy(handle, prompts, batch_size=args.batch_size)
    log.info("model accuracy with %d boxes: %.3f (chance %.3f)", args.n_boxes, model_acc, 1 / args.n_boxes)

    # desiderata data: originals and alternates the model answers correctly, disjoint train / eval seeds
    def make(desideratum, n, seed):
        triples = entity_triples(desideratum, 3 * n, n_boxes=args.n_boxes, seed=seed, tokenizer=tok,
                                 template=template)
        return filter_correct(handle, triples, batch_size=args.batch_size)[:n]

    train = {d: make(d, args.n_train, args.seed + 1) for d in desiderata}
    evals = {d: make(d, args.n_eval, args.seed + 1000) for d in desiderata}
    sites = [s for p in positions for s in sites_at(all_components(arch, mlps=False), p)]
    results = {"config": {k: str(v) for k, v in vars(args).items()}, "model": handle.name,
               "model_accuracy": model_acc, "n_train": {d: len(v) for d, v in train.items()},
               "n_eval": {d: len(v) for d, v in evals.items()}, "template": template.name}
    ready = [d for d in desiderata if train[d] and evals[d]]   # a desideratum the model never answers is skipped
    results["no_correct_triples"] = {d: common.no_correct_triples(d, 3 * (args.n_train + args.n_eval),
                                                              len(train[d]) + len(evals[d]))
                                     for d in desiderata if d not in ready}
    for message in results["no_correct_triples"].values():
        log.warning(message)
    desiderata = ready

    # 2. activation-patching scan
    if not args.no_scan:
        scan = {}
        for d in tqdm(desiderata, desc="patching scan"):
            scan[d] = patching_scan(handle, iter_pair_batches(evals[d], tok, args.batch_size), sites).tolist()
            for position in positions:
                report.heatmap(out / f"patching_{d}_{position}.png", head_grid(arch, sites, scan[d], position),
                               f"{d}: P(target) patching one head at {position}")
        results["patching_scan"] = {d: {str(s): float(v) for s, v in zip(sites, scan[d])} for d in desiderata}

    # 3. DCM per desideratum, evaluated on every desideratum
    config = common.dcm_config(args)
    results["dcm"] = {}
    for d in desiderata:
        log.info("DCM on the %s desideratum (%d train triples, %d sites)", d, len(train[d]), len(sites))
        result = train_mask(handle, {d: train[d]}, {d: evals[d][: len(evals[d]) // 2]}, sites, config)
        held_out = {k: v[len(v) // 2:] for k, v in evals.items()}
        acc = evaluate_mask(handle, held_out, sites, result.selected_patched, args.batch_size)
        results["dcm"][d] = {**result.to_json(), "heldout_accuracy": acc}
        for position in positions:
            report.heatmap(out / f"mask_{d}_{position}.png", head_grid(arch, sites, result.weights, position),
                           f"DCM weights ({d}) at {position}: 0 = patched", cmap="magma")
        log.info("%s mask: %s; held-out accuracy %s", d, result.selected_patched or "(empty)", acc)
    if results["dcm"]:
        report.grouped_bars(out / "dcm_accuracy.png", desiderata,
                            {f"mask: {d}": [results["dcm"][d]["heldout_accuracy"].get(k, 0) for k in desiderata]
                             for d in desiderata},
                            "held-out accuracy of each DCM mask on each desideratum")
    if args.sweep:
        lambdas = [float(x) for x in args.sweep.split(",")]
        results["lambda_sweep"] = {}
        for d in desiderata:
            rows = lambda_sweep(handle, {d: train[d]}, {d: evals[d][: len(evals[d]) // 2]}, sites, lambdas, config)
            results["lambda_sweep"][d] = rows
            report.line_plot(out / f"lambda_sweep_{d}.png", lambdas,
                             {"sites patched (final mask)": [r["n_final"] for r in rows],
                              "sites patched (selected mask)": [r["n_selected"] for r in rows]},
                             f"{d}: mask size per lambda", "lambda", "sites patched", logx=True)
            report.line_plot(out / f"lambda_sweep_{d}_accuracy.png", lambdas,
                             {"final mask": [r["final_val_accuracy"].get(d, 0.0) for r in rows],
                              "selected mask": [r["selected_val_accuracy"].get(d, 0.0) for r in rows]},
                             f"{d}: validation accuracy per lambda", "lambda", "accuracy", logx=True)
    results["seconds"] = round(time.time() - started, 1)
    report.write_json(out / "results.json", results)
    (out / "report.md").write_text(render_report(results, desiderata, positions))
    log.info("wrote %s (results.json, report.md, plots) in %.0f s", out, results["seconds"])
    return results


def render_report(results: dict, desiderata, positions) -> str:
    lines = [f"# Entity tracking on {results['model']}", "",
             f"Model accuracy: **{results['model_accuracy']:.2f}** ({results['config']['n_boxes']} boxes; "
             "Llama-7B in the paper: 0.66, Goat-7B 0.82). Prompt template: "
             f"{results.get('template', 'default')}.", ""]
    lines += [f"**Skipped {d}**: {m}." for d, m in results.get("no_correct_triples", {}).items()]
    lines += [""] if results.get("no_correct_triples") else []
    if "patching_scan" in results:
        lines += ["## Activation patching, one head at a time", "",
                  "Fraction of held-out triples whose output becomes the desideratum's target. Top heads:", ""]
        rows = []
        for d in desiderata:
            top = sorted(results["patching_scan"][d].items(), key=lambda kv: -kv[1])[:3]
            rows.append([d] + [f"{name} ({v:.2f})" for name, v in top])
        lines += [report.markdown_table(["desideratum", "1st", "2nd", "3rd"], rows), ""]
    lines += ["## DCM masks (Prakash et al. Sec. 5)", "",
              "Paper (Llama-7B, circuit groups): Object -> all 40 Value Fetcher heads; Position -> 5/7 Position "
              "Transmitter and 14/20 Position Detector heads; Label -> Structure Reader: none.", ""]
    rows = []
    for d in desiderata:
        r = results["dcm"][d]
        rows.append([d, ", ".join(r["selected_patched"]) or "(none)"] + [r["heldout_accuracy"].get(k, 0.0) for k in desiderata])
    lines += [report.markdown_table(["trained on", "patched sites"] + [f"acc {k}" for k in desiderata], rows), ""]
    lines += ["Plots: `patching_<desideratum>_<position>.png`, `mask_<desideratum>_<position>.png`, "
              "`dcm_accuracy.png`. Every number is in `results.json` with the config that produced it.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
