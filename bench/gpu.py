"""The GPU figures, as one short script for a machine with a CUDA device (`python -m bench.gpu`, a few minutes).

1. **DCM step on the GPU**: the library's step (lib.mask_intervention.dcm_step) against the same step with plain
   hooks (bench/dcm_step.py's baseline), GPT-2-small size, both models on the GPU; wall time with
   `torch.cuda.synchronize()` around each step (CPU time says nothing about GPU work), sides alternating,
   medians. Target <= 1.10.
2. **Memory on the GPU**: `torch.cuda.max_memory_allocated` during one step of each side, above what was
   allocated before it (bench/memory.py does the same on the CPU with the peak resident set). Target <= 1.2.
3. **Sharded**: the same saved model loaded with `device_map="auto"` and a GPU memory cap that forces part of it
   to CPU offload (accelerate's hooks move activations between the devices), against one device: the
   patching scan of every head and MLP and a short DCM training run must give the same numbers (1e-4).
4. **Speed-up over the CPU**: one DCM training run (DCMConfig() defaults, 64 triples) on the GPU against the
   same run on the CPU with every core.

Without a CUDA device it runs as a dry run on the CPU on a tiny model (checks the script, measures nothing);
the record says which. Writes bench/results/gpu.json.

    python -m bench.gpu                 # on the GPU machine
    python -m bench.gpu --dry-run       # tiny, anywhere
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import dcm_step
from bench.common import RESULTS, alternating, footer, header
from lib.builtin.random_models import random_model, task_tokenizer
from lib.core.components import all_components
from lib.data_gen import entity_triples, iter_pair_batches
from lib.mask_intervention import DCMConfig, train_mask
from lib.models import load_model
from lib.patching import patching_scan, sites_at
from lib.scores import target_logit

log = logging.getLogger(__name__)

FULL = {"n_layers": 12, "n_heads": 12, "d_model": 768}
TINY = {"n_layers": 2, "n_heads": 2, "d_model": 32}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_ratio_and_memory(device: str, sizes: dict, repeats: int) -> dict:
    """Sections 1 and 2: median wall time per step and peak memory above the start, nnsight against plain."""
    setup = dcm_step.build(device=device, **sizes)
    check = dcm_step.check_equal_work(setup)
    trainers = {"nnsight": dcm_step.Trainer(setup, True), "plain": dcm_step.Trainer(setup, False)}
    for t in trainers.values():
        t.step()
    times: dict[str, list[float]] = {side: [] for side in trainers}
    memory: dict[str, int] = {}
    for i in range(repeats):
        for side in alternating(i, list(trainers)):
            _sync(device)
            if device.startswith("cuda") and side not in memory:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            started = time.perf_counter()
            trainers[side].step()
            _sync(device)
            times[side].append(time.perf_counter() - started)
            if device.startswith("cuda") and side not in memory:
                memory[side] = torch.cuda.max_memory_allocated() - before
    med = {side: statistics.median(v) for side, v in times.items()}
    return {"setup": setup.description, "equal_work": check, "median_wall_s": med, "times_s": times,
            "step_ratio": med["nnsight"] / med["plain"], "step_target": 1.10,
            "peak_bytes_above_start": memory or None,
            "memory_ratio": memory["nnsight"] / memory["plain"] if memory else None, "memory_target": 1.2}


def _saved_model(sizes: dict, where: Path) -> Path:
    tok = task_tokenizer()
    random_model("llama", vocab_size=len(tok), seed=0, **sizes).save_pretrained(where)
    tok.save_pretrained(where)
    return where


def sharded_equals_one_device(device: str, sizes: dict, gpu_cap: str) -> dict:
    """Section 3: scan and DCM with part of the model offloaded to the CPU, against the model on one device."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        path = _saved_model(sizes, Path(tmp) / "model")
        one = load_model(path, device_map={"": device})
        split_map = "auto" if device.startswith("cuda") else None
        kwargs = {"max_memory": {0: gpu_cap, "cpu": "64GiB"}} if split_map else {}
        split = load_model(path, device_map=split_map, **kwargs) if split_map else load_model(path)
        placement = sorted({str(d) for d in getattr(split.lm._module, "hf_device_map", {"": "cpu"}).values()})
        tok = one.tokenizer
        triples = entity_triples("object", 48, n_boxes=5, seed=0, tokenizer=tok)
        batches = list(iter_pair_batches(triples[:16], tok, 16))
        sites = sites_at(all_components(one.arch))
        scans = [patching_scan(h, batches, sites, metric=target_logit, progress=False) for h in (one, split)]
        config = DCMConfig(epochs=1, prune=False)
        dcms = [train_mask(h, {"object": triples[:32]}, {"object": triples[32:]}, sites, config, progress=False)
                for h in (one, split)]
    scan_diff = float((scans[0] - scans[1]).abs().max())
    weight_diff = max(abs(a - b) for a, b in zip(dcms[0].weights, dcms[1].weights))
    return {"placement": placement, "split_across_devices": len(placement) > 1, "scan_max_abs_diff": scan_diff,
            "dcm_weights_max_abs_diff": weight_diff, "equal": scan_diff < 1e-4 and weight_diff < 1e-4}


def speedup_over_cpu(device: str, sizes: dict, n: int) -> dict:
    """Section 4: one DCM training run on `device` and on the CPU (all cores)."""
    torch.set_num_threads(os.cpu_count() or 1)
    tok = task_tokenizer()
    triples = entity_triples("object", n + n // 2, n_boxes=5, seed=0, tokenizer=tok)
    out = {}
    for where in ("cpu", device) if device != "cpu" else ("cpu",):
        handle = load_model(random_model("llama", vocab_size=len(tok), seed=0, **sizes).to(where), tokenizer=tok)
        sites = sites_at(all_components(handle.arch))
        _sync(where)
        started = time.perf_counter()
        train_mask(handle, {"object": triples[:n]}, {"object": triples[n:]}, sites, DCMConfig(), progress=False)
        _sync(where)
        out[where] = time.perf_counter() - started
    return {"dcm_run_wall_s": out, "cpu_threads": torch.get_num_threads(),
            "speedup": out["cpu"] / out[device] if device in out and device != "cpu" else None}


def run(dry_run: bool = False, repeats: int = 12) -> dict:
    """Every section; the record (machine named: GPU model and memory, or "cpu (dry run)")."""
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    sizes = FULL if device == "cuda" else TINY
    record = header("gpu", "DCM step, memory, sharding and speed-up on a GPU")
    gpu = (f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
           if device == "cuda" else "cpu (dry run: no CUDA device, or --dry-run)")
    log.info("device: %s", gpu)
    result = {"device": gpu, "dry_run": device == "cpu",
              "step": step_ratio_and_memory(device, sizes, repeats if device == "cuda" else 2),
              "sharded": sharded_equals_one_device(device, sizes, gpu_cap="120MiB"),
              "speedup": speedup_over_cpu(device, sizes, 64 if device == "cuda" else 8)}
    return footer({**record, **result, "ratio": result["step"]["step_ratio"],
                   "ratio_basis": "median wall time per DCM step, nnsight / plain hooks, on the device"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script runs")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args.dry_run, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("device", "ratio")} | {"memory_ratio": result["step"]["memory_ratio"],
                      "sharded": result["sharded"], "speedup": result["speedup"]}, indent=1, default=str))


if __name__ == "__main__":
    main()
