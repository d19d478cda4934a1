"""Circuit discovery as Prakash et al. (2024) did it: a schedule of path-patching steps, each finding the heads
whose paths reach the previous group through one input, then minimality pruning.

The authors' schedule (Nix07/finetuning, path_patching/path_patching.py; `AUTHORS_SCHEDULE`):

| step | group | senders at | paths into | kept as receivers | kept in the group |
|---|---|---|---|---|---|
| A | Value Fetcher | last | the logits | 20 | 58 |
| B | Position Transmitter | last | A's query at last | 5 | 10 |
| C | Position Detector | query_label | B's value at query_label | 10 | 25 |
| D | Structure Reader | prev_query_label | C's value at prev_query_label | 5 | 5 |

Each step scores every head at its position in the layers below its receivers' top layer (lib.path_patching);
the k most negative are the next step's receivers, the `size` most negative the group (the authors re-take the
final groups at 58 / 10 / 25 / 5 from the saved scores, for Llama-7B). The overlap rule: Value Fetcher heads also
in the Position Transmitter list are dropped from the Value Fetchers (`AUTHORS_OVERLAP`). A receiver's q is patched
at its own position; its k / v at the step's sender position (the token the receiver reads).

`min_effect` (our addition, off by default as in their code): a head enters a group or the receivers only if its
score is <= -min_effect, so a small model's top-k does not fill up with heads that change nothing. `prune_circuit`
applies the authors' minimality (lib.metrics.minimality) per group.

A `Schedule` is a sequence of `Step`s, so other mechanisms are searched the same way (e.g. a step into the Value
Fetcher's value at prev_query_label finds heads that write the object to the label, as planted:strong's binder).
The result is a `Circuit`: named groups with their positions, the input they were found through, every score,
saved and loaded as JSON.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib import metrics
from lib.attribution import rank_sites
from lib.core.handle import ModelHandle
from lib.path_patching import HEAD_INPUTS, SENDERS_PER_PASS, Batching, HeadInput, noise_runs, path_patch
from lib.scores import target_prob
from lib.types import Activations, Component, PairBatch, Site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One path-patching step of a schedule.

    group: the name of the group it finds. position: where its senders are. receivers: the earlier group whose
    heads the paths must reach (None = the logits). input: which input of those heads (HeadInput). k: how many of
    its heads are the receivers of later steps. size: how many are kept in the group.
    """

    group: str
    position: str
    receivers: str | None = None
    input: HeadInput = "out"
    k: int = 10
    size: int = 10


Schedule = Sequence[Step]

AUTHORS_SCHEDULE: tuple[Step, ...] = (
    Step("Value Fetcher", "last", None, "out", k=20, size=58),
    Step("Position Transmitter", "last", "Value Fetcher", "q", k=5, size=10),
    Step("Position Detector", "query_label", "Position Transmitter", "v", k=10, size=25),
    Step("Structure Reader", "prev_query_label", "Position Detector", "v", k=5, size=5),
)
"""Prakash et al.'s schedule with the authors' Llama-7B top-k (20 / 5 / 10) and final group sizes (58 / 10 / 25 / 5)."""

LABEL_SCHEDULE: tuple[Step, ...] = (
    Step("Value Fetcher", "last", None, "out", k=20, size=58),
    Step("Query-label Mover", "last", "Value Fetcher", "q", k=5, size=10),
    Step("Object Binder", "prev_query_label", "Value Fetcher", "v", k=5, size=5),
)
"""A fetch keyed on the label's identity (planted:strong): a mover writes the queried label where the fetcher
queries, a binder writes the object into its box label's stream, which the fetcher reads as a value."""

QUERY_LABEL_SCHEDULE: tuple[Step, ...] = (
    Step("Value Fetcher", "last", None, "out", k=20, size=58),
    Step("Label Matcher", "query_label", "Value Fetcher", "v", k=10, size=25),
    Step("Binder", "prev_query_label", "Label Matcher", "v", k=5, size=5),
)
"""The authors' schedule without the Position Transmitter: the fetchers read the query label's stream directly as
a value (the toy entity models, docs/CIRCUITS.md), whose heads read the queried box's label as a value."""

SCHEDULES = {"authors": AUTHORS_SCHEDULE, "label": LABEL_SCHEDULE, "query_label": QUERY_LABEL_SCHEDULE}

AUTHORS_OVERLAP: tuple[tuple[str, str], ...] = (("Value Fetcher", "Position Transmitter"),)
"""(group, other): heads of `group` also listed in `other` are dropped from `group` (the authors' rule)."""


def _site(text: str) -> Site:
    return Site.parse(text)


@dataclass
class Group:
    """A named group of heads at one position, found through `input` of the `receivers` group (None: logits)."""

    name: str
    position: str
    receivers: str | None
    input: str
    heads: list[Site]
    scores: dict[Site, float]

    def to_dict(self) -> dict:
        """The group as JSON-ready data (sites as strings)."""
        return {"name": self.name, "position": self.position, "receivers": self.receivers, "input": self.input,
                "heads": [{"site": str(s), "score": self.scores[s]} for s in self.heads]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Group:
        """The inverse of to_dict."""
        heads = [_site(h["site"]) for h in d["heads"]]
        return cls(d["name"], d["position"], d["receivers"], d["input"], heads,
                   {_site(h["site"]): float(h["score"]) for h in d["heads"]})


@dataclass
class Circuit:
    """The groups a discovery found, every step's scores and how it was run; `save` / `load` as JSON.

    groups: in schedule order. step_scores: {group: {sender: score}} for every sender a step scored (so groups can
    be re-taken at other sizes). minimality: per site, lib.metrics.minimality's row, once pruned.
    """

    groups: list[Group]
    step_scores: dict[str, dict[Site, float]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    minimality: dict[Site, dict] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        """The group called `name` (KeyError naming the groups there are)."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    def as_groups(self) -> dict[str, list[Site]]:
        """{group name: its sites}."""
        return {g.name: list(g.heads) for g in self.groups}

    def sites(self) -> list[Site]:
        """Every site of the circuit, sorted."""
        return sorted({s for g in self.groups for s in g.heads})

    def to_dict(self) -> dict:
        """The circuit as JSON-ready data (groups, every step's scores, settings, minimality rows)."""
        def rows(table):
            return {str(s): v for s, v in table.items()}

        return {"groups": [g.to_dict() for g in self.groups],
                "step_scores": {name: rows(table) for name, table in self.step_scores.items()},
                "config": self.config,
                "minimality": {str(s): {**row, "K": [str(k) for k in row["K"]]} for s, row in self.minimality.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Circuit:
        """The inverse of to_dict."""
        return cls([Group.from_dict(g) for g in d["groups"]],
                   {name: {_site(s): float(v) for s, v in table.items()} for name, table in d["step_scores"].items()},
                   dict(d.get("config", {})),
                   {_site(s): {**row, "K": [_site(k) for k in row["K"]]} for s, row in d.get("minimality", {}).items()})

    def retake(self, sizes: Mapping[str, int], overlap: Sequence[tuple[str, str]] | None = None,
               min_effect: float | None = None) -> Circuit:
        """The groups re-taken from the saved step scores at other sizes (the authors' final 58 / 10 / 25 / 5), with
        the overlap rule (default: the one the discovery used) and the floor applied again; groups not in `sizes`
        keep their size."""
        if overlap is None:
            overlap = [tuple(pair) for pair in self.config.get("overlap", [])]
        groups = [Group(g.name, g.position, g.receivers, g.input, [], {}) for g in self.groups]
        for g in groups:
            size = sizes.get(g.name, len(self.group(g.name).heads))
            order = _ranked(self.step_scores.get(g.name, {}), min_effect)[:size]
            g.heads, g.scores = [s for s, _ in order], dict(order)
        _apply_overlap(groups, overlap)
        return Circuit(groups, self.step_scores, {**self.config, "retaken": dict(sizes)}, {})

    def save(self, path: str | Path) -> None:
        """Write the circuit as JSON (infinite minimality scores as Infinity)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """A circuit saved with `save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _ranked(scores: Mapping[Site, float], min_effect: float | None) -> list[tuple[Site, float]]:
    """The scored senders, most negative first; with min_effect only those <= -min_effect."""
    order = sorted(scores.items(), key=lambda item: item[1])
    return order if min_effect is None else [(s, v) for s, v in order if v <= -min_effect]


def _check_overlap(names: set[str], overlap: Sequence[tuple[str, str]]) -> None:
    for a, b in overlap:
        if a not in names or b not in names:
            raise ValueError(f"overlap rule ({a!r}, {b!r}) names a group the schedule does not find")


def _apply_overlap(groups: Sequence[Group], overlap: Sequence[tuple[str, str]]) -> None:
    """In place: heads of `group` whose head is also in `other` leave `group`, for each (group, other)."""
    by_name = {g.name: g for g in groups}
    _check_overlap(set(by_name), overlap)
    for a, b in overlap:
        other = {s.component for s in by_name[b].heads}
        by_name[a].heads = [s for s in by_name[a].heads if s.component not in other]
        by_name[a].scores = {s: by_name[a].scores[s] for s in by_name[a].heads}


def check_schedule(schedule: Schedule) -> None:
    """Clear errors for a schedule whose steps name unknown or later groups, inputs or sizes."""
    if not schedule:
        raise ValueError("the schedule has no steps")
    seen: set[str] = set()
    for step in schedule:
        if step.group in seen:
            raise ValueError(f"group {step.group!r} is found by two steps; give each step its own group name")
        if step.receivers is not None and step.receivers not in seen:
            raise ValueError(f"step {step.group!r} reaches group {step.receivers!r}, which no earlier step finds")
        if step.input not in HEAD_INPUTS:
            raise ValueError(f"step {step.group!r}: unknown input {step.input!r}; use one of {', '.join(HEAD_INPUTS)}")
        if step.receivers is None and step.input != "out":
            raise ValueError(f"step {step.group!r} reaches the logits, which have no {step.input!r} input")
        if step.k < 0 or step.size < 0:
            raise ValueError(f"step {step.group!r}: k and size must be >= 0")
        seen.add(step.group)


def step_senders(handle: ModelHandle, step: Step, receivers: Sequence[Site]) -> list[Site]:
    """Every head at the step's position in the layers below its receivers' top layer (all layers for the logits);
    for output receivers, minus the receivers themselves (a head has no path to its own output)."""
    arch = handle.arch
    top = arch.n_layers if step.receivers is None else max((r.component.layer for r in receivers), default=0)
    skip = set(receivers) if step.input == "out" else set()
    return [s for layer in range(top) for h in range(arch.n_heads)
            if (s := Site(Component(layer, h), step.position)) not in skip]


def _scores(handle: ModelHandle, batches: Sequence[PairBatch], runs: list, senders: list[Site],
            receivers: list[Site] | None, kind: str, options: Mapping[str, Any], progress: bool) -> dict[Site, float]:
    """Path-patching scores averaged over every example of `batches` (runs: each batch's NoiseRuns, or None)."""
    total = sum(b.size for b in batches)
    out = {s: 0.0 for s in senders}
    for batch, run in zip(batches, runs):
        for s, v in path_patch(handle, batch, senders, receivers, receiver_input=kind, runs=run, progress=progress,
                               **options).items():
            out[s] += v * batch.size / total
    return out


def rank_first_candidates(handle: ModelHandle, batches: Sequence[PairBatch], k: int,
                          schedule: Schedule = AUTHORS_SCHEDULE, progress: bool = False) -> dict[str, list[tuple[Site, float]]]:
    """The K heads per sender position that attribution ranks as lowering P(answer) most: `discover_circuit`'s
    `candidates` for a cheap first pass (one attribution scan per position instead of path-patching every head).

    The noise run is read at the original's token positions (path patching's noise prompts can tokenize to other
    positions), and the metric is the probability of the original's answer, the quantity path patching lowers.

    Args:
        batches: discover_circuit's (original, noise) PairBatches.
        k: heads kept per sender position (at least 1).
        schedule: the steps whose sender positions are ranked.

    Returns:
        {position: [(site, attribution score)]}, most negative first, at most k per position; the candidates are
        every site of every list.
    """
    if k < 1:
        raise ValueError(f"rank-first needs k >= 1 heads per position, got {k}")
    check_schedule(schedule)
    aligned = [type(b)(b.original, b.alternate.with_positions(b.original.positions), b.target_ids, b.foil_ids,
                       b.desideratum) for b in batches]
    positions = sorted({step.position for step in schedule})
    return {p: rank_sites(handle, aligned, (p,), k, mlps=False, by="decrease", metric=target_prob,
                          progress=progress) for p in positions}


def discover_circuit(
    handle: ModelHandle,
    batches: Sequence[PairBatch],
    schedule: Schedule = AUTHORS_SCHEDULE,
    *,
    overlap: Sequence[tuple[str, str]] | None = None,
    min_effect: float | None = None,
    senders_per_pass: int = SENDERS_PER_PASS,
    batching: Batching = "stack",
    reuse_prefix: bool = True,
    candidates: Sequence[Site] | None = None,
    progress: bool = True,
) -> Circuit:
    """Run a path-patching schedule (default: the authors') and return the groups it finds.

    Args:
        batches: (original, noise) PairBatches of correctly answered originals (lib.data_gen.path_patching_noise,
            lib.evaluation.filter_correct with require_alternate=False), target_ids = the originals' answers.
        schedule: the steps (see `Step`, `AUTHORS_SCHEDULE`).
        overlap: (group, other) pairs: heads of `group` also in `other` are dropped from `group`; None = the
            authors' rule (AUTHORS_OVERLAP) for their schedule, no rule for any other.
        min_effect: keep a head only if its score <= -min_effect (None: pure top-k, as the authors).
        senders_per_pass, batching, reuse_prefix: how lib.path_patching.path_patch runs (they change the speed,
            not the scores).
        candidates: only these heads (at their positions) are path-patched as senders, e.g. the top K of an
            attribution ranking (lib.attribution.rank_sites): a cheap first pass; None = every head.

    Returns:
        Circuit with one Group per step, in schedule order, every step's scores, and in config the settings and
        each step's wall and process CPU time in seconds.
    """
    check_schedule(schedule)
    batches = list(batches)
    if not batches:
        raise ValueError("discover_circuit needs at least one batch of (original, noise) pairs")
    if overlap is None:
        overlap = AUTHORS_OVERLAP if tuple(schedule) == AUTHORS_SCHEDULE else ()
    overlap = [tuple(pair) for pair in overlap]
    _check_overlap({s.group for s in schedule}, overlap)
    options = {"senders_per_pass": senders_per_pass, "batching": batching, "reuse_prefix": reuse_prefix}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    # every step reads the same clean and noise runs: read them once (locally; remotely each request reads them)
    started, cpu_started = time.perf_counter(), time.process_time()
    runs = [None if handle.remote else noise_runs(handle, b, reuse_prefix and batching == "stack") for b in batches]
    seconds["clean and noise reads"] = time.perf_counter() - started
    cpu_seconds["clean and noise reads"] = time.process_time() - cpu_started
    ranked: dict[str, list[tuple[Site, float]]] = {}
    groups: list[Group] = []
    step_scores: dict[str, dict[Site, float]] = {}
    steps = {s.group: s for s in schedule}
    for step in schedule:
        receivers = None
        if step.receivers is not None:
            source = steps[step.receivers]
            at = source.position if step.input in ("q", "out") else step.position
            receivers = [Site(s.component, at) for s, _ in ranked[step.receivers][:source.k]]
        senders = step_senders(handle, step, receivers or [])
        if candidates is not None:
            allowed = set(candidates)
            senders = [s for s in senders if s in allowed]
        started, cpu_started = time.perf_counter(), time.process_time()
        if receivers == [] or not senders:
            scores: dict[Site, float] = {}
        else:
            scores = _scores(handle, batches, runs, senders, receivers, step.input, options, progress)
        seconds[step.group] = time.perf_counter() - started
        cpu_seconds[step.group] = time.process_time() - cpu_started
        step_scores[step.group] = scores
        order = _ranked(scores, min_effect)
        ranked[step.group] = order
        log.info("%s (%s -> %s %s): %s", step.group, step.position, step.receivers or "logits", step.input,
                 ", ".join(f"{s} {v:.3f}" for s, v in order[:5]))
        groups.append(Group(step.group, step.position, step.receivers, step.input,
                            [s for s, _ in order[:step.size]], dict(order[:step.size])))
    _apply_overlap(groups, overlap)
    config = {"model": handle.name, "schedule": [vars(s) for s in schedule], "overlap": [list(p) for p in overlap],
              "min_effect": min_effect, "examples": sum(b.size for b in batches), **options,
              "candidates": None if candidates is None else [str(s) for s in candidates], "step_seconds": seconds,
              "step_cpu_seconds": cpu_seconds}
    return Circuit(groups, step_scores, config)


def prune_circuit(handle: ModelHandle, circuit: Circuit, batches: Sequence[PairBatch], means: Activations,
                  fraction: float = metrics.MINIMALITY_FRACTION, threshold: float = metrics.MINIMALITY_THRESHOLD,
                  progress: bool = True) -> Circuit:
    """The circuit with every head the authors' minimality rule drops removed (lib.metrics.minimality, per group).

    Args:
        batches: evaluation PairBatches of one prompt length (the authors use 100 examples).
        means: whole-sequence means (lib.metrics.whole_sequence_means).

    Returns:
        A new Circuit; `minimality` holds every head's row, `config["pruned"]` the rule's settings.
    """
    groups = {g.name: g.heads for g in circuit.groups if g.heads}
    rows = metrics.minimality(handle, batches, groups, means, fraction, progress=progress) if groups else {}
    keep = set(metrics.minimal_sites(rows, threshold))
    pruned = [Group(g.name, g.position, g.receivers, g.input, [s for s in g.heads if s in keep],
                    {s: v for s, v in g.scores.items() if s in keep}) for g in circuit.groups]
    for s, row in rows.items():
        if s not in keep:
            log.info("minimality drops %s (%s): %.3f < %.3f", s, row["group"], row["score"], threshold)
    config = {**circuit.config, "pruned": {"fraction": fraction, "threshold": threshold,
                                           "examples": sum(b.size for b in batches)}}
    return Circuit(pruned, circuit.step_scores, config, rows)

