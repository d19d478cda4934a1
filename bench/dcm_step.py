"""One DCM training step: the library's own step (lib.mask_intervention.dcm_step) against plain PyTorch hooks.

A step is what `lib.mask_intervention._optimise` does per batch, by calling `dcm_step`: the traced forward with
every site blended (`w * v_orig + (1 - w) * v_alt`), the task loss, its backward into the mask, the sparsity
penalty's backward, one Adam update and the clamp to [0, 1]. The baseline does the same arithmetic with the
project's plain-hook reference (bench/plain_hooks.py: one pre-hook per attention output projection, one hook per
MLP) on a second copy of the model with the same weights that nnsight never wrapped. Before timing, both must give
the same loss and gradient, so the ratio compares equal work. Timing alternates the two (A B, then B A, ...) after
a warm-up.

    python -m bench.dcm_step              # or `make bench` for every benchmark
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from bench import plain_hooks
from lib.builtin.random_models import random_model, task_tokenizer
from lib.core.components import all_components
from lib.data_gen import entity_triples
from lib.mask_intervention import DCMConfig, Mask, Prepared, backward_on_batch, dcm_step, prepare_batches
from lib.models import ModelHandle, load_model
from lib.patching import blend_plan, sites_at
from lib.types import Site

log = logging.getLogger(__name__)

NAME = "dcm_step"
TARGET_RATIO = 1.05


@dataclass
class Setup:
    handle: ModelHandle            # nnsight-wrapped model
    plain: torch.nn.Module         # an unwrapped copy with the same weights
    sites: list[Site]
    prepared: Prepared             # the library's batch and cached alternate rows
    plain_layers: dict             # plain_hooks.by_module(): the hooked modules' column owners, built once
    plain_values: dict             # the alternate rows, captured with plain hooks
    config: DCMConfig
    description: dict


def build(batch_size: int = 16, n_boxes: int = 7, n_layers: int = 12, n_heads: int = 12, d_model: int = 768,
          seed: int = 0, positions: Sequence[str] = ("last",), device: str = "cpu") -> Setup:
    """A random Llama of GPT-2-small size, entity-tracking prompts, every head and MLP at each of `positions`
    (the last one by default), both copies on `device` (bench/gpu.py: "cuda")."""
    tok = task_tokenizer()
    sizes = dict(vocab_size=len(tok), n_layers=n_layers, n_heads=n_heads, d_model=d_model, seed=seed)
    handle = load_model(random_model("llama", **sizes).to(device), tokenizer=tok)
    plain = random_model("llama", **sizes).to(device)
    sites = [site for position in positions for site in sites_at(all_components(handle.arch), position)]
    triples = entity_triples("object", batch_size, n_boxes=n_boxes, seed=seed, tokenizer=tok)
    prepared = prepare_batches(handle, triples, sites, batch_size)[0]
    plain_values = plain_hooks.capture(plain, handle.arch, prepared[0].alternate, sites)
    n_params = sum(p.numel() for p in plain.parameters())
    description = {
        "model": f"random llama, {n_layers} layers, {n_heads} heads, d_model {d_model}, vocab {len(tok)} "
                 f"(word-level tokenizer), {n_params / 1e6:.1f}M parameters",
        "batch": f"{batch_size} entity-tracking prompts ({n_boxes} boxes, 'object' desideratum), "
                 f"{prepared[0].original.width} tokens",
        "sites": f"{len(sites)} (every head and MLP at {', '.join(positions)})",
    }
    return Setup(handle, plain, sites, prepared, plain_hooks.by_module(handle.arch, sites), plain_values,
                 DCMConfig(), description)


def plain_loss(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """The target-logit loss, DCMConfig()'s default (the one this benchmark uses)."""
    return -logits[torch.arange(logits.shape[0]), target_ids].mean()


# ---- the two steps --------------------------------------------------------------------------------------------

class Trainer:
    """A mask and its Adam optimizer; `step()` is one DCM update: the library's dcm_step, or the same with hooks."""

    def __init__(self, setup: Setup, use_nnsight: bool, init: str = "random"):
        self.s, self.use_nnsight = setup, use_nnsight
        cfg = setup.config
        self.mask = Mask(len(setup.sites), cfg.parameterization, init, cfg.seed)
        self.optimizer = torch.optim.Adam(self.mask.parameters(), lr=cfg.lr)
        self.plan = blend_plan(setup.handle, setup.sites)

    def loss_and_backward(self) -> float:
        """The forward, loss and backward alone (for the equal-work check)."""
        s, cfg = self.s, self.s.config
        weights = self.mask()
        if self.use_nnsight:
            return backward_on_batch(s.handle, s.prepared, s.sites, weights, cfg.loss, self.plan)
        batch = s.prepared[0]
        logits = plain_hooks.blended_logits(s.plain, s.handle.arch, batch.original, s.sites, weights,
                                            s.plain_values, s.plain_layers)
        loss = plain_loss(logits, batch.target_ids)
        loss.backward()
        return float(loss.detach())

    def step(self) -> float:
        cfg = self.s.config
        if self.use_nnsight:
            losses, _ = dcm_step(self.s.handle, self.mask, self.optimizer, [self.s.prepared], self.s.sites, cfg,
                                 self.plan)
            return next(iter(losses.values()))
        self.optimizer.zero_grad()
        loss = self.loss_and_backward()
        (cfg.lam * self.mask.penalty(cfg.penalty, cfg.eps)).backward()
        self.optimizer.step()
        self.mask.project()
        return loss


def check_equal_work(setup: Setup, atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """Both implementations: same alternate rows, same loss, same gradient (from the same random weights)."""
    ours_rows = setup.prepared[1]
    for key, value in setup.plain_values.items():
        ours = ours_rows[key]
        if not torch.allclose(ours, value, atol=1e-5, rtol=1e-5):
            raise AssertionError(f"alternate rows differ at {key}: max {float((ours - value).abs().max()):.3g}")
    a, b = Trainer(setup, True), Trainer(setup, False)
    for t in (a, b):
        t.optimizer.zero_grad()
    loss_a, loss_b = a.loss_and_backward(), b.loss_and_backward()
    grad_a, grad_b = a.mask.raw.grad, b.mask.raw.grad
    grad_diff = float((grad_a - grad_b).abs().max())
    if abs(loss_a - loss_b) > atol + rtol * abs(loss_b):
        raise AssertionError(f"losses differ: nnsight {loss_a} vs plain {loss_b}")
    if not torch.allclose(grad_a, grad_b, atol=atol, rtol=rtol):
        raise AssertionError(f"gradients differ: max abs difference {grad_diff:.3g}")
    if float(grad_b.abs().max()) < 1e-6:
        raise AssertionError("the gradient is zero: the check would prove nothing")
    return {"loss_nnsight": loss_a, "loss_plain": loss_b, "grad_max_abs_diff": grad_diff,
            "grad_max_abs": float(grad_b.abs().max())}


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(name: str = NAME, repeats: int = 12, warmup: int = 2, threads: int | None = 1,
        target: float | None = TARGET_RATIO, **build_kwargs) -> dict:
    """Measure; returns the result record (every repeat's time, medians, ratios, load, the equality check).

    The headline `ratio` is of the median process CPU time per step (all threads of the process): on cores
    shared with other jobs the wall clock mostly measures the scheduler (with load ~7 on 2 cores a step's wall
    time was about twice its CPU time and varied +-30% between repeats). Wall-clock ratios (of the medians and
    of the fastest repeats) are recorded beside it. threads: torch intra-op threads (None = torch's default);
    one by default, because under such load multi-threaded kernels wait at every barrier for a descheduled
    thread and a step's wall time varied 1-11 s.
    """
    load_before = os.getloadavg()
    if threads is not None:
        torch.set_num_threads(threads)
    setup = build(**build_kwargs)
    check = check_equal_work(setup)
    log.info("%s: equal work: %s", name, check)
    trainers = {"nnsight": Trainer(setup, True), "plain": Trainer(setup, False)}
    for _ in range(warmup):
        for t in trainers.values():
            t.step()
    times = {impl: {"wall": [], "cpu": []} for impl in trainers}
    order = list(trainers)
    for i in tqdm(range(repeats), desc=name):
        for impl in (order if i % 2 == 0 else order[::-1]):
            wall, cpu = _timed(trainers[impl].step)
            times[impl]["wall"].append(wall)
            times[impl]["cpu"].append(cpu)
        log.debug("repeat %d: %s", i + 1, {k: (v["wall"][-1], v["cpu"][-1]) for k, v in times.items()})
    drift = float((trainers["nnsight"].mask.raw - trainers["plain"].mask.raw).detach().abs().max())
    if drift > 1e-4:
        raise AssertionError(f"the two masks diverged by {drift:.3g} over the timed steps: not the same work")
    med = {impl: {k: statistics.median(v) for k, v in t.items()} for impl, t in times.items()}
    ratio = med["nnsight"]["cpu"] / med["plain"]["cpu"]
    return {
        "name": name,
        "what": "one DCM step: blended forward + loss + backward + penalty backward + Adam step + clamp",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "setup": setup.description,
        "config": {"repeats": repeats, "warmup": warmup, "loss": setup.config.loss, "penalty": setup.config.penalty,
                   "lr": setup.config.lr, "mask_init": "random", "torch_threads": torch.get_num_threads(),
                   **build_kwargs},
        "equal_work": {**check, "mask_max_abs_diff_after_all_steps": drift},
        "median_s": med,
        "min_s": {impl: {k: min(v) for k, v in t.items()} for impl, t in times.items()},
        "times_s": times,
        "ratio": ratio,
        "ratio_basis": "median process CPU time per step",
        "ratio_wall_median": med["nnsight"]["wall"] / med["plain"]["wall"],
        "ratio_wall_min": min(times["nnsight"]["wall"]) / min(times["plain"]["wall"]),
        "overhead_cpu_s": med["nnsight"]["cpu"] - med["plain"]["cpu"],
        "target": target,
        "meets_target": None if target is None else ratio <= target,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


# name -> run() arguments; bench.run_all runs each
CASES = {
    # the benchmark: GPT-2-small size (defaults of build())
    # 6 repeats keep `make bench` within 10 minutes (python -m bench.dcm_step --repeats 12 for the longer run)
    NAME: {"repeats": 6, "warmup": 1},
    # the same 156 sites on a narrow model, where compute is small and nnsight's fixed per-step cost shows
    "dcm_step_narrow": {"d_model": 48, "repeats": 30, "warmup": 3, "target": None},
}

# --quick: a smoke run on a tiny model (bench.run_all --quick; tests/integration/test_bench_protocol.py)
TINY = {"n_layers": 2, "n_heads": 2, "d_model": 32, "batch_size": 4, "n_boxes": 3, "repeats": 2, "warmup": 1}
QUICK = {NAME: TINY, "dcm_step_narrow": TINY}

COLUMNS = ["case", "nnsight cpu s", "plain cpu s", "ratio (cpu)", "wall median", "wall min", "target", "ok",
           "load"]


def summary_row(result: dict) -> list[str]:
    med = result["median_s"]
    target = result["target"]
    ok = "-" if target is None else ("yes" if result["meets_target"] else "NO")
    load = max(result["loadavg_before"][0], result["loadavg_after"][0])
    return [result["name"], f"{med['nnsight']['cpu']:.3f}", f"{med['plain']['cpu']:.3f}", f"{result['ratio']:.3f}",
            f"{result['ratio_wall_median']:.3f}", f"{result['ratio_wall_min']:.3f}",
            "-" if target is None else f"<= {target}", ok, f"{load:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12, help="timed steps per implementation (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(run(NAME, args.repeats, args.warmup, args.threads or None), indent=1))


if __name__ == "__main__":
    main()
