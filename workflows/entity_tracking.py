"""Entity tracking (Prakash et al. 2024, "Fine-tuning Enhances Existing Mechanisms"), end to end.

Steps (`--steps`, all but knockout and scan by default; each one's result is saved under OUT/steps/, so a rerun
with --resume skips what is finished):
  evaluate          accuracy of the base model (--model) and of the fine-tune (--fine-tuned) on the boxes task
  circuit           path patching on the base with the authors' four-step schedule (Value Fetcher <- Position
                    Transmitter <- Position Detector <- Structure Reader), pruned by their minimality rule; or
                    --circuit FILE. Saved as OUT/circuit.json
  evaluate-circuit  Table 1 for each model (full model, circuit, random circuits, faithfulness) and completeness
  dcm               per circuit group, one DCM mask per desideratum (Object, Label, Position) over that group's
                    heads at the group's position: Table A2
  functionality     patching each group's DCM-selected heads on each desideratum, per model, 10 resamples (Fig. 3)
  cmap              the fine-tune's head outputs written into the base, per group and the whole circuit (Fig. 4)
  gradients         attribution patching beside the activation-patching scan of every head at the circuit's
                    positions (rank correlation), and the logit lens of the last position
  knockout          attention knockout curves per starting layer (Appendix A)
  scan              (extra) one-head activation patching of every head at the group positions

Writes results.json, report.md (the paper's tables beside this run's, one sentence per finding) and figures to
--out. Defaults run offline on a built-in pair (planted:paper-base / planted:paper-ft) in minutes on a CPU.
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from lib import metrics as M
from lib import report
from lib.circuit_discovery import (AUTHORS_SCHEDULE, Circuit, Step, discover_circuit, prune_circuit,
                                   rank_first_candidates)
from lib.attribution import rank_sites
from lib.cmap import check_compatible, cmap_input_scores, cmap_scores
from lib.core.components import all_components
from lib.data_gen import (ENTITY_DESIDERATA, NOISE_KINDS, answer_batches, entity_triples,
                          entity_word_pools, iter_pair_batches, load_entity_template, path_patching_noise,
                          random_entity_prompt)
from lib.evaluation import filter_correct, prompt_accuracy
from lib.knockout import knockout_curve
from lib.mask_intervention import train_mask
from lib.models import ModelHandle, load_model
from lib.patching import patching_scan, sites_at
from lib.types import Site
from workflows import common, companions
from workflows.entity_report import render_report

log = logging.getLogger("entity_tracking")

DEFAULT_MODEL = "planted:paper-base"
DEFAULT_FINE_TUNED = "planted:paper-ft"
STEPS = ("evaluate", "circuit", "evaluate-circuit", "dcm", "functionality", "cmap", "gradients", "knockout", "scan")
DEFAULT_STEPS = ("evaluate", "circuit", "evaluate-circuit", "dcm", "functionality", "cmap", "gradients")
GROUPS = tuple(step.group for step in AUTHORS_SCHEDULE)
# CMAP's heads per group, as the authors' code chose them: the Value Fetcher heads of the Object DCM, the
# Transmitter and Detector heads of the Position DCM, the whole Structure Reader group.
CMAP_SELECTION = {"Value Fetcher": "object", "Position Transmitter": "position", "Position Detector": "position",
                  "Structure Reader": None}
KNOCKOUTS = (("last", "correct_object"), ("last", "query_label"), ("query_label", "prev_query_label"),
             ("last", "control"))


# ---- command line ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = common.ArgumentParser(prog="entity_tracking.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p, DEFAULT_MODEL, "planted:paper-base, toy:entity-base, planted:strong, ...")
    p.add_argument("--fine-tuned", default=DEFAULT_FINE_TUNED,
                   help="the fine-tune compared with --model: anything --model takes, or a PEFT LoRA adapter "
                        "directory over --model; 'none' for no fine-tune (default: planted:paper-ft)")
    common.add_template_arg(p, "the prompts' wording for this model (default: 'The apple is in Box F, ...')")
    p.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                   type=lambda v: common.csv_choice(v, STEPS, "--steps"),
                   help=f"comma-separated subset of {','.join(STEPS)} (default: all but knockout and scan)")
    p.add_argument("--resume", action="store_true", help="skip the steps an earlier run in --out finished")
    p.add_argument("--circuit", type=Path, default=None, help="a circuit JSON (from an earlier run's circuit.json) "
                   "instead of discovering one")
    p.add_argument("--n-boxes", type=common.positive(int, "--n-boxes"), default=7, help="boxes per prompt (paper: 7)")
    p.add_argument("--n-eval", type=common.positive(int, "--n-eval"), default=300,
                   help="prompts / triples for accuracy, circuit evaluation, functionality and CMAP (paper: 500)")
    p.add_argument("--n-train", type=common.positive(int, "--n-train"), default=256,
                   help="DCM training triples per desideratum (paper: 1000)")
    p.add_argument("--n-patch", type=common.positive(int, "--n-patch"), default=100,
                   help="examples for path patching (authors: 300) and minimality (authors: 100)")
    p.add_argument("--noise", default="absent_query", choices=NOISE_KINDS,
                   help="path-patching noise: the authors' (a query label absent from the context) or random prompts")
    p.add_argument("--top-k", default="20,5,10", help="receivers kept after path-patching steps A, B, C (authors: "
                   "20,5,10 for Llama-7B)")
    p.add_argument("--min-effect", type=common.positive(float, "--min-effect", allow_zero=True), default=0.01,
                   help="a head joins a group only if patching its path lowers p(answer) by this share (0 = the "
                        "authors' pure top-k, which on a small model fills groups with heads that change nothing)")
    p.add_argument("--resamples", type=common.positive(int, "--resamples"), default=10,
                   help="resamples of the functionality patching (paper: 10)")
    p.add_argument("--cmap-input", default="out", choices=("out", "q", "k", "v", "qkv"),
                   help="what CMAP writes into the base: the heads' outputs (the paper) or also their query / key / "
                        "value inputs at their positions (the authors' unused variant)")
    p.add_argument("--rank-first", type=common.positive(int, "--rank-first"), default=None,
                   help="a cheap first pass: path-patch only the K heads per position that attribution patching ranks "
                        "highest, and train each group's DCM mask only on its K best-ranked heads")
    p.add_argument("--batch-size", type=common.positive(int, "--batch-size"), default=32)
    p.add_argument("--epochs", type=common.positive(int, "--epochs"), default=2, help="DCM epochs (authors: 2)")
    p.add_argument("--lambda", dest="lam", type=common.positive(float, "--lambda", allow_zero=True), default=0.01,
                   help="DCM sparsity strength (authors: 0.01)")
    p.add_argument("--lr", type=common.positive(float, "--lr"), default=0.1, help="DCM Adam learning rate (authors: 0.1)")
    p.add_argument("--parameterization", default="clamp", choices=("clamp", "sigmoid", "hard_concrete"),
                   help="clamp = the papers' recipe; the others learn where its gradients vanish")
    p.add_argument("--init", default="half", choices=("ones", "half", "random"),
                   help="initial DCM weights ('ones' = the papers', which misses a head behind saturated attention)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/entity_tracking"), help="output directory")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything that can be checked before a model loads: one line and exit status 2 otherwise."""
    try:
        args.top_k = [int(k) for k in args.top_k.split(",")]
    except ValueError:
        p.error(f"--top-k takes three comma-separated integers (A,B,C), got {args.top_k!r}")
    if len(args.top_k) != 3 or min(args.top_k) < 1:
        p.error(f"--top-k takes three positive integers (receivers after steps A, B, C), got {args.top_k}")
    if args.n_boxes < 3:
        p.error(f"--n-boxes must be at least 3 (the desiderata need three different targets), got {args.n_boxes}")
    if args.fine_tuned.lower() == "none":
        args.fine_tuned = None
    if args.circuit is not None:
        if not args.circuit.is_file():
            p.error(f"--circuit {args.circuit}: no such file")
        try:
            Circuit.load(args.circuit)
        except (ValueError, KeyError, TypeError) as err:
            p.error(f"--circuit {args.circuit} is not a circuit JSON ({type(err).__name__}: {err})")
    needs_ft = {"cmap"} & set(args.steps)
    if needs_ft and args.fine_tuned is None:
        p.error("--steps cmap needs --fine-tuned (the model whose heads are patched into --model)")
    if args.template is not None and not Path(args.template).is_file():
        p.error(f"--template {args.template}: no such file")
    if args.init == "ones" and args.parameterization != "clamp":
        p.error(f"--init ones cannot start the {args.parameterization} parameterisation (its weights would start "
                "clipped); use --init half or --parameterization clamp")
    if args.fine_tuned is not None:
        try:
            common.check_pair(args.model, args.fine_tuned)
        except ValueError as err:
            p.error(str(err))


# ---- data --------------------------------------------------------------------------------------------------------


class Data:
    """Every prompt set of a run, made once from the seed (each step asks for what it needs)."""

    def __init__(self, args: argparse.Namespace, tokenizer):
        self.args = args
        self.tok = tokenizer
        self.template = load_entity_template(args.template)
        self.objects, self.labels = entity_word_pools(tokenizer, args.n_boxes, self.template)

    def prompts(self, n: int, seed: int):
        rng = random.Random(seed)
        return [random_entity_prompt(rng, self.args.n_boxes, self.objects, self.labels, self.template)
                for _ in range(n)]

    def eval_batches(self, seed_offset: int = 0):
        return answer_batches(self.prompts(self.args.n_eval, self.args.seed + seed_offset), self.tok,
                              self.args.batch_size)

    def triples(self, desideratum: str, n: int, seed: int):
        return entity_triples(desideratum, n, n_boxes=self.args.n_boxes, seed=seed, tokenizer=self.tok,
                              template=self.template)

    def correct_triples(self, handle: ModelHandle, desideratum: str, n: int, seed: int):
        """n triples whose original and alternate the model answers (drawn from up to 3 n)."""
        return filter_correct(handle, self.triples(desideratum, 3 * n, seed), self.args.batch_size)[:n]

    def noise_batches(self, handle: ModelHandle, n: int, seed: int, correct: bool):
        kwargs = dict(n_boxes=self.args.n_boxes, seed=seed, tokenizer=self.tok, objects=self.objects,
                      labels=self.labels)
        triples = path_patching_noise(self.args.noise, n, **kwargs)
        if correct:  # path patching scores relative to p(answer): an unanswered original's ratio explodes
            triples = filter_correct(handle, triples, self.args.batch_size, require_alternate=False)
        return list(iter_pair_batches(triples, self.tok, self.args.batch_size))

    def means(self, handle: ModelHandle):
        """Whole-sequence means of every head (as the authors: contexts whose query label is absent)."""
        reference = self.noise_batches(handle, self.args.n_eval, self.args.seed + 7, correct=False)
        return M.whole_sequence_means(handle, [type(b)(b.alternate) for b in reference])


# ---- steps -------------------------------------------------------------------------------------------------------


def step_evaluate(models: dict[str, ModelHandle], data: Data) -> dict:
    prompts = data.prompts(data.args.n_eval, data.args.seed)
    return {role: {"model": h.name, "accuracy": prompt_accuracy(h, prompts, data.args.batch_size)}
            for role, h in models.items()} | {"chance": 1 / data.args.n_boxes, "n": len(prompts)}


def schedule(args: argparse.Namespace) -> list[Step]:
    k = [*args.top_k, AUTHORS_SCHEDULE[-1].k]
    return [Step(s.group, s.position, s.receivers, s.input, k=k[i], size=s.size)
            for i, s in enumerate(AUTHORS_SCHEDULE)]


def step_circuit(base: ModelHandle, data: Data, out: Path) -> dict:
    args = data.args
    if args.circuit is not None:
        circuit = Circuit.load(args.circuit)
        log.info("circuit read from %s", args.circuit)
        found = {"source": str(args.circuit)}
    else:
        batches = data.noise_batches(base, args.n_patch, args.seed + 3, correct=True)
        if not batches:
            message = (f"{base.name} answers none of the {args.n_patch} path-patching prompts correctly (accuracy "
                       "0.00 on them): there is no mechanism to trace, so no circuit is found and the steps that "
                       "need one are skipped (check the model's accuracy and --template)")
            log.warning(message)
            empty = Circuit([], {}, {"model": base.name})
            empty.save(out / "circuit.json")
            return {"source": "path patching", "skipped": message, "circuit": empty.to_dict()}
        candidates, ranked = None, None
        if args.rank_first:   # attribution on p(answer) with the noise as the alternate: a first pass per position
            ranked = rank_first_candidates(base, batches, args.rank_first, schedule(args))
            candidates = [s for rows in ranked.values() for s, _ in rows]
        discovered = discover_circuit(base, batches, schedule(args), min_effect=args.min_effect or None,
                                      candidates=candidates)
        minimal_batches = [b for b in batches][: max(1, 100 // args.batch_size)]
        circuit = prune_circuit(base, discovered, minimal_batches, data.means(base))
        found = {"source": "path patching", "before_minimality": discovered.to_dict(),
                 "examples": sum(b.size for b in batches)}
        if ranked is not None:
            every = base.arch.n_layers * base.arch.n_heads * len(ranked)
            found["rank_first"] = {"k": args.rank_first, "candidates": [str(s) for s in candidates],
                                   "senders_path_patched": len(candidates), "senders_without": every}
    circuit.save(out / "circuit.json")
    return {**found, "circuit": circuit.to_dict()}


def load_circuit(result: dict) -> Circuit:
    return Circuit.from_dict(result["circuit"])


def step_evaluate_circuit(models: dict[str, ModelHandle], circuit: Circuit, data: Data) -> dict:
    sites = circuit.sites()
    groups = {name: heads for name, heads in circuit.as_groups().items() if heads}
    out = {}
    for role, h in models.items():
        batches = data.eval_batches(seed_offset=11)
        means = data.means(h)
        table = M.circuit_evaluation(h, batches, sites, means, groups, n_random=10, n_subsets=5, seed=data.args.seed)
        out[role] = {"model_name": h.name, "full_model": table["model"], "circuit": table["circuit"],
                     "faithfulness": table["faithfulness"], "random_circuits": table["random_circuits"],
                     "random_circuit": statistics.mean(table["random_circuits"]),
                     "completeness_per_group": table["completeness_per_group"],
                     "completeness_random_K": table["completeness_random_K"]}
    return out


def group_sites(circuit: Circuit) -> dict[str, list[Site]]:
    return {g.name: list(g.heads) for g in circuit.groups if g.heads}


def step_dcm(base: ModelHandle, circuit: Circuit, data: Data, config) -> dict:
    args = data.args
    out: dict = {"config": asdict(config)}
    train, val, skipped = {}, {}, {}
    for d in ENTITY_DESIDERATA:
        triples = data.correct_triples(base, d, args.n_train + args.n_train // 4, args.seed + 100)
        cut = (len(triples) * 4) // 5
        train[d], val[d] = triples[:cut], triples[cut:]
        if not train[d] or not val[d]:
            skipped[d] = common.no_correct_triples(d, 3 * (args.n_train + args.n_train // 4), len(triples))
            log.warning(skipped[d])
    out["skipped"] = skipped
    out["n_train"] = {d: len(v) for d, v in train.items()}
    out["groups"] = {}
    for name, sites in group_sites(circuit).items():
        rows = {}
        for d in ENTITY_DESIDERATA:
            if d in skipped:
                continue
            candidates = sites
            if args.rank_first and len(sites) > args.rank_first:
                ranked = rank_sites(base, iter_pair_batches(train[d], data.tok, args.batch_size), sites=sites,
                                    k=args.rank_first, by="increase", progress=False)
                candidates = [s for s, _ in ranked]
            result = train_mask(base, {d: train[d]}, {d: val[d]}, candidates, config, progress=False)
            rows[d] = {"candidates": [str(s) for s in candidates], "selected": result.selected_patched,
                       "final": result.final_patched, "val_accuracy": result.selected_val_accuracy.get(d, 0.0),
                       "weights": dict(zip([str(s) for s in candidates], result.weights))}
            log.info("DCM %s / %s: %d of %d heads carry it (%s), val accuracy %.2f", name, d,
                     len(result.selected_patched), len(candidates), ", ".join(result.selected_patched) or "-",
                     rows[d]["val_accuracy"])
        out["groups"][name] = {"sites": [str(s) for s in sites], "desiderata": rows}
    return out


def functional_heads(circuit: Circuit, dcm: dict | None) -> dict[str, list[Site]]:
    """Per group, the heads DCM selected for any desideratum (the whole group where DCM did not run)."""
    heads = {}
    for name, sites in group_sites(circuit).items():
        rows = (dcm or {}).get("groups", {}).get(name, {}).get("desiderata", {})
        chosen = {Site.parse(s) for row in rows.values() for s in row["selected"]}
        heads[name] = sorted(chosen) if rows else sites
    return heads


def step_functionality(models: dict[str, ModelHandle], circuit: Circuit, dcm: dict | None, data: Data) -> dict:
    args = data.args
    heads = {g: s for g, s in functional_heads(circuit, dcm).items() if s}
    out: dict = {"heads": {g: [str(s) for s in v] for g, v in heads.items()}, "models": {}}
    if not heads:
        return out
    n = max(8, args.n_eval // args.resamples)
    for role, h in models.items():
        table: dict = {}
        for d in ENTITY_DESIDERATA:
            runs = []
            for r in range(args.resamples):
                triples = data.correct_triples(h, d, n, args.seed + 500 + 10 * r)
                if not triples:
                    continue
                scores = patching_scan(h, iter_pair_batches(triples, data.tok, args.batch_size),
                                       list(heads.values()), progress=False)
                runs.append(scores.tolist())
            table[d] = {g: {"mean": float(np.mean([r[i] for r in runs])) if runs else 0.0,
                            "std": float(np.std([r[i] for r in runs])) if runs else 0.0, "resamples": len(runs)}
                        for i, g in enumerate(heads)}
        out["models"][role] = {"model": h.name, "accuracy": table}
    return out


def cmap_groups(circuit: Circuit, dcm: dict | None) -> tuple[dict[str, list[Site]], dict[str, str]]:
    """The heads CMAP patches per group (the authors' choice, CMAP_SELECTION) and where each choice came from."""
    groups, source = {}, {}
    for name, sites in group_sites(circuit).items():
        desideratum = CMAP_SELECTION.get(name)
        row = (dcm or {}).get("groups", {}).get(name, {}).get("desiderata", {}).get(desideratum or "")
        if desideratum and row and row["selected"]:
            groups[name] = [Site.parse(s) for s in row["selected"]]
            source[name] = f"{desideratum} DCM"
        else:
            groups[name] = sites
            source[name] = "whole group" if desideratum is None else f"whole group ({desideratum} DCM selected none)"
    groups["whole circuit"] = circuit.sites()
    source["whole circuit"] = "every head of the circuit"
    return groups, source


def step_cmap(base: ModelHandle, fine: ModelHandle, circuit: Circuit, dcm: dict | None, data: Data) -> dict:
    groups, source = cmap_groups(circuit, dcm)
    batches = data.eval_batches(seed_offset=23)
    out = {"accuracy": cmap_scores(base, fine, batches, groups), "heads": {g: [str(s) for s in v]
                                                                            for g, v in groups.items()},
           "source": source}
    if data.args.cmap_input != "out":
        kinds = ("q", "k", "v") if data.args.cmap_input == "qkv" else (data.args.cmap_input,)
        out["inputs"] = {"kinds": list(kinds), "accuracy": cmap_input_scores(base, fine, batches, groups, kinds)}
    return out


def _with_control(batch, rng: random.Random):
    """The batch with a "control" position: a context token that is no label, object or query (a random control
    for knockout)."""
    original = batch.original
    task = {"correct_object", "query_label", "prev_query_label", "last"}
    taken = [original.positions[k] for k in original.positions if k in task or k.startswith(("object_", "label_"))]
    control = []
    for i in range(original.size):
        busy = {int(t[i]) for t in taken}
        first = int(original.width - original.attention_mask[i].sum())
        free = [t for t in range(first + 1, int(original.positions["query_label"][i])) if t not in busy]
        control.append(rng.choice(free) if free else first)
    positions = {**original.positions, "control": torch.tensor(control)}
    return type(batch)(original.with_positions(positions), batch.alternate, batch.target_ids, batch.foil_ids,
                       batch.desideratum)


def step_knockout(models: dict[str, ModelHandle], data: Data) -> dict:
    rng = random.Random(data.args.seed)
    out = {}
    for role, h in models.items():
        batches = [_with_control(b, rng) for b in data.eval_batches(seed_offset=31)]
        out[role] = {"model": h.name, "curves": {f"{a}->{b}": knockout_curve(h, batches, a, b, progress=False)
                                                 for a, b in KNOCKOUTS}}
    return out


def step_gradients(base: ModelHandle, circuit: Circuit | None, data: Data, out: Path) -> dict:
    positions = sorted({g.position for g in circuit.groups}) if circuit else ["last"]
    sites = [s for p in positions for s in sites_at(all_components(base.arch, mlps=False), p)]
    result = {"positions": positions, "attribution": {}}
    for d in ENTITY_DESIDERATA:
        triples = data.correct_triples(base, d, data.args.n_eval // 3, data.args.seed + 700)
        if triples:
            result["attribution"][d] = companions.attribution_beside_scan(
                base, list(iter_pair_batches(triples, data.tok, data.args.batch_size)), sites)
    batch = data.eval_batches(seed_offset=41)[0]
    result["logit_lens"] = companions.lens_of_last_position(base, batch, out / "logit_lens_base.png")
    return result


def step_scan(base: ModelHandle, circuit: Circuit | None, data: Data) -> dict:
    positions = sorted({g.position for g in circuit.groups}) if circuit else ["last", "query_label",
                                                                               "prev_query_label"]
    sites = [s for p in positions for s in sites_at(all_components(base.arch, mlps=False), p)]
    out = {}
    for d in ENTITY_DESIDERATA:
        triples = data.correct_triples(base, d, data.args.n_eval // 2, data.args.seed + 900)
        if triples:
            scores = patching_scan(base, iter_pair_batches(triples, data.tok, data.args.batch_size), sites)
            out[d] = {str(s): float(v) for s, v in zip(sites, scores)}
    return {"positions": positions, "scores": out}


# ---- figures -----------------------------------------------------------------------------------------------------


def head_grid(arch, sites, value) -> np.ndarray:
    grid = np.zeros((arch.n_layers, arch.n_heads))
    for s in sites:
        site = Site.parse(s) if isinstance(s, str) else s
        grid[site.component.layer, site.component.head] = value(site)
    return grid


def figures(results: dict, arch, out: Path) -> list[str]:
    made = []
    circuit = Circuit.from_dict(results["circuit"]["circuit"]) if "circuit" in results else None
    if circuit is not None:
        dcm = results.get("dcm", {}).get("groups", {})
        panels = {}
        for g in circuit.groups:
            if not g.heads:
                continue
            rows = dcm.get(g.name, {}).get("desiderata", {})
            carried = {s: ",".join(d[0].upper() for d, r in rows.items() if s in r["selected"]) for s in
                       map(str, g.heads)}
            panels[f"{g.name} @ {g.position}: {len(g.heads)} heads"] = head_grid(
                arch, g.heads, lambda s, carried=carried: 0.5 + 0.5 * bool(carried.get(str(s))))
        if panels:
            made.append(str(report.heatmap_panels(out / "circuit_heads.png", panels,
                                                  "circuit heads per group (1.0: DCM-selected for a desideratum, "
                                                  "0.5: in the group only)")))
    if "functionality" in results and results["functionality"].get("models"):
        panels = {}
        for role, row in results["functionality"]["models"].items():
            table = row["accuracy"]
            groups = list(next(iter(table.values())).keys()) if table else []
            panels[f"{role}: {row['model']}"] = (
                list(table), {g: [table[d][g]["mean"] for d in table] for g in groups},
                {g: [table[d][g]["std"] for d in table] for g in groups})
        made.append(str(report.bar_panels(out / "figure3_functionality.png", panels,
                                          "Figure 3: patching each group's DCM heads, per desideratum "
                                          "(mean and std over resamples)")))
    if "cmap" in results:
        acc = results["cmap"]["accuracy"]
        made.append(str(report.grouped_bars(out / "figure4_cmap.png", list(acc),
                                            {"accuracy": list(acc.values())},
                                            "Figure 4: base with the fine-tune's heads patched in (CMAP)")))
    if "knockout" in results:
        for role, row in results["knockout"].items():
            curves = row["curves"]
            layers = [int(k) for k in next(iter(curves.values()))]
            made.append(str(report.line_plot(out / f"knockout_{role}.png", layers,
                                             {name: list(c.values()) for name, c in curves.items()},
                                             f"attention knockout from layer L on ({row['model']})",
                                             "first blocked layer L", "accuracy")))
    return made


# ---- main --------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("resume",
                                                                                                      "steps")}
    try:
        run = common.Run(args.out, config, args.resume)
    except SystemExit as err:
        print(f"entity_tracking.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    base = load_model(args.model, device_map=args.device_map, dtype=args.dtype, remote=args.remote)
    models = {"base": base}
    if args.fine_tuned is not None:
        models["fine_tuned"] = load_model(args.fine_tuned, base=args.model if common.is_adapter(args.fine_tuned)
                                          else None, device_map=args.device_map, dtype=args.dtype,
                                          remote=args.remote)
        check_compatible(base, models["fine_tuned"])
    run.count_traffic(list(models.values()))
    data = Data(args, base.tokenizer)
    log.info("base %s, fine-tune %s; steps %s", base.name, models.get("fine_tuned", None) and
             models["fine_tuned"].name, ",".join(args.steps))
    results: dict = {"config": config, "steps": args.steps, "models": {r: h.name for r, h in models.items()}}
    dcm_config = common.dcm_config(args)
    wanted = set(args.steps)
    if "evaluate" in wanted:
        results["evaluate"] = run.step("evaluate", lambda: step_evaluate(models, data))
    circuit = None
    if wanted & {"circuit", "evaluate-circuit", "dcm", "functionality", "cmap"} or (
            wanted & {"scan", "gradients"} and args.circuit is not None):
        results["circuit"] = run.step("circuit", lambda: step_circuit(base, data, args.out))
        circuit = load_circuit(results["circuit"])
        if not circuit.sites():
            log.warning("the circuit is empty: nothing for the later steps to evaluate")
            results["circuit_empty"] = results["circuit"].get("skipped", "the circuit is empty")
    if "evaluate-circuit" in wanted and circuit is not None and circuit.sites():
        results["evaluate-circuit"] = run.step("evaluate-circuit", lambda: step_evaluate_circuit(models, circuit, data))
    if "dcm" in wanted and circuit is not None and circuit.sites():
        results["dcm"] = run.step("dcm", lambda: step_dcm(base, circuit, data, dcm_config))
    if "functionality" in wanted and circuit is not None and circuit.sites():
        results["functionality"] = run.step("functionality", lambda: step_functionality(models, circuit,
                                                                                        results.get("dcm"), data))
    if "cmap" in wanted and circuit is not None and circuit.sites():
        results["cmap"] = run.step("cmap", lambda: step_cmap(base, models["fine_tuned"], circuit,
                                                             results.get("dcm"), data))
    if "gradients" in wanted:
        results["gradients"] = run.step("gradients", lambda: step_gradients(base, circuit, data, args.out))
    if "knockout" in wanted:
        results["knockout"] = run.step("knockout", lambda: step_knockout(models, data))
    if "scan" in wanted:
        results["scan"] = run.step("scan", lambda: step_scan(base, circuit, data))
    results.update(run.record())
    results["seconds"] = round(time.time() - started, 1)
    results["figures"] = figures(results, base.arch, args.out)
    report.write_json(args.out / "results.json", results)
    (args.out / "report.md").write_text(render_report(results))
    summary = [f"{name}: {'skipped (finished earlier)' if name in run.skipped else f'{run.seconds.get(name, 0)} s'}"
               for name in [s for s in STEPS if s in results]]
    log.info("done in %.0f s (%s). Report: %s", results["seconds"], "; ".join(summary), args.out / "report.md")
    return results


if __name__ == "__main__":
    main()
