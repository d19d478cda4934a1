"""Path patching, a whole step at a time: many senders per forward pass against one sender per pass.

Each case runs the authors' four-step schedule (lib.circuit_discovery.discover_circuit, AUTHORS_SCHEDULE) on a
built-in model twice with the same prompts and noise:

- one sender per pass: `senders_per_pass=1, reuse_prefix=False`, the plain algorithm (the way this project's
  path patching ran before issue 12, minus its grouping of examples by position);
- batched: the defaults, SENDERS_PER_PASS senders stacked along the batch in one forward pass and only the tokens
  from the earliest sender / receiver on computed (the clean prefix's keys and values from the clean run's cache).

Two more variants are timed to answer "stack or invokes?": stacked senders without prefix reuse, and one nnsight
invoke per sender in one trace. Before any timing is trusted, every variant's scores must equal the one-per-pass
scores to 1e-5 on every step (the run fails otherwise). Each record also has the count of forward passes per step
for a Llama-7B-shaped model (32 layers x 32 heads: every head a sender), computed with
lib.path_patching.forward_passes (tests/integration/test_path_patching.py checks it counts the traces).

`rank_first`: the batched schedule once more with `--rank-first K` (lib.circuit_discovery.rank_first_candidates:
attribution keeps the K heads per sender position that lower P(answer) most; only those are path-patched): the
senders and traces (forward passes, attribution's included) against the full batched run, its CPU time, and
whether every group came out the same (before the minimality pruning, which both would share).

    python -m bench.run_all --only path_patching_planted
    python -m bench.path_patching --model planted:positional --n 100
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from datetime import datetime, timezone

import torch

from bench.common import TraceCounter
from lib.circuit_discovery import AUTHORS_SCHEDULE, discover_circuit, prune_circuit, rank_first_candidates
from lib.data_gen import encode_pairs, path_patching_noise
from lib.evaluation import filter_correct
from lib.metrics import whole_sequence_means
from lib.models import load_model
from lib.path_patching import SENDERS_PER_PASS, forward_passes

log = logging.getLogger(__name__)

VARIANTS = {
    "one_per_pass": {"senders_per_pass": 1, "reuse_prefix": False},
    "stack": {"senders_per_pass": SENDERS_PER_PASS, "reuse_prefix": False},
    "invokes": {"senders_per_pass": SENDERS_PER_PASS, "batching": "invokes", "reuse_prefix": False},
    "batched": {},   # the defaults: stacked senders and the clean prefix reused
}
TARGET_RATIO = 3.0


def llama_7b_passes(senders_per_pass: int = SENDERS_PER_PASS) -> dict:
    """Forward passes of each step of the authors' schedule on one batch for Llama-7B (32 x 32 heads; every head
    is counted as a sender, an upper bound for the steps whose receivers sit below the top layer)."""
    heads = 32 * 32
    out = {}
    for step in AUTHORS_SCHEDULE:
        receivers = step.receivers is not None
        out[step.group] = {"one_per_pass": forward_passes(heads, 1, receivers),
                           "batched": forward_passes(heads, senders_per_pass, receivers)}
    return out


def build(model: str, n: int, n_boxes: int, seed: int, noise: str) -> tuple:
    handle = load_model(model)
    triples = path_patching_noise(noise, n, n_boxes=n_boxes, seed=seed, tokenizer=handle.tokenizer)
    triples = filter_correct(handle, triples, require_alternate=False)
    return handle, encode_pairs(triples, handle.tokenizer)


def _run(handle, batch, options: dict) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    circuit = discover_circuit(handle, [batch], progress=False, **options)
    return {"circuit": circuit, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "step_wall": circuit.config["step_seconds"], "step_cpu": circuit.config["step_cpu_seconds"]}


def rank_first_saving(handle, batch, k: int) -> dict:
    """The batched schedule with and without a rank-first pass of K heads per sender position: senders, traces,
    CPU time and whether the circuits are the same after the authors' minimality pruning (whole-sequence means
    over the noise prompts), as the entity workflow's circuit step builds them."""
    groups = lambda circuit: {g.name: sorted(str(s) for s in g.heads) for g in circuit.groups}  # noqa: E731
    means = whole_sequence_means(handle, [type(batch)(batch.alternate)])
    out = {}
    for what in ("every_head", "rank_first"):
        cpu = time.process_time()
        with TraceCounter(handle) as counter:
            candidates = None
            if what == "rank_first":
                ranked = rank_first_candidates(handle, [batch], k)
                candidates = [s for rows in ranked.values() for s, _ in rows]
            circuit = discover_circuit(handle, [batch], candidates=candidates, progress=False)
        out[what] = {"senders": sum(len(v) for v in circuit.step_scores.values()), "traces": counter.count,
                     "cpu_s": time.process_time() - cpu, "groups_before_pruning": groups(circuit),
                     "groups": groups(prune_circuit(handle, circuit, [batch], means, progress=False))}
    positions = len({step.position for step in AUTHORS_SCHEDULE})
    llama = {"every_head": sum(forward_passes(32 * 32, receivers=s.receivers is not None) for s in AUTHORS_SCHEDULE),
             "rank_first": 2 * positions + sum(forward_passes(k, receivers=s.receivers is not None)
                                               for s in AUTHORS_SCHEDULE)}
    same = lambda key: out["every_head"][key] == out["rank_first"][key]  # noqa: E731
    return {"k_per_position": k, **out, "same_groups": same("groups"),
            "same_groups_before_pruning": same("groups_before_pruning"),
            "traces_saved": out["every_head"]["traces"] - out["rank_first"]["traces"],
            "llama_7b_forward_passes_of_the_schedule": llama}


def run(name: str, model: str = "planted:positional", n: int = 100, n_boxes: int = 7, seed: int = 0,
        noise: str = "absent_query", repeats: int = 1, threads: int | None = 1,
        variants: tuple[str, ...] = tuple(VARIANTS), target: float | None = TARGET_RATIO,
        rank_first: int | None = 4) -> dict:
    """Time the schedule once per variant per repeat (alternating the order); returns the result record.

    The headline `ratio` is one-per-pass / batched median process CPU time for the whole schedule (a speed-up:
    higher is better); per-step ratios and wall-clock ratios are recorded beside it.
    """
    load_before = os.getloadavg()
    if threads is not None:
        torch.set_num_threads(threads)
    handle, batch = build(model, n, n_boxes, seed, noise)
    times: dict[str, list] = {v: [] for v in variants}
    reference = None
    max_diff: dict[str, float] = {}
    for i in range(repeats):
        for variant in (variants if i % 2 == 0 else variants[::-1]):
            result = _run(handle, batch, VARIANTS[variant])
            scores = result.pop("circuit").step_scores
            if reference is None and variant == "one_per_pass":
                reference = scores
            times[variant].append(result)
            if reference is not None:
                diffs = [abs(reference[g][s] - scores[g][s]) for g in reference for s in reference[g]]
                max_diff[variant] = max([max_diff.get(variant, 0.0), *diffs])
    if reference is None or len(max_diff) != len(variants):
        raise AssertionError("the one-per-pass variant must run first to check equal work")
    bad = {v: d for v, d in max_diff.items() if d > 1e-5}
    if bad:
        raise AssertionError(f"scores differ from one sender per pass by more than 1e-5: {bad}")

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    med = {v: {"wall": median([t["wall"] for t in ts]), "cpu": median([t["cpu"] for t in ts])}
           for v, ts in times.items()}
    steps = [s.group for s in AUTHORS_SCHEDULE]
    per_step = {v: {g: {"wall": median([t["step_wall"][g] for t in ts]), "cpu": median([t["step_cpu"][g] for t in ts])}
                    for g in steps} for v, ts in times.items()}
    step_ratio = {g: per_step["one_per_pass"][g]["cpu"] / per_step["batched"][g]["cpu"]
                  for g in steps if per_step["batched"][g]["cpu"] > 0.01}
    ratio = med["one_per_pass"]["cpu"] / med["batched"]["cpu"]
    return {
        "name": name,
        "what": "the authors' four-step path-patching schedule (discover_circuit), whole run and per step",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "setup": {"model": model, "examples": batch.size, "tokens": batch.original.width, "n_boxes": n_boxes,
                  "noise": noise, "senders_per_pass": SENDERS_PER_PASS,
                  "senders_per_step": {g: len(reference[g]) for g in steps}},
        "config": {"repeats": repeats, "torch_threads": torch.get_num_threads(), "variants": VARIANTS},
        "equal_work": {"max_abs_score_diff": max_diff},
        "median_s": med,
        "per_step_median_s": per_step,
        "times_s": {v: [{k: t[k] for k in ("wall", "cpu")} for t in ts] for v, ts in times.items()},
        "ratio": ratio,
        "ratio_basis": "one_per_pass / batched median process CPU time of the whole schedule (speed-up)",
        "ratio_wall": med["one_per_pass"]["wall"] / med["batched"]["wall"],
        "ratio_per_step_cpu": step_ratio,
        "ratio_stack_vs_invokes_cpu": med["invokes"]["cpu"] / med["stack"]["cpu"] if {"stack", "invokes"} <= set(med)
        else None,
        "llama_7b_forward_passes_per_step": llama_7b_passes(),
        "rank_first": None if rank_first is None else rank_first_saving(handle, batch, rank_first),
        "target": target,
        "meets_target": None if target is None else ratio >= target,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


CASES = {
    "path_patching_planted": {"model": "planted:positional"},
    "path_patching_toy": {"model": "toy:entity-base"},
}

QUICK = {name: {"n": 8, "n_boxes": 3} for name in CASES}   # --quick: a smoke run on a few prompts

COLUMNS = ["case", "examples", "one/pass cpu s", "stack cpu s", "invokes cpu s", "batched cpu s", "speed-up (cpu)",
           "speed-up (wall)", "per step (cpu)", "target", "ok", "load"]


def summary_row(result: dict) -> list[str]:
    med = result["median_s"]
    target = result["target"]
    ok = "-" if target is None else ("yes" if result["meets_target"] else "NO")
    load = max(result["loadavg_before"][0], result["loadavg_after"][0])
    steps = " ".join(f"{g.split()[0][0]}{g.split()[1][0]}:{r:.1f}" for g, r in result["ratio_per_step_cpu"].items())
    cell = lambda v: f"{med[v]['cpu']:.2f}" if v in med else "-"  # noqa: E731
    return [result["name"], str(result["setup"]["examples"]), cell("one_per_pass"), cell("stack"), cell("invokes"),
            cell("batched"), f"{result['ratio']:.2f}", f"{result['ratio_wall']:.2f}", steps,
            "-" if target is None else f">= {target}", ok, f"{load:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="planted:positional")
    parser.add_argument("--n", type=int, default=100, help="(original, noise) pairs before keeping the correct ones")
    parser.add_argument("--n-boxes", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run("path_patching", args.model, args.n, args.n_boxes, repeats=args.repeats, threads=args.threads or None)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
