"""What it costs to rank every head and MLP for one desideratum: brute-force activation patching against DCM,
attribution patching and --rank-first DCM, on random Llamas of growing size; and how well each ranking agrees with
brute force on the planted models.

The four methods, each given the same desideratum's triples (Object; the same `n_train` training triples for
all, plus DCM's `n_val` validation triples), every head and MLP at the last position, metric / loss the target
logit:

- brute force: `lib.patching.patching_scan` (one patched forward pass per component and batch, after one
  alternate run) minus the clean score (`lib.evaluation.scores`, one pass per batch): the exact effects.
- DCM: `lib.mask_intervention.train_mask` with `DCMConfig()` (2 epochs, batch 32, Adam lr 0.1, L1 lambda 0.01,
  init half, validation once per epoch, pruning); the ranking is the patched amount 1 - w of the final weights.
- attribution: `lib.attribution.attribution_scan` (one alternate run, one forward and backward per batch).
- rank-first DCM: `lib.attribution.rank_sites` keeps the top K by |score|, then train_mask on those K; the sites
  left out score 0 (never patched), the kept ones 1 - w.

Cost: each method's median process CPU time over `repeats` runs, in **forward-pass equivalents**: divided by
the median time of one forward pass of one batch (`lib.patching.clean_logits`, `batch_size` prompts) on the same
model and clock, measured between the methods' runs; the order of the methods alternates between repeats (brute
force, hundreds of passes itself, runs in the first repeat only). The
number of traces each method opened (forward or forward+backward, counted on the handle) is recorded beside it.

Extrapolation to Llama-7B's (32 x 32 heads + 32 MLPs = 1,056 components) and LLaMA-13B's (40 x 40 + 40 = 1,640)
shapes: each method's cost is affine in the number of components N by construction (brute force: one pass per
component; DCM: a fixed number of steps plus one validation pass per patched site it prunes; attribution: a fixed
number of traces plus a dot product per site), so a least-squares line a + b N through the measured sizes is
evaluated there. The measured models are small (d_model 8 x heads), where a pass is cheap and fixed per-trace
costs weigh more than on a 7B model; bench/BENCHMARKS.md discusses what that changes.

Agreement (`planted:strong`, `planted:positional`, each desideratum with a planted head at the last position):
Spearman of each method's scores with brute force's effects, with `rank_correlation`'s floor 1e-4 (values
below 1e-4 of a vector's largest count as ties: on the planted models most sites do nothing and their patching
effects are float32 round-off), and whether the planted head ranks first.

    python -m bench.run_all --only localisation
    python -m bench.localisation --sizes 4x4,8x8
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.common import RESULTS, TraceCounter, alternating, footer, header, load, medians, set_threads, timed
from lib import report
from lib.attribution import attribution_scan, rank_correlation, rank_sites
from lib.builtin import planted
from lib.builtin.random_models import random_model, task_tokenizer
from lib.core.components import all_components
from lib.data_gen import entity_triples, iter_pair_batches
from lib.evaluation import scores
from lib.mask_intervention import DCMConfig, train_mask
from lib.models import ModelHandle, load_model
from lib.patching import clean_logits, patching_scan, sites_at
from lib.scores import target_logit
from lib.types import Component, PairBatch, Site

log = logging.getLogger(__name__)

NAME = "localisation"
METHODS = ("brute_force", "dcm", "attribution", "rank_first_dcm")
SIZES = ((4, 4), (8, 8), (16, 12), (24, 16))        # layers x heads
HEAD_DIM = 8
SHAPES = {"Llama-7B": (32, 32), "LLaMA-13B": (40, 40)}   # layers x heads: N = L * H + L
TARGET = 10.0                                        # brute force / method at LLaMA-13B's shape, at least
PLANTED = {"planted:strong": ("object", "label"), "planted:positional": ("object", "position")}
DESIDERATUM = "object"
FLOOR = 1e-4


def n_components(n_layers: int, n_heads: int) -> int:
    """Every head and MLP of a model of that shape."""
    return n_layers * n_heads + n_layers


# ---- the methods ------------------------------------------------------------------------------------------------


class Data:
    """One desideratum's triples: `train` (every method) and `val` (DCM's validation), and train's PairBatches."""

    def __init__(self, handle: ModelHandle, desideratum: str, n_train: int, n_val: int, n_boxes: int,
                 batch_size: int, seed: int):
        tok = handle.tokenizer
        triples = entity_triples(desideratum, n_train + n_val, n_boxes=n_boxes, seed=seed, tokenizer=tok)
        self.desideratum = desideratum
        self.train, self.val = triples[:n_train], triples[n_train:]
        self.batches: list[PairBatch] = list(iter_pair_batches(self.train, tok, batch_size))


def rank_first_k(k: int, n: int) -> int:
    """K for --rank-first DCM: `k`, but at most a quarter of the sites (else the ranking would cut nothing)."""
    return max(1, min(k, n // 4))


def methods(handle: ModelHandle, data: Data, sites: list[Site], k: int) -> dict[str, Callable[[], torch.Tensor]]:
    """{method: () -> (len(sites),) scores, higher = more important for the desideratum}."""
    config = DCMConfig()

    def brute_force():
        clean = scores(handle, data.batches, target_logit, progress=False).mean()
        return patching_scan(handle, data.batches, sites, metric=target_logit, progress=False) - clean

    def dcm_scores(kept: list[Site]) -> torch.Tensor:
        result = train_mask(handle, {data.desideratum: data.train}, {data.desideratum: data.val}, kept, config,
                            progress=False)
        patched = dict(zip(kept, (1 - torch.tensor(result.weights)).tolist()))
        return torch.tensor([patched.get(s, 0.0) for s in sites])

    def rank_first():
        ranked = rank_sites(handle, data.batches, sites=sites, k=rank_first_k(k, len(sites)), metric=target_logit,
                            progress=False)
        return dcm_scores([s for s, _ in ranked])

    return {"brute_force": brute_force, "dcm": lambda: dcm_scores(sites),
            "attribution": lambda: attribution_scan(handle, data.batches, sites, metric=target_logit, progress=False),
            "rank_first_dcm": rank_first}


# ---- cost on random models --------------------------------------------------------------------------------------


def random_handle(n_layers: int, n_heads: int, seed: int) -> ModelHandle:
    tok = task_tokenizer()
    return load_model(random_model("llama", vocab_size=len(tok), n_layers=n_layers, n_heads=n_heads,
                                   d_model=HEAD_DIM * n_heads, seed=seed), tokenizer=tok)


def measure_size(n_layers: int, n_heads: int, repeats: int, k: int, data_kwargs: dict, seed: int) -> dict:
    """Every method's time and traces on one random model, with the forward pass timed beside each.

    Brute force runs in the first repeat only: it is itself N + 2 passes per batch (hundreds on the larger
    models, a minute of CPU), so one run already averages over many passes; the other methods are repeated
    and their medians taken.
    """
    handle = random_handle(n_layers, n_heads, seed)
    counter = TraceCounter(handle)
    data = Data(handle, DESIDERATUM, seed=seed, **data_kwargs)
    sites = sites_at(all_components(handle.arch))
    runs = methods(handle, data, sites, k)
    forward = lambda: clean_logits(handle, data.batches[0].original)  # noqa: E731
    for method, fn in (("forward", forward), *runs.items()):  # warm-up: first-call costs out of the timing
        if method != "brute_force":                             # (its passes are the forward's, warmed above)
            fn()
    times = {m: {"wall": [], "cpu": []} for m in ("forward", *runs)}
    traces, patched = {}, {}
    for i in range(repeats):
        for method in alternating(i, [m for m in runs if i == 0 or m != "brute_force"]):
            for what, fn in (("forward", forward), (method, runs[method])):
                before = counter.count
                wall, cpu, result = timed(fn)
                times[what]["wall"].append(wall)
                times[what]["cpu"].append(cpu)
                if what != "forward":
                    traces[what] = counter.count - before
                    patched[what] = int((result > 0.5).sum())
    med = medians(times)
    unit = med["forward"]
    log.info("%dx%d (%d components): %s forward-pass equivalents", n_layers, n_heads, len(sites),
             {m: round(med[m]["cpu"] / unit["cpu"], 1) for m in runs})
    return {"layers": n_layers, "heads": n_heads, "d_model": handle.arch.d_model, "components": len(sites),
            "rank_first_k": rank_first_k(k, len(sites)), "batches": len(data.batches),
            "tokens": data.batches[0].original.width, "median_s": med, "times_s": times, "traces": traces,
            "sites_over_half_patched": {m: patched[m] for m in ("dcm", "rank_first_dcm")},
            "forward_equivalents": {m: med[m]["cpu"] / unit["cpu"] for m in runs},
            "forward_equivalents_wall": {m: med[m]["wall"] / unit["wall"] for m in runs}}


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x."""
    b, a = np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)
    return float(a), float(b)


def extrapolate(per_size: list[dict]) -> dict:
    """Each method's forward-pass equivalents and traces at SHAPES, from a line through the measured sizes."""
    n = [s["components"] for s in per_size]
    out = {}
    for shape, (layers, heads) in SHAPES.items():
        target = n_components(layers, heads)
        row = {"components": target}
        for method in METHODS:
            a, b = fit_line(n, [s["forward_equivalents"][method] for s in per_size])
            ta, tb = fit_line(n, [s["traces"][method] for s in per_size])
            row[method] = {"forward_equivalents": a + b * target, "fit": {"a": a, "b_per_component": b},
                           "traces": ta + tb * target}
        row["brute_force_over"] = {m: row["brute_force"]["forward_equivalents"] / row[m]["forward_equivalents"]
                                   for m in METHODS if m != "brute_force"}
        out[shape] = row
    return out


# ---- agreement on the planted models ------------------------------------------------------------------------------


def agreement(k: int, data_kwargs: dict, seed: int) -> list[dict]:
    """Per planted model and desideratum: each method's Spearman with brute force, and its top site."""
    rows = []
    for name, desiderata in PLANTED.items():
        handle = load_model(name)
        sites = sites_at(all_components(handle.arch))
        truth = planted.ground_truth(name.split(":", 1)[1])["desiderata"]
        for desideratum in desiderata:
            data = Data(handle, desideratum, seed=seed, **data_kwargs)
            results = {m: fn() for m, fn in methods(handle, data, sites, k).items()}
            expected = {Site(Component.parse(c), "last") for c in truth[desideratum]}
            row = {"model": name, "desideratum": desideratum, "planted": sorted(map(str, expected)),
                   "n_sites": len(sites), "rank_first_k": rank_first_k(k, len(sites))}
            for method, values in results.items():
                top = sites[int(values.argmax())]
                row[method] = {"top": str(top), "planted_first": top in expected,
                               "spearman_vs_brute_force": rank_correlation(values, results["brute_force"],
                                                                           floor=FLOOR),
                               "scores": [round(float(v), 6) for v in values]}
            rows.append(row)
            log.info("%s %s: %s", name, desideratum,
                     {m: (row[m]["top"], round(row[m]["spearman_vs_brute_force"], 3)) for m in METHODS})
    return rows


# ---- the case -----------------------------------------------------------------------------------------------------


def run(name: str = NAME, sizes: Sequence[tuple[int, int]] = SIZES, repeats: int = 3, k: int = 16,
        n_train: int = 8, n_val: int = 16, n_boxes: int = 3, batch_size: int = 8, seed: int = 0,
        threads: int | None = 1, out: Path = RESULTS) -> dict:
    """Measure the cost on each size, extrapolate, measure agreement on the planted models; plot into `out`.

    Returns:
        the record: per size every method's medians, forward-pass equivalents and traces; the extrapolation to
        SHAPES with brute force's multiple of each method; the agreement rows; `ratio` = the smallest of brute
        force / method at LLaMA-13B's shape (goal: >= TARGET).
    """
    record = header(name, "rank every head and MLP for one desideratum: brute force, DCM, attribution, "
                          "rank-first DCM")
    set_threads(threads)
    data_kwargs = {"n_train": n_train, "n_val": n_val, "n_boxes": n_boxes, "batch_size": batch_size}
    per_size = [measure_size(layers, heads, repeats, k, data_kwargs, seed)
                for layers, heads in tqdm(sizes, desc=name)]
    shapes = extrapolate(per_size) if len(per_size) > 1 else {}
    rows = agreement(k, data_kwargs, seed)
    x = [s["components"] for s in per_size]
    plot = report.line_plot(Path(out) / f"{name}.png", x,
                            {m: [s["forward_equivalents"][m] for s in per_size] for m in METHODS},
                            f"ranking every head and MLP ({n_train} triples, batch {batch_size})",
                            "components (heads + MLPs)", "forward-pass equivalents (CPU time)")
    thirteen = shapes.get("LLaMA-13B", {}).get("brute_force_over", {})
    equal_quality = all(r[m]["planted_first"] for r in rows for m in METHODS)
    return footer({
        **record,
        "setup": {"models": f"random llama, d_model {HEAD_DIM} x heads, MLP 4 x d_model, vocab "
                            f"{len(task_tokenizer())} (word-level)",
                  "desideratum": DESIDERATUM, "sites": "every head and MLP at the last position",
                  "metric": "target_logit", "dcm": "DCMConfig() defaults", **data_kwargs},
        "config": {"repeats": repeats, "rank_first_k": k, "seed": seed, "torch_threads": torch.get_num_threads(),
                   "sizes": [list(s) for s in sizes]},
        "per_size": per_size,
        "extrapolated": shapes,
        "agreement": rows,
        "equal_quality": equal_quality,
        "plot": str(plot),
        "ratio": min(thirteen.values()) if thirteen else None,
        "ratio_basis": "smallest of brute force / method, forward-pass equivalents at LLaMA-13B's shape (fit)",
        "target": TARGET,
        "meets_target": bool(thirteen) and min(thirteen.values()) >= TARGET and equal_quality,
    })


CASES = {NAME: {}}
QUICK = {NAME: {"sizes": ((2, 2), (3, 4)), "repeats": 1, "n_train": 8, "n_val": 8, "batch_size": 8}}

COLUMNS = ["case", "components", "forward-pass equivalents: brute / dcm / attribution / rank-first",
           "13B: brute / dcm / attr / rank-first", "planted first (all)", "spearman min", "load"]


def summary_row(result: dict) -> list[str]:
    fe = lambda d: " / ".join(f"{d[m]:.1f}" for m in METHODS)  # noqa: E731
    sizes = "; ".join(f"{s['components']}: {fe(s['forward_equivalents'])}" for s in result["per_size"])
    thirteen = result["extrapolated"].get("LLaMA-13B")
    far = fe({m: thirteen[m]["forward_equivalents"] for m in METHODS}) if thirteen else "-"
    rho = min(r[m]["spearman_vs_brute_force"] for r in result["agreement"] for m in METHODS if m != "brute_force")
    return [result["name"], ", ".join(str(s["components"]) for s in result["per_size"]), sizes, far,
            "yes" if result["equal_quality"] else "NO", f"{rho:.2f}", f"{load(result):.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(f"{a}x{b}" for a, b in SIZES), help="layers x heads, e.g. 4x4,8x8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(json.dumps(run(NAME, sizes, args.repeats), indent=1, default=str))


if __name__ == "__main__":
    main()
