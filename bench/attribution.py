"""A full attribution map (every head and MLP at 1-3 positions) against forward passes, and how well its ranking
agrees with activation patching on the built-in models.

Timing (CASES, `make bench`): one batch, `lib.attribution.attribution_scan` over every head and MLP at k = 1, 2,
3 named positions (156 k sites on a 12 x 12 model), against one plain forward pass of the same batch through the
library (`lib.patching.clean_logits`, a no-grad trace: what patching_scan runs per site). The figure is
attribution time / forward time, in forward-pass equivalents (issue 13: "about three"). The activation-patching
scan of the same sites needs 1 + 156 k forward passes; on the narrow case it is timed too.

Fidelity (`python -m bench.attribution --fidelity`, not timed): Spearman's rank correlation between attribution
and the patching scan over every head at the three task positions, per built-in model, desideratum and metric,
raw and with round-off ties (rank_correlation's floor=1e-4); written to bench/results/attribution_fidelity.json.

    python -m bench.attribution                 # the timing cases
    python -m bench.attribution --fidelity      # the correlations
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lib.attribution import attribution_scan, rank_correlation
from lib.builtin.random_models import random_model, task_tokenizer
from lib.core.components import all_components
from lib.data_gen import encode_pairs, entity_triples
from lib.evaluation import scores
from lib.models import load_model
from lib.patching import clean_logits, patching_scan, sites_at
from lib.scores import logit_diff, target_logit, target_prob

log = logging.getLogger(__name__)

NAME = "attribution_map"
POSITIONS = ("last", "query_label", "prev_query_label")
RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(name: str = NAME, repeats: int = 5, warmup: int = 1, threads: int | None = 1, batch_size: int = 16,
        n_boxes: int = 7, n_layers: int = 12, n_heads: int = 12, d_model: int = 768, time_scan: bool = False,
        seed: int = 0) -> dict:
    """Measure; returns the record (every repeat's times, medians, forward-pass equivalents per k positions).

    Clock and threads as bench/dcm_step.py (median process CPU time, one torch thread: the machine is shared).
    time_scan: also time patching_scan over the same sites (a forward per site; only sensible on small models).
    """
    load_before = os.getloadavg()
    if threads is not None:
        torch.set_num_threads(threads)
    tok = task_tokenizer()
    handle = load_model(random_model("llama", vocab_size=len(tok), n_layers=n_layers, n_heads=n_heads,
                                     d_model=d_model, seed=seed), tokenizer=tok)
    batch = encode_pairs(entity_triples("object", batch_size, n_boxes=n_boxes, seed=seed, tokenizer=tok), tok)
    components = all_components(handle.arch)
    forward = lambda: clean_logits(handle, batch.original)  # noqa: E731
    for _ in range(warmup):
        forward()
    per_k = {}
    for k in range(1, len(POSITIONS) + 1):
        sites = [s for p in POSITIONS[:k] for s in sites_at(components, p)]
        attribute = lambda sites=sites: attribution_scan(handle, [batch], sites, progress=False)  # noqa: E731
        for _ in range(warmup):
            attribute()
        times = {"attribution": {"wall": [], "cpu": []}, "forward": {"wall": [], "cpu": []}}
        for i in tqdm(range(repeats), desc=f"{name} k={k}"):
            order = [("attribution", attribute), ("forward", forward)]
            for what, fn in (order if i % 2 == 0 else order[::-1]):
                wall, cpu = _timed(fn)
                times[what]["wall"].append(wall)
                times[what]["cpu"].append(cpu)
        med = {what: {c: statistics.median(v) for c, v in t.items()} for what, t in times.items()}
        entry = {"n_sites": len(sites), "times_s": times, "median_s": med,
                 "forward_equivalents": med["attribution"]["cpu"] / med["forward"]["cpu"],
                 "forward_equivalents_wall": med["attribution"]["wall"] / med["forward"]["wall"],
                 "patching_scan_forward_passes": 1 + len(sites)}
        if time_scan:
            wall, cpu = _timed(lambda: patching_scan(handle, [batch], sites, metric=target_logit, progress=False))
            entry["patching_scan_s"] = {"wall": wall, "cpu": cpu}
            entry["speedup_cpu"] = cpu / med["attribution"]["cpu"]
        per_k[k] = entry
    n_params = sum(p.numel() for p in handle.lm._module.parameters())
    return {
        "name": name,
        "what": "attribution_scan of every head and MLP at k positions (one batch) vs one forward pass",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "setup": {"model": f"random llama, {n_layers} layers, {n_heads} heads, d_model {d_model}, "
                           f"{n_params / 1e6:.1f}M parameters",
                  "batch": f"{batch_size} entity prompts ({n_boxes} boxes), {batch.original.width} tokens",
                  "positions": list(POSITIONS), "metric": "target_logit"},
        "config": {"repeats": repeats, "warmup": warmup, "torch_threads": torch.get_num_threads()},
        "per_positions": per_k,
        "ratio": max(e["forward_equivalents"] for e in per_k.values()),
        "ratio_basis": "attribution / forward, median process CPU time, worst of k = 1..3 positions",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


CASES = {
    # GPT-2-small size, as bench/dcm_step.py; 2 repeats keep `make bench` within 10 minutes (the run of
    # 2026-12-02 in BENCHMARKS.md had 5: medians 3.00 / 2.77 / 3.08)
    NAME: {"repeats": 2},
    # small; `--fidelity`-style scan timing by hand: python -m bench.attribution (time_scan=True)
    "attribution_map_narrow": {"d_model": 48, "repeats": 5},
}

TINY = {"n_layers": 2, "n_heads": 2, "d_model": 32, "batch_size": 4, "n_boxes": 3, "repeats": 1}
QUICK = {NAME: TINY, "attribution_map_narrow": TINY}   # --quick: a smoke run on a tiny model

COLUMNS = ["case", "forward cpu s", "attr cpu s (1/2/3 pos)", "forward equivalents (1/2/3 pos)",
           "patching scan forwards (3 pos)", "scan / attribution (3 pos)", "load"]


def summary_row(result: dict) -> list[str]:
    per = result["per_positions"]
    entries = [per[k] for k in sorted(per, key=int)]
    speedup = entries[-1].get("speedup_cpu")
    load = max(result["loadavg_before"][0], result["loadavg_after"][0])
    return [result["name"], f"{entries[0]['median_s']['forward']['cpu']:.3f}",
            " / ".join(f"{e['median_s']['attribution']['cpu']:.3f}" for e in entries),
            " / ".join(f"{e['forward_equivalents']:.2f}" for e in entries),
            str(entries[-1]["patching_scan_forward_passes"]),
            "-" if speedup is None else f"{speedup:.0f}x", f"{load:.1f}"]


# ---- fidelity: rank agreement with activation patching -----------------------------------------------------------

FIDELITY_MODELS = ("planted:strong", "planted:positional", "toy:entity-base", "toy:entity-ft")


def fidelity(models=FIDELITY_MODELS, n: int = 64, n_boxes: int = 5, seed: int = 1, threads: int | None = 1) -> dict:
    """Spearman between attribution_scan and patching_scan (minus the clean score) over every head at the three
    task positions, per model, desideratum and metric; raw and with values below 1e-4 of the largest as ties."""
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for name in models:
        handle = load_model(name)
        sites = [s for p in POSITIONS for s in sites_at(all_components(handle.arch, mlps=False), p)]
        for desideratum in ("object", "label", "position"):
            batch = encode_pairs(entity_triples(desideratum, n, n_boxes=n_boxes, seed=seed, tokenizer=handle.tokenizer),
                                 handle.tokenizer)
            for metric in (target_logit, logit_diff, target_prob):
                t0 = time.process_time()
                estimate = attribution_scan(handle, [batch], sites, metric=metric, progress=False)
                t_attr = time.process_time() - t0
                t0 = time.process_time()
                exact = (patching_scan(handle, [batch], sites, metric=metric, progress=False)
                         - scores(handle, [batch], metric, progress=False).mean())
                t_scan = time.process_time() - t0
                top = lambda v: str(sites[int(v.argmax())])  # noqa: E731
                rows.append({"model": name, "desideratum": desideratum, "metric": metric.__name__, "n_sites": len(sites),
                             "spearman": rank_correlation(estimate, exact),
                             "spearman_ties_1e-4": rank_correlation(estimate, exact, floor=1e-4),
                             "top_attribution": top(estimate), "top_patching": top(exact),
                             "cpu_s_attribution": t_attr, "cpu_s_patching_scan": t_scan})
                log.info("%s", rows[-1])
    return {"what": "Spearman(attribution, activation patching) over every head at " + ", ".join(POSITIONS),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "config": {"n_triples": n, "n_boxes": n_boxes, "seed": seed},
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fidelity", action="store_true", help="measure rank agreement instead of time")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (median taken)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.fidelity:
        result = fidelity()
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "attribution_fidelity.json").write_text(json.dumps(result, indent=1))
        for r in result["rows"]:
            print(f"{r['model']:20s} {r['desideratum']:9s} {r['metric']:13s} {r['spearman']:6.2f} "
                  f"{r['spearman_ties_1e-4']:6.2f}  {r['top_attribution']:22s} {r['top_patching']}")
        return
    print(json.dumps(run(NAME, repeats=args.repeats), indent=1))


if __name__ == "__main__":
    main()
