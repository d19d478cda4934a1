"""Desiderata-based Component Masking (DCM): learn which components carry a variable, as nnsight traces.

Each site (component at a position) gets a weight w in [0, 1]; on the original prompt its output becomes
`w * v_orig + (1 - w) * v_alt` (lib.patching.write_blends), all sites in one forward pass. A loss pulls the
output toward each desideratum's target; a sparsity penalty on the patched amount (1 - w) keeps the set small.
The whole optimisation runs inside one `handle.session()`, so remotely it is a single NDIF request.
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import nnsight
import torch
from tqdm.auto import tqdm

from lib.data_gen import EncodedBatch, Triple, answer_token_id, encode_batch
from lib.models import ModelHandle
from lib.patching import Activations, Site, blend_plan, check_sites, collect, last_logits, write_blends

log = logging.getLogger(__name__)

LOSSES = ("target_logit", "logit_diff", "cross_entropy")
PENALTIES = ("l1", "l0.5")
PARAMETERIZATIONS = ("clamp", "sigmoid", "hard_concrete")
INITS = ("ones", "half", "random")


@dataclass
class DCMConfig:
    """Training settings. Defaults follow Prakash et al.; Davies et al. used penalty="l0.5", loss="logit_diff"."""

    lam: float = 0.01
    penalty: str = "l1"
    loss: str = "target_logit"
    lr: float = 0.01
    epochs: int = 2
    batch_size: int = 32
    init: str = "ones"
    parameterization: str = "clamp"   # the papers' recipe; "sigmoid" / "hard_concrete" learn where it stalls
    combine: str = "sum"              # "sum" the desiderata's losses each step, or "alternate" step by step
    eval_every: int = 0               # steps between validations of the rounded mask; 0 = once per epoch
    prune: bool = True                # drop patched sites the held-out accuracy does not need
    seed: int = 0
    eps: float = 1e-6                 # keeps the L0.5 gradient finite at w = 1

    def check(self) -> None:
        for name, value, allowed in [
            ("loss", self.loss, LOSSES), ("penalty", self.penalty, PENALTIES),
            ("parameterization", self.parameterization, PARAMETERIZATIONS), ("init", self.init, INITS),
            ("combine", self.combine, ("sum", "alternate")),
        ]:
            if value not in allowed:
                raise ValueError(f"DCMConfig.{name}={value!r}; choose one of {', '.join(allowed)}")


@dataclass
class PreparedBatch:
    """One batch of a desideratum, ready to train on: the alternate's rows are computed once, here."""

    desideratum: str
    original: EncodedBatch
    target_ids: torch.Tensor
    foil_ids: torch.Tensor            # the competing answer for the logit difference
    values: Activations


def prepare_batches(
    handle: ModelHandle, triples: Sequence[Triple], sites: Sequence[Site], batch_size: int
) -> list[PreparedBatch]:
    """Encode triples and run each alternate once (the model is frozen, so its rows never change)."""
    tok = handle.tokenizer
    out = []
    for start in range(0, len(triples), batch_size):
        chunk = triples[start:start + batch_size]
        original = encode_batch([t.original for t in chunk], tok)
        alternate = encode_batch([t.alternate for t in chunk], tok)
        check_sites(handle, sites, original)
        check_sites(handle, sites, alternate)
        targets = torch.tensor([answer_token_id(tok, t.target) for t in chunk])
        foils = torch.tensor([
            answer_token_id(tok, t.original.answer if t.target != t.original.answer else t.alternate.answer)
            for t in chunk
        ])
        out.append(PreparedBatch(chunk[0].desideratum, original, targets, foils, collect(handle, alternate, sites)))
    return out


def task_loss(kind: str, logits: torch.Tensor, target_ids: torch.Tensor, foil_ids: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of: -logit[target] | -(logit[target] - logit[foil]) | cross-entropy."""
    rows = torch.arange(logits.shape[0])
    target = logits[rows, target_ids]
    if kind == "target_logit":
        return -target.mean()
    if kind == "logit_diff":
        return -(target - logits[rows, foil_ids]).mean()
    return torch.nn.functional.cross_entropy(logits.float(), target_ids)


class Mask(torch.nn.Module):
    """Weights w in [0, 1] per site (1 = keep the original output), under one of three parameterisations.

    clamp: w itself, clamped to [0, 1] after each step (the papers). sigmoid: w = sigmoid(theta), never stuck
    at a bound. hard_concrete: stochastic gates on the patched amount 1 - w (Louizos et al. 2018), whose
    expected L0 norm is the penalty; noise lets a site whose gradient vanishes at w = 1 still be tried.
    """

    BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1

    def __init__(self, n: int, parameterization: str = "clamp", init: str = "ones", seed: int = 0):
        torch.nn.Module.__init__(self)  # not super(): NDIF rebuilds this source without the __class__ cell
        gen = torch.Generator().manual_seed(seed)
        start = {"ones": torch.ones(n), "half": torch.full((n,), 0.5), "random": torch.rand(n, generator=gen)}[init]
        self.parameterization = parameterization
        self.gen = gen
        if parameterization == "clamp":
            raw = start
        elif parameterization == "sigmoid":
            raw = torch.logit(start.clamp(0.05, 0.95))
        else:  # log-odds of the patch gate 1 - w
            raw = torch.logit((1 - start).clamp(0.05, 0.95))
        self.raw = torch.nn.Parameter(raw.clone())

    def forward(self, stochastic: bool = False) -> torch.Tensor:
        if self.parameterization == "clamp":
            return self.raw
        if self.parameterization == "sigmoid":
            return torch.sigmoid(self.raw)
        if stochastic:
            u = torch.rand(self.raw.shape, generator=self.gen).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.raw) / self.BETA)
        else:
            s = torch.sigmoid(self.raw)
        gate = (s * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0, 1)
        return 1 - gate

    def penalty(self, kind: str, eps: float) -> torch.Tensor:
        """Sparsity of the patched set: sum of (1 - w) (L1), of (1 - w + eps)^0.5 (L0.5), or expected L0."""
        if self.parameterization == "hard_concrete":
            return torch.sigmoid(self.raw - self.BETA * math.log(-self.GAMMA / self.ZETA)).sum()
        patched = 1 - self()
        return patched.sum() if kind == "l1" else (patched + eps).sqrt().sum()

    def project(self) -> None:
        # `with torch.no_grad()` in the body, not as a decorator: the decorator does not survive remote execution
        with torch.no_grad():
            if self.parameterization == "clamp":
                self.raw.clamp_(0, 1)

    def binary(self) -> torch.Tensor:
        """Rounded mask: 0 = patched, 1 = kept."""
        with torch.no_grad():
            return (self() >= 0.5).float()


@dataclass
class DCMResult:
    sites: list[Site]
    weights: list[float]              # final continuous weights (1 = not patched)
    mask: list[int]                   # selected binary mask: best on validation, then pruned
    patched: list[str]                # names of the patched sites of `mask`
    val_accuracy: dict[str, float]
    final_patched: list[str] = field(default_factory=list)   # the last step's rounded weights (w < 0.5)
    final_val_accuracy: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)   # per step: losses; per validation: accuracies
    pruned: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["sites"] = [str(s) for s in self.sites]
        return out


def backward_on_batch(
    handle: ModelHandle, pb: PreparedBatch, sites: Sequence[Site], weights: torch.Tensor, loss_kind: str,
    plan: dict | None = None,
) -> float:
    """One traced forward with the blend, the task loss and its backward into `weights`; returns the loss."""
    with handle.trace(pb.original.inputs()):
        write_blends(handle, pb.original, sites, pb.values, weights, plan)
        loss = task_loss(loss_kind, last_logits(handle), pb.target_ids, pb.foil_ids)
        loss.backward()
        value = loss.detach().save()
    return float(value)


def accuracy_with_mask(
    handle: ModelHandle, batches: Sequence[PreparedBatch], sites: Sequence[Site], weights: torch.Tensor
) -> dict[str, float]:
    """Accuracy (argmax == target) per desideratum with the given weights blended in."""
    plan = blend_plan(handle, sites)
    correct: dict[str, list[float]] = {}
    for pb in batches:
        with torch.no_grad(), handle.trace(pb.original.inputs()):
            write_blends(handle, pb.original, sites, pb.values, weights, plan)
            hits = (last_logits(handle).argmax(-1) == pb.target_ids).float().save()
        correct.setdefault(pb.desideratum, []).extend(hits.tolist())
    return {name: sum(v) / len(v) for name, v in correct.items()}


def _mean(acc: dict[str, float]) -> float:
    return sum(acc.values()) / max(len(acc), 1)


def _schedule(batches: list[PreparedBatch], combine: str, rng: random.Random) -> list[list[PreparedBatch]]:
    """One epoch of steps: each step is the batches whose losses are summed before one optimizer update."""
    by_name: dict[str, list[PreparedBatch]] = {}
    for pb in batches:
        by_name.setdefault(pb.desideratum, []).append(pb)
    for group in by_name.values():
        rng.shuffle(group)
    n_steps = max(len(g) for g in by_name.values())
    rounds = [[g[i % len(g)] for g in by_name.values()] for i in range(n_steps)]
    if combine == "sum":
        return rounds
    return [[pb] for round_ in rounds for pb in round_]


def prune_mask(
    handle: ModelHandle, batches: Sequence[PreparedBatch], sites: Sequence[Site], mask: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, list[str], dict[str, float]]:
    """Greedily un-patch sites (weakest first) while the held-out accuracy does not drop."""
    mask = mask.clone()
    best = accuracy_with_mask(handle, batches, sites, mask)
    pruned = []
    for i in sorted((int(i) for i in torch.nonzero(mask == 0)), key=lambda i: -float(weights[i])):
        trial = mask.clone()
        trial[i] = 1
        acc = accuracy_with_mask(handle, batches, sites, trial)
        if _mean(acc) >= _mean(best):
            mask, best = trial, acc
            pruned.append(str(sites[i]))
    return mask, pruned, best


def _optimise(
    handle: ModelHandle,
    train_batches: list[PreparedBatch],
    val_batches: list[PreparedBatch],
    sites: list[Site],
    config: DCMConfig,
    rng: random.Random,
    progress: bool,
) -> dict:
    """The training loop (run inside a session): Adam steps, projection, periodic validation of the rounded mask.

    Keeps the best rounded mask by mean validation accuracy; ties go to the one with fewer patched sites.
    Returned as one dict because only explicitly saved values leave an nnsight session.
    """
    mask = Mask(len(sites), config.parameterization, config.init, config.seed)
    optimizer = torch.optim.Adam(mask.parameters(), lr=config.lr)
    plan = blend_plan(handle, sites)
    history: list[dict] = []
    best_mask, best_acc = mask.binary(), {}
    schedule = [_schedule(train_batches, config.combine, rng) for _ in range(config.epochs)]
    total = sum(len(s) for s in schedule)
    eval_every = config.eval_every or len(schedule[0])
    stochastic = config.parameterization == "hard_concrete"
    step = 0
    with tqdm(total=total, desc=f"DCM lam={config.lam}", disable=not progress) as bar:
        for group in (g for epoch_steps in schedule for g in epoch_steps):
            optimizer.zero_grad()
            losses = {pb.desideratum: backward_on_batch(handle, pb, sites, mask(stochastic), config.loss, plan)
                      for pb in group}
            sparsity = config.lam * mask.penalty(config.penalty, config.eps)
            sparsity.backward()
            optimizer.step()
            mask.project()
            step += 1
            history.append({"step": step, "loss": losses, "penalty": float(sparsity.detach()),
                            "n_patched": int((mask.binary() == 0).sum())})
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()):.3f}", patched=history[-1]["n_patched"])
            if val_batches and (step % eval_every == 0 or step == total):
                current = mask.binary()
                acc = accuracy_with_mask(handle, val_batches, sites, current)
                history[-1]["val_accuracy"] = acc
                fewer = (current == 0).sum() < (best_mask == 0).sum()
                if not best_acc or _mean(acc) > _mean(best_acc) or (_mean(acc) == _mean(best_acc) and fewer):
                    best_mask, best_acc = current, acc
    final_acc = history[-1].get("val_accuracy", {}) if history else {}
    return {"weights": mask().detach(), "best_mask": best_mask, "best_acc": best_acc, "history": history,
            "final_mask": mask.binary(), "final_acc": final_acc}


def train_mask(
    handle: ModelHandle,
    train: dict[str, Sequence[Triple]],
    val: dict[str, Sequence[Triple]],
    sites: Sequence[Site],
    config: DCMConfig | None = None,
    progress: bool = True,
) -> DCMResult:
    """Learn a mask over `sites` from desiderata {name: triples}; returns weights, binary mask and curves."""
    config = config or DCMConfig()
    config.check()
    sites = list(sites)
    check_sites(handle, sites)
    if not train or not any(train.values()):
        raise ValueError("train_mask needs at least one desideratum with examples")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    train_batches = [pb for name in train for pb in prepare_batches(handle, train[name], sites, config.batch_size)]
    val_batches = [pb for name in val for pb in prepare_batches(handle, val[name], sites, config.batch_size)]
    progress = progress and not handle.remote  # on a server tqdm would stream back as status lines
    with handle.session():  # remotely: the whole optimisation is one request; only `outcome` comes back
        outcome = nnsight.save(_optimise(handle, train_batches, val_batches, sites, config, rng, progress))
    weights, best_mask, best_acc, history = (outcome[k] for k in ("weights", "best_mask", "best_acc", "history"))
    pruned: list[str] = []
    if config.prune and val_batches and (best_mask == 0).any():
        best_mask, pruned, best_acc = prune_mask(handle, val_batches, sites, best_mask, weights)
    if not best_acc and val_batches:
        best_acc = accuracy_with_mask(handle, val_batches, sites, best_mask)
    return DCMResult(
        sites=sites,
        weights=[round(float(w), 6) for w in weights],
        mask=[int(m) for m in best_mask],
        patched=[str(s) for s, m in zip(sites, best_mask) if m == 0],
        val_accuracy=best_acc,
        history=history,
        final_patched=[str(s) for s, m in zip(sites, outcome["final_mask"]) if m == 0],
        final_val_accuracy=outcome["final_acc"],
        pruned=pruned,
        config=asdict(config),
    )


def evaluate_mask(
    handle: ModelHandle, triples: dict[str, Sequence[Triple]], sites: Sequence[Site], patched: Sequence[str] | torch.Tensor,
    batch_size: int = 32,
) -> dict[str, float]:
    """Held-out accuracy of a binary mask on any desiderata (also ones it was not trained on)."""
    if not isinstance(patched, torch.Tensor):
        names = set(patched)
        patched = torch.tensor([0.0 if str(s) in names else 1.0 for s in sites])
    batches = [pb for name in triples for pb in prepare_batches(handle, triples[name], sites, batch_size)]
    return accuracy_with_mask(handle, batches, sites, patched)


def lambda_sweep(
    handle: ModelHandle,
    train: dict[str, Sequence[Triple]],
    val: dict[str, Sequence[Triple]],
    sites: Sequence[Site],
    lambdas: Sequence[float],
    config: DCMConfig | None = None,
    progress: bool = True,
) -> list[dict]:
    """Mask size against accuracy for each lambda (their Appendix A).

    Each row reports the mask training ended with (`final_patched`: what lambda produced) and the mask selected on
    validation (`selected_patched`), which can come from early steps before the penalty took effect.
    """
    config = config or DCMConfig()
    rows = []
    for lam in tqdm(lambdas, desc="lambda sweep", disable=not progress):
        result = train_mask(handle, train, val, sites, DCMConfig(**{**asdict(config), "lam": lam}), progress=False)
        rows.append({"lambda": lam, "n_patched": len(result.final_patched), "patched": result.final_patched,
                     "val_accuracy": result.final_val_accuracy, "selected_patched": result.patched,
                     "selected_val_accuracy": result.val_accuracy, "weights": result.weights})
        log.info("lambda=%g: %d patched at the end, accuracy %s", lam, len(result.final_patched),
                 result.final_val_accuracy)
    return rows
