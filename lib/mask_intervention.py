"""Desiderata-based Component Masking (DCM): learn which components carry a variable, as nnsight traces.

Each site (component at a position) gets a weight w in [0, 1]; on the original prompt its output becomes
`w * v_orig + (1 - w) * v_alt` (lib.patching.write_blends), all sites in one forward pass. A loss pulls the
output toward each desideratum's target; a sparsity penalty on the patched amount (1 - w) keeps the set small.
The whole optimisation runs in one `handle.in_one_request`, so remotely it is a single NDIF request.
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from lib.core.handle import ModelHandle
from lib.data.encoding import encode_pairs
from lib.patching import blend_plan, check_sites, collect, last_logits, write_blends
from lib.scores import ANSWER_RULES, FirstDigit, digit_task_logits, first_digit_classes, target_hit
from lib.types import (COMBINES, INITS, LOSSES, PARAMETERIZATIONS, PENALTIES, Activations, Combine, Init, Loss,
                       PairBatch, Parameterization, Penalty, Site, Triple)

log = logging.getLogger(__name__)


@dataclass
class DCMConfig:
    """Training settings. Defaults follow the authors' entity-tracking code (target-logit loss, L1 on 1 - w,
    lambda 0.01, Adam lr 0.1, 2 epochs, batch 32, the rounded mask validated and the best kept), except `init`:
    the papers start every weight at 1 (nothing patched), where a component behind saturated attention gets a
    vanishing gradient and is never selected (tests/integration/test_patching_and_dcm.py); "half" finds it.
    Davies et al. used penalty="l0.5", loss="logit_diff", lr 0.01."""

    lam: float = 0.01
    penalty: Penalty = "l1"
    loss: Loss = "target_logit"
    lr: float = 0.1
    epochs: int = 2
    batch_size: int = 32
    init: Init = "half"
    parameterization: Parameterization = "clamp"   # the papers' recipe; the others learn where it stalls
    combine: Combine = "sum"          # "sum" the desiderata's losses each step, or "alternate" step by step
    eval_every: int = 0               # steps between validations of the rounded mask; 0 = once per epoch
    prune: bool = True                # drop patched sites the held-out accuracy does not need
    answer_rule: str = "token"        # "first_digit": losses and accuracy over every token starting with the digit
    seed: int = 0
    eps: float = 1e-6                 # keeps the L0.5 gradient finite at w = 1

    def check(self) -> None:
        """Raise ValueError naming the field whose value is not one of its choices."""
        for name, value, allowed in [
            ("loss", self.loss, LOSSES), ("penalty", self.penalty, PENALTIES),
            ("parameterization", self.parameterization, PARAMETERIZATIONS), ("init", self.init, INITS),
            ("combine", self.combine, COMBINES), ("answer_rule", self.answer_rule, ANSWER_RULES),
        ]:
            if value not in allowed:
                raise ValueError(f"DCMConfig.{name}={value!r}; choose one of {', '.join(allowed)}")
        if self.init == "ones" and self.parameterization != "clamp":
            raise ValueError(f"init='ones' (nothing patched) is a bound the {self.parameterization} parameterisation "
                             "cannot start at: its weights would start clipped (sigmoid at 0.95, hard-concrete gates "
                             "shut with no gradient); use init='half' or 'random', or parameterization='clamp'")
        for name in ("lr", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DCMConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.lam < 0:
            raise ValueError(f"DCMConfig.lam (the sparsity strength) must be >= 0, got {self.lam}")


Prepared = tuple[PairBatch, Activations]
"""A batch with the alternate's rows at the masked sites, computed once (the model is frozen, they never change)."""


def prepare_batches(
    handle: ModelHandle, triples: Sequence[Triple], sites: Sequence[Site], batch_size: int
) -> list[Prepared]:
    """Encode triples in chunks of `batch_size` and run each alternate once.

    Returns:
        [(PairBatch, {RowKey: (batch, width)} alternate rows)].
    """
    out = []
    for start in range(0, len(triples), batch_size):
        batch = encode_pairs(triples[start:start + batch_size], handle.tokenizer)
        check_sites(handle, sites, batch.original)
        check_sites(handle, sites, batch.alternate)
        out.append((batch, collect(handle, batch.alternate, sites)))
    return out


def task_loss(kind: str, logits: torch.Tensor, target_ids: torch.Tensor, foil_ids: torch.Tensor,
              classes: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of: -logit[target] | -(logit[target] - logit[foil]) | cross-entropy.

    With `classes` (lib.scores.first_digit_classes) the target's and foil's logits are their digits' (log-sum-exp
    over every token starting with the digit) and cross-entropy is the digit's summed probability.
    """
    if classes is not None:
        target, foil = digit_task_logits(logits, target_ids, foil_ids, classes)
        if kind == "target_logit":
            return -target.mean()
        if kind == "logit_diff":
            return -(target - foil).mean()
        return -(target - logits.float().logsumexp(-1)).mean()
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
        """The weights w (n_sites,) in [0, 1]; `stochastic` samples the hard-concrete gates."""
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
        """Clamp the clamp parameterisation's weights back into [0, 1] after a step."""
        with torch.no_grad():
            if self.parameterization == "clamp":
                self.raw.clamp_(0, 1)

    def binary(self) -> torch.Tensor:
        """Rounded mask: 0 = patched, 1 = kept."""
        with torch.no_grad():
            return (self() >= 0.5).float()


@dataclass
class DCMResult:
    """What `train_mask` learned. The *selected* mask is the one kept (best rounded mask on validation, then
    pruned); the *final* mask is the last step's rounded weights, recorded beside it."""

    sites: list[Site]
    weights: list[float]                     # final continuous weights (1 = not patched)
    selected_mask: list[int]                 # 0 = patched, per site
    selected_patched: list[str]              # names of the patched sites of selected_mask
    selected_val_accuracy: dict[str, float]
    final_mask: list[int] = field(default_factory=list)
    final_patched: list[str] = field(default_factory=list)
    final_val_accuracy: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)   # per step: losses; per validation: accuracies
    pruned: list[str] = field(default_factory=list)     # sites the selected mask lost to pruning
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The result as JSON-ready data (sites as strings)."""
        out = asdict(self)
        out["sites"] = [str(s) for s in self.sites]
        return out


def backward_on_batch(
    handle: ModelHandle, prepared: Prepared, sites: Sequence[Site], weights: torch.Tensor, loss_kind: str,
    plan: dict | None = None, classes: torch.Tensor | None = None,
) -> float:
    """One traced forward with the blend, the task loss and its backward into `weights`; returns the loss."""
    batch, values = prepared
    with handle.trace(batch.original.inputs()):
        write_blends(handle, batch.original, sites, values, weights, plan)
        loss = task_loss(loss_kind, last_logits(handle), batch.target_ids, batch.foil_ids, classes)
        loss.backward()
        value = loss.detach().save()
    return float(value)


def dcm_step(
    handle: ModelHandle, mask: Mask, optimizer: torch.optim.Optimizer, group: Sequence[Prepared],
    sites: Sequence[Site], config: DCMConfig, plan: dict | None = None, classes: torch.Tensor | None = None,
) -> tuple[dict[str, float], float]:
    """One DCM update: the blended forward, task loss and backward of each batch in `group`, the penalty's
    backward, one optimizer step and the projection to [0, 1].

    Returns:
        ({desideratum: task loss}, penalty value).
    """
    optimizer.zero_grad()
    stochastic = config.parameterization == "hard_concrete"
    losses = {batch.desideratum: backward_on_batch(handle, (batch, values), sites, mask(stochastic), config.loss, plan,
                                                   classes)
              for batch, values in group}
    sparsity = config.lam * mask.penalty(config.penalty, config.eps)
    sparsity.backward()
    optimizer.step()
    mask.project()
    return losses, float(sparsity.detach())


def accuracy_with_mask(
    handle: ModelHandle, batches: Sequence[Prepared], sites: Sequence[Site], weights: torch.Tensor,
    classes: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracy (argmax == target; with `classes`, the first-digit rule) per desideratum with the weights blended in."""
    plan = blend_plan(handle, sites)
    metric = target_hit if classes is None else FirstDigit(classes, "hit")
    correct: dict[str, list[float]] = {}
    for batch, values in batches:
        with torch.no_grad(), handle.trace(batch.original.inputs()):
            write_blends(handle, batch.original, sites, values, weights, plan)
            hits = metric(last_logits(handle), batch).save()
        correct.setdefault(batch.desideratum, []).extend(hits.tolist())
    return {name: sum(v) / len(v) for name, v in correct.items()}


def _mean(acc: dict[str, float]) -> float:
    return sum(acc.values()) / max(len(acc), 1)


def _schedule(batches: list[Prepared], combine: str, rng: random.Random) -> list[list[Prepared]]:
    """One epoch of steps: each step is the batches whose losses are summed before one optimizer update."""
    by_name: dict[str, list[Prepared]] = {}
    for prepared in batches:
        by_name.setdefault(prepared[0].desideratum, []).append(prepared)
    for group in by_name.values():
        rng.shuffle(group)
    n_steps = max(len(g) for g in by_name.values())
    rounds = [[g[i % len(g)] for g in by_name.values()] for i in range(n_steps)]
    if combine == "sum":
        return rounds
    return [[p] for round_ in rounds for p in round_]


def prune_mask(
    handle: ModelHandle, batches: Sequence[Prepared], sites: Sequence[Site], mask: torch.Tensor,
    weights: torch.Tensor, classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[str], dict[str, float]]:
    """Greedily un-patch sites (weakest first) while the held-out accuracy does not drop.

    Returns:
        (pruned binary mask, names of the sites un-patched, its accuracy per desideratum).
    """
    mask = mask.clone()
    best = accuracy_with_mask(handle, batches, sites, mask, classes)
    pruned = []
    for i in sorted((int(i) for i in torch.nonzero(mask == 0)), key=lambda i: -float(weights[i])):
        trial = mask.clone()
        trial[i] = 1
        acc = accuracy_with_mask(handle, batches, sites, trial, classes)
        if _mean(acc) >= _mean(best):
            mask, best = trial, acc
            pruned.append(str(sites[i]))
    return mask, pruned, best


def _optimise(
    handle: ModelHandle,
    train_batches: list[Prepared],
    val_batches: list[Prepared],
    sites: list[Site],
    config: DCMConfig,
    progress: bool,
    classes: torch.Tensor | None = None,
) -> dict:
    """The training loop (one request): Adam steps, projection, periodic validation of the rounded mask.

    Keeps the best rounded mask by mean validation accuracy; ties go to the one with fewer patched sites.
    Returned as one dict because only explicitly saved values leave an nnsight session.
    """
    rng = random.Random(config.seed)
    mask = Mask(len(sites), config.parameterization, config.init, config.seed)
    optimizer = torch.optim.Adam(mask.parameters(), lr=config.lr)
    plan = blend_plan(handle, sites)
    history: list[dict] = []
    best_mask, best_acc = mask.binary(), {}
    schedule = [_schedule(train_batches, config.combine, rng) for _ in range(config.epochs)]
    total = sum(len(s) for s in schedule)
    eval_every = config.eval_every or len(schedule[0])
    step = 0
    with tqdm(total=total, desc=f"DCM lam={config.lam}", disable=not progress) as bar:
        for group in (g for epoch_steps in schedule for g in epoch_steps):
            losses, penalty = dcm_step(handle, mask, optimizer, group, sites, config, plan, classes)
            step += 1
            history.append({"step": step, "loss": losses, "penalty": penalty,
                            "n_patched": int((mask.binary() == 0).sum())})
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()):.3f}", patched=history[-1]["n_patched"])
            if val_batches and (step % eval_every == 0 or step == total):
                current = mask.binary()
                acc = accuracy_with_mask(handle, val_batches, sites, current, classes)
                history[-1]["val_accuracy"] = acc
                fewer = (current == 0).sum() < (best_mask == 0).sum()
                if not best_acc or _mean(acc) > _mean(best_acc) or (_mean(acc) == _mean(best_acc) and fewer):
                    best_mask, best_acc = current, acc
    final_acc = history[-1].get("val_accuracy", {}) if history else {}
    return {"weights": mask().detach(), "best_mask": best_mask, "best_acc": best_acc, "history": history,
            "final_mask": mask.binary(), "final_acc": final_acc}


def _encode(handle: ModelHandle, triples: dict[str, Sequence[Triple]], sites: Sequence[Site],
            batch_size: int) -> list[PairBatch]:
    """Every desideratum's triples as PairBatches of `batch_size`, each checked against the sites (client side)."""
    batches = []
    for name, items in triples.items():
        for start in range(0, len(items), batch_size):
            batch = encode_pairs(items[start:start + batch_size], handle.tokenizer)
            check_sites(handle, sites, batch.original)
            check_sites(handle, sites, batch.alternate)
            batches.append(batch)
    return batches


def _train(handle: ModelHandle, train: list[PairBatch], val: list[PairBatch], sites: list[Site], config: DCMConfig,
           progress: bool, classes: torch.Tensor | None = None) -> dict:
    """Everything DCM runs on the model, as one request: the alternates, the optimisation, pruning, validation."""
    train_prepared = [(b, collect(handle, b.alternate, sites)) for b in train]
    val_prepared = [(b, collect(handle, b.alternate, sites)) for b in val]
    outcome = _optimise(handle, train_prepared, val_prepared, sites, config, progress, classes)
    best_mask, best_acc = outcome["best_mask"], outcome["best_acc"]
    pruned: list[str] = []
    if config.prune and val_prepared and (best_mask == 0).any():
        best_mask, pruned, best_acc = prune_mask(handle, val_prepared, sites, best_mask, outcome["weights"], classes)
    if not best_acc and val_prepared:
        best_acc = accuracy_with_mask(handle, val_prepared, sites, best_mask, classes)
    return {**outcome, "best_mask": best_mask, "best_acc": best_acc, "pruned": pruned}


def train_mask(
    handle: ModelHandle,
    train: dict[str, Sequence[Triple]],
    val: dict[str, Sequence[Triple]],
    sites: Sequence[Site],
    config: DCMConfig | None = None,
    progress: bool = True,
) -> DCMResult:
    """Learn a mask over `sites` from desiderata.

    Args:
        handle: the (frozen) model.
        train, val: {desideratum: triples}; validation picks the rounded mask to keep and prunes it.
        sites: the components at positions the mask covers.
        config: DCMConfig (defaults: the authors' recipe with init "half").
        progress: a progress bar over steps (off remotely, where the loop runs on the server).

    Returns:
        DCMResult: final continuous weights, the selected and the final binary masks, curves. Remotely the whole
        run (alternate runs, every step, validation, pruning) is one NDIF request.
    """
    config = config or DCMConfig()
    config.check()
    sites = list(sites)
    check_sites(handle, sites)
    if not train or not any(train.values()):
        raise ValueError("train_mask needs at least one desideratum with examples")
    train_batches = _encode(handle, train, sites, config.batch_size)
    val_batches = _encode(handle, val, sites, config.batch_size)
    progress = progress and not handle.remote  # on a server tqdm would stream back as status lines
    classes = answer_classes(handle, config.answer_rule)
    outcome = handle.in_one_request(_train, train_batches, val_batches, sites, config, progress, classes)
    best_mask, final_mask = outcome["best_mask"], outcome["final_mask"]
    return DCMResult(
        sites=sites,
        weights=[round(float(w), 6) for w in outcome["weights"]],
        selected_mask=[int(m) for m in best_mask],
        selected_patched=[str(s) for s, m in zip(sites, best_mask) if m == 0],
        selected_val_accuracy=outcome["best_acc"],
        final_mask=[int(m) for m in final_mask],
        final_patched=[str(s) for s, m in zip(sites, final_mask) if m == 0],
        final_val_accuracy=outcome["final_acc"],
        history=outcome["history"],
        pruned=outcome["pruned"],
        config=asdict(config),
    )


def answer_classes(handle: ModelHandle, rule: str) -> torch.Tensor | None:
    """The first-digit classes of the handle's tokenizer under rule "first_digit", None under "token"."""
    if rule not in ANSWER_RULES:
        raise ValueError(f"answer rule {rule!r}; choose one of {', '.join(ANSWER_RULES)}")
    return first_digit_classes(handle.tokenizer) if rule == "first_digit" else None


def evaluate_mask(
    handle: ModelHandle, triples: dict[str, Sequence[Triple]], sites: Sequence[Site],
    patched: Sequence[str] | torch.Tensor, batch_size: int = 32, answer_rule: str = "token",
) -> dict[str, float]:
    """Held-out accuracy per desideratum of a binary mask (names of patched sites, or a 0/1 tensor per site),
    also on desiderata it was not trained on; `answer_rule` as DCMConfig's."""
    if not isinstance(patched, torch.Tensor):
        names = set(patched)
        patched = torch.tensor([0.0 if str(s) in names else 1.0 for s in sites])
    batches = _encode(handle, triples, sites, batch_size)
    return handle.in_one_request(_masked_accuracy, batches, sites, patched, answer_classes(handle, answer_rule))


def _masked_accuracy(handle: ModelHandle, batches: list[PairBatch], sites: list[Site], mask: torch.Tensor,
                     classes: torch.Tensor | None) -> dict:
    prepared = [(b, collect(handle, b.alternate, sites)) for b in batches]
    return accuracy_with_mask(handle, prepared, sites, mask, classes)


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

    Returns:
        one row per lambda: the selected mask (`selected_patched`, `n_selected`, `selected_val_accuracy`), the
        final mask training ended with (`final_patched`, `n_final`, `final_val_accuracy`) and the final weights.
    """
    config = config or DCMConfig()
    rows = []
    for lam in tqdm(lambdas, desc="lambda sweep", disable=not progress):
        result = train_mask(handle, train, val, sites, DCMConfig(**{**asdict(config), "lam": lam}), progress=False)
        rows.append({"lambda": lam,
                     "selected_patched": result.selected_patched, "n_selected": len(result.selected_patched),
                     "selected_val_accuracy": result.selected_val_accuracy,
                     "final_patched": result.final_patched, "n_final": len(result.final_patched),
                     "final_val_accuracy": result.final_val_accuracy, "weights": result.weights})
        log.info("lambda=%g: %d selected, %d patched at the end, accuracy %s", lam, len(result.selected_patched),
                 len(result.final_patched), result.selected_val_accuracy)
    return rows
