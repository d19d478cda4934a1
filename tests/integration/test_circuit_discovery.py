"""discover_circuit (the authors' four-step schedule, lib.circuit_discovery) on the planted models, whose circuits
are known (lib.builtin.planted.ground_truth).

What "the schedule recovers the ground truth" means here:
- planted:positional has the paper's mechanism in three heads: Value Fetcher L2H3@last, Position Transmitter
  L1H2@last (reaches the fetcher through its query), Position Detector L0H1@query_label (reaches the transmitter
  through its value). Its detector reads positions from the embeddings, so the Structure Reader step has no
  sender (nothing below layer 0) and the group is empty. With the authors' pure top-k every group's top head is
  the planted one and every other head scores ~0; minimality pruning (or min_effect) leaves exactly the three.
- planted:strong fetches by label identity: the schedule finds the fetcher and the query-label mover (in the
  Position Transmitter's slot, through the fetcher's query) and nothing at the query label; its binder reaches the
  fetcher through the fetcher's *value* at the queried box's label, a step the authors' schedule does not have.
  A schedule with that step (LABEL_SCHEDULE) returns exactly the three heads where they work.
"""
from __future__ import annotations

import pytest

from lib import metrics as M
from lib.builtin import planted
from lib.builtin.circuits import planted_working_sites
from lib.circuit_discovery import (AUTHORS_SCHEDULE, LABEL_SCHEDULE, Circuit, Step, check_schedule, discover_circuit,
                                   prune_circuit, rank_first_candidates)
from lib.data_gen import encode_pairs, path_patching_noise
from lib.types import Site

N_BOXES = 3
POSITIONAL = {"Value Fetcher": [Site(planted.FETCHER, "last")],
              "Position Transmitter": [Site(planted.POSITION_TRANSMITTER, "last")],
              "Position Detector": [Site(planted.POSITION_DETECTOR, "query_label")],
              "Structure Reader": []}


def _noise(handle, kind, n, seed):
    return encode_pairs(path_patching_noise(kind, n, n_boxes=N_BOXES, seed=seed, tokenizer=handle.tokenizer),
                        handle.tokenizer)


@pytest.fixture(scope="module")
def positional(builtin_model):
    handle = builtin_model("planted:positional")
    return handle, discover_circuit(handle, [_noise(handle, "random", 12, 1)], progress=False)


def test_the_authors_schedule_ranks_the_planted_positional_heads_first(positional):
    handle, circuit = positional
    assert [g.name for g in circuit.groups] == [s.group for s in AUTHORS_SCHEDULE]
    for group in circuit.groups[:3]:
        (top, score), *rest = sorted(circuit.step_scores[group.name].items(), key=lambda item: item[1])
        assert [top] == POSITIONAL[group.name] and score < -0.5, group.name
        assert max(abs(v) for _, v in rest) < 0.01, group.name      # everything else changes nothing
        assert all(s.position == group.position for s in group.heads)
    assert circuit.step_scores["Structure Reader"] == {}             # no sender below the detector's layer 0
    # the overlap rule: no Value Fetcher head is also in the Position Transmitter list
    transmitters = {s.component for s in circuit.group("Position Transmitter").heads}
    assert not {s.component for s in circuit.group("Value Fetcher").heads} & transmitters
    # each edge through the input the authors patch
    assert [(g.receivers, g.input) for g in circuit.groups] == [
        (None, "out"), ("Value Fetcher", "q"), ("Position Transmitter", "v"), ("Position Detector", "v")]


def test_minimality_prunes_the_discovered_circuit_to_the_ground_truth(positional, tmp_path):
    handle, circuit = positional
    circuit = circuit.retake({name: 3 for name in POSITIONAL})   # the planted head and 2 others per group: fast
    assert [len(g.heads) for g in circuit.groups] == [2, 3, 3, 0]  # the overlap rule removed one Value Fetcher
    means = M.whole_sequence_means(handle, [_noise(handle, "random", 48, 2)])
    pruned = prune_circuit(handle, circuit, [_noise(handle, "random", 24, 3)], means, progress=False)
    assert pruned.as_groups() == POSITIONAL
    assert all(row["score"] >= 0.01 for s, row in pruned.minimality.items() if s in pruned.sites())
    path = tmp_path / "circuit.json"
    pruned.save(path)
    loaded = Circuit.load(path)
    assert loaded.as_groups() == pruned.as_groups() and loaded.step_scores == pruned.step_scores
    assert loaded.minimality == pruned.minimality and loaded.config == pruned.config
    assert loaded.group("Position Detector").scores == pruned.group("Position Detector").scores


def test_with_the_authors_noise_and_a_floor_the_schedule_returns_exactly_the_ground_truth(builtin_model):
    handle = builtin_model("planted:positional")
    circuit = discover_circuit(handle, [_noise(handle, "absent_query", 12, 4)], min_effect=0.05, progress=False)
    assert circuit.as_groups() == POSITIONAL


def test_on_planted_strong_the_authors_schedule_misses_the_binder(builtin_model):
    handle = builtin_model("planted:strong")
    circuit = discover_circuit(handle, [_noise(handle, "random", 12, 5)], min_effect=0.05, progress=False)
    assert circuit.as_groups() == {"Value Fetcher": [Site(planted.FETCHER, "last")],
                                   "Position Transmitter": [Site(planted.MOVER, "last")],  # the query-label mover
                                   "Position Detector": [], "Structure Reader": []}
    assert not any(Site(planted.BINDER, "prev_query_label") in scores for scores in circuit.step_scores.values())


def test_a_schedule_with_a_step_into_the_fetchers_value_finds_strongs_whole_circuit(builtin_model):
    handle = builtin_model("planted:strong")
    circuit = discover_circuit(handle, [_noise(handle, "absent_query", 12, 6)], LABEL_SCHEDULE, min_effect=0.05,
                               progress=False)
    assert circuit.sites() == sorted(planted_working_sites("strong"))
    assert circuit.as_groups() == {"Value Fetcher": [Site(planted.FETCHER, "last")],
                                   "Query-label Mover": [Site(planted.MOVER, "last")],
                                   "Object Binder": [Site(planted.BINDER, "prev_query_label")]}
    assert [(g.receivers, g.input) for g in circuit.groups[1:]] == [("Value Fetcher", "q"), ("Value Fetcher", "v")]


def test_bad_schedules_are_refused(builtin_model):
    with pytest.raises(ValueError, match="reaches group 'B', which no earlier step finds"):
        check_schedule([Step("A", "last"), Step("C", "last", "B", "q")])
    with pytest.raises(ValueError, match="the logits, which have no 'v' input"):
        check_schedule([Step("A", "last", None, "v")])
    with pytest.raises(ValueError, match="found by two steps"):
        check_schedule([Step("A", "last"), Step("A", "last", "A", "q")])
    with pytest.raises(ValueError, match="unknown input 'x'"):
        check_schedule([Step("A", "last"), Step("B", "last", "A", "x")])
    handle = builtin_model("planted:strong")
    with pytest.raises(ValueError, match="overlap rule .* names a group the schedule does not find"):
        discover_circuit(handle, [_noise(handle, "random", 2, 7)], LABEL_SCHEDULE,
                         overlap=[("Value Fetcher", "Position Transmitter")])


def test_rank_first_candidates_keep_the_planted_heads_and_the_schedule_on_them_finds_them(builtin_model):
    handle = builtin_model("planted:positional")
    batch = _noise(handle, "absent_query", 12, 5)
    ranked = rank_first_candidates(handle, [batch], k=2)
    assert sorted(ranked) == sorted({s.position for s in AUTHORS_SCHEDULE})
    assert all(len(rows) == 2 for rows in ranked.values())
    candidates = [s for rows in ranked.values() for s, _ in rows]
    assert {s for sites in POSITIONAL.values() for s in sites} <= set(candidates)
    circuit = discover_circuit(handle, [batch], candidates=candidates, min_effect=0.05, progress=False)
    assert circuit.as_groups() == POSITIONAL
    assert set(circuit.config["candidates"]) == {str(s) for s in candidates}


def test_rank_first_candidates_need_at_least_one_head(builtin_model):
    handle = builtin_model("planted:positional")
    with pytest.raises(ValueError, match="rank-first needs k >= 1 heads per position, got 0"):
        rank_first_candidates(handle, [_noise(handle, "absent_query", 4, 6)], k=0)
