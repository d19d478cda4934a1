"""Peak memory of one DCM step against the same step written with plain PyTorch hooks, and how it grows with the
number of masked sites.

Each measurement runs in a fresh process (multiprocessing "spawn", one task per process), so one side's freed
memory or allocator state cannot be charged to the other:

1. build bench.dcm_step's setup (a random Llama, entity-tracking prompts, every head and MLP at the given
   positions; its plain side is a second copy of the model nnsight never wrapped) and take one warm-up step
   (Adam's state, nnsight's source caches);
2. reset the kernel's peak-RSS mark (`/proc/self/clear_refs` 5), read the resident set (VmRSS): the base;
3. one more step; the peak (VmHWM) minus the base is the step's **increment**, the memory the step itself needed.

Sides: `nnsight` (lib.mask_intervention.dcm_step, the library's step), `plain` (the same blend with forward
hooks: bench.plain_hooks, the baseline of bench/dcm_step.py) and `forward` (a plain forward of the same batch
without gradient: the activations any run holds, for scale). The ratio is nnsight / plain of the increments at
the largest number of sites (goal <= 1.2). The base includes both model copies and is the same for every side.
glibc's mmap threshold is fixed at 64 KiB in the children (MALLOC_MMAP_THRESHOLD_), so every freed tensor leaves
the resident set at once instead of staying in the heap, where it would hide in the base. On a GPU the same
comparison is torch.cuda.max_memory_allocated (bench/gpu.py).

    python -m bench.run_all --only memory
    python -m bench.memory --positions last last,query_label
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.common import alternating, footer, header, load, set_threads

log = logging.getLogger(__name__)

NAME = "memory"
SIDES = ("nnsight", "plain", "forward")
POSITIONS = (("last",), ("last", "query_label", "object_0", "label_0"))
MODEL = {"n_layers": 6, "n_heads": 8, "d_model": 384, "batch_size": 16, "n_boxes": 7}
TARGET = 1.2
MMAP_THRESHOLD = str(64 * 1024)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Set this process's peak-RSS mark (VmHWM) to its current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_one(side: str, positions: Sequence[str], model: dict, threads: int | None) -> dict:
    """In a fresh process: the base resident set and the peak during one step of `side` (KiB)."""
    from bench import dcm_step, plain_hooks

    set_threads(threads)
    setup = dcm_step.build(positions=tuple(positions), **model)
    if side == "forward":
        batch = setup.prepared[0].original

        def step():
            with torch.no_grad():
                plain_hooks.blended_logits(setup.plain, setup.handle.arch, batch, [], torch.ones(0), {}, {})
    else:
        step = dcm_step.Trainer(setup, use_nnsight=side == "nnsight").step
    step()
    gc.collect()
    _reset_peak()
    base = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    return {"side": side, "sites": len(setup.sites), "base_kib": base, "peak_kib": peak,
            "increment_kib": peak - base, "setup": setup.description}


def run(name: str = NAME, positions: Sequence[Sequence[str]] = POSITIONS, repeats: int = 1,
        model: dict | None = None, threads: int | None = 1) -> dict:
    """Every (side, positions) `repeats` times, each in its own process, sides alternating; medians of the
    increments.

    Returns:
        the record: per number of sites each side's median increment (MiB), the nnsight / plain ratio, and
        `ratio` = that ratio at the most sites (goal: <= TARGET).
    """
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("bench.memory reads the peak resident set from /proc (Linux only)")
    record = header(name, "peak memory of one DCM step: nnsight against plain hooks, by number of sites")
    model = {**MODEL, **(model or {})}
    context = multiprocessing.get_context("spawn")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD   # inherited by the children
    samples: dict[int, dict[str, list[dict]]] = {}
    jobs = [(i, tuple(p)) for p in positions for i in range(repeats)]
    try:
        for i, where in tqdm(jobs, desc=name):
            for side in alternating(i, SIDES):
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                    result = pool.submit(measure_one, side, where, model, threads).result()
                samples.setdefault(result["sites"], {}).setdefault(side, []).append(result)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    rows = []
    for n_sites, by_side in sorted(samples.items()):
        mib = {side: sorted(r["increment_kib"] for r in runs)[len(runs) // 2] / 1024 for side, runs in by_side.items()}
        rows.append({"sites": n_sites, "increment_mib": mib, "base_mib": by_side["nnsight"][0]["base_kib"] / 1024,
                     "nnsight_over_plain": mib["nnsight"] / mib["plain"],
                     "all_kib": {side: [r["increment_kib"] for r in runs] for side, runs in by_side.items()}})
    ratio = rows[-1]["nnsight_over_plain"]
    return footer({**record, "setup": next(iter(samples.values()))["nnsight"][0]["setup"] | {"model": model},
                   "config": {"repeats": repeats, "positions": [list(p) for p in positions],
                              "torch_threads": threads, "malloc_mmap_threshold": MMAP_THRESHOLD},
                   "per_sites": rows, "ratio": ratio, "ratio_basis": "median step increment nnsight / plain at "
                   "the most sites", "target": TARGET, "meets_target": ratio <= TARGET})


CASES = {NAME: {}}
QUICK = {NAME: {"positions": (("last",), ("last", "query_label")), "repeats": 1,
                "model": {"n_layers": 2, "n_heads": 4, "d_model": 64, "batch_size": 4, "n_boxes": 3}}}

COLUMNS = ["case", "sites", "step increment MiB nnsight / plain / forward", "ratio", "target", "ok", "load"]


def summary_row(result: dict) -> list[str]:
    rows = result["per_sites"]
    cells = "; ".join(f"{r['sites']}: " + " / ".join(f"{r['increment_mib'][s]:.1f}" for s in SIDES) for r in rows)
    return [result["name"], ", ".join(str(r["sites"]) for r in rows), cells, f"{result['ratio']:.2f}",
            f"<= {result['target']}", "yes" if result["meets_target"] else "NO", f"{load(result):.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", nargs="+", default=[",".join(p) for p in POSITIONS],
                        help="comma-separated position sets, one measurement each")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(run(NAME, [p.split(",") for p in args.positions], args.repeats), indent=1))


if __name__ == "__main__":
    main()
