"""Circuit metrics on planted:strong, whose circuit is known (lib.planted.ground_truth)."""
from __future__ import annotations

import pytest
import torch

from lib import metrics as M
from lib.builtin import planted
from lib.builtin.circuits import planted_circuit
from lib.data_gen import encode_answers, encode_pairs, entity_noise_triples, random_entity_prompt
from lib.types import Component, Site

N_BOXES = 3
BINDER = [Site(planted.BINDER, f"label_{i}") for i in range(N_BOXES)]   # at every box label (ground truth)
MOVER = [Site(planted.MOVER, "last")]
FETCHER = [Site(planted.FETCHER, "last")]
CIRCUIT = BINDER + MOVER + FETCHER


@pytest.fixture(scope="module")
def setup(builtin_model):
    handle = builtin_model("planted:strong")
    tok = handle.tokenizer

    def batch(n, seed):
        return encode_pairs(entity_noise_triples(n, n_boxes=N_BOXES, seed=seed, tokenizer=tok), tok)

    means = M.whole_sequence_means(handle, [batch(64, 100)])
    return handle, [batch(40, 0)], means


def test_the_documented_circuit_is_the_ground_truth():
    groups = planted_circuit("strong", N_BOXES)
    assert sorted(s for g in groups.values() for s in g) == sorted(CIRCUIT)


def test_true_circuit_is_faithful_and_random_circuits_are_not(setup):
    handle, batches, means = setup
    result = M.faithfulness(handle, batches, CIRCUIT, means)
    assert result["model"] == 1.0 and result["faithfulness"] >= 0.99
    random_scores = M.random_circuit_accuracy(handle, batches, CIRCUIT, means, n=3)
    assert max(random_scores) <= 0.3
    rand = M.random_circuit(handle, CIRCUIT, seed=1)
    assert sorted(s.position for s in rand) == sorted(s.position for s in CIRCUIT)


def test_ablating_everything_breaks_the_model(setup):
    handle, batches, means = setup
    assert M.circuit_accuracy(handle, batches, FETCHER, means) <= 0.3   # the fetcher alone has nothing to fetch


def test_true_circuit_is_complete_for_each_group(setup):
    handle, batches, means = setup
    for group in (BINDER, MOVER, FETCHER):
        assert M.completeness(handle, batches, CIRCUIT, group, means) <= 0.1, group
    for k in M.random_subsets(CIRCUIT, 2, seed=0):
        assert M.completeness(handle, batches, CIRCUIT, k, means) <= 0.1, k


def test_an_incomplete_circuit_is_caught(setup):
    handle, batches, means = setup
    partial = MOVER + FETCHER + [Site(planted.BINDER, "prev_query_label")]   # binder only where it is read
    # without the mover the fetcher matches a mean label: in the full model the other boxes' objects compete,
    # in the partial circuit only the queried box carries an object
    assert M.completeness(handle, batches, partial, MOVER, means) >= 0.3


def test_minimality_of_the_true_circuit(setup):
    handle, batches, means = setup
    distractor = Site(Component(1, 1), "last")
    scores = M.greedy_minimality(handle, batches, CIRCUIT + [distractor], means, max_k=0)
    assert scores[FETCHER[0]] >= 0.9 and scores[MOVER[0]] >= 0.4
    assert scores[distractor] <= 0.01   # contributes nothing: minimality would prune it


def test_prompts_of_mixed_length_are_refused(setup):
    handle, _, _ = setup
    import random
    rng = random.Random(0)
    mixed = encode_answers([random_entity_prompt(rng, 2), random_entity_prompt(rng, 3)], handle.tokenizer)
    with pytest.raises(ValueError, match="one token length"):
        M.whole_sequence_means(handle, [mixed])


def test_the_authors_minimality_keeps_every_planted_head_and_drops_a_distractor(setup):
    handle, batches, means = setup
    distractor = Site(Component(1, 1), "last")   # attends to objects, writes to a scratch subspace nothing reads
    groups = {"binder": BINDER, "mover": MOVER + [distractor], "fetcher": FETCHER}
    rows = M.minimality(handle, batches, groups, means)
    assert M.minimal_sites(rows) == sorted(CIRCUIT)
    assert rows[distractor]["score"] == pytest.approx(0.0, abs=1e-9)
    assert rows[FETCHER[0]]["score"] > 1 and rows[MOVER[0]]["score"] > 0.5
    # one box's binder matters only when that box is queried: about 1/3 of the prompts here
    assert all(0.1 < rows[s]["score"] for s in BINDER)
    assert all(len(row["K"]) <= 1 for row in rows.values())   # K: at most ceil(0.3 * group size) = 1 here
    assert rows[distractor]["K"] == []   # removing the mover costs as much with or without the distractor


def test_one_pass_ablation_equals_patching_every_other_head_at_every_token(setup):
    """ablated_logits blends through a (example, token, head) mask in one pass; the same run built from the patching
    primitives (every head at every absolute token except the circuit's, replaced by its mean) agrees."""
    from lib.patching import expand_values, patched_logits, with_token_positions

    handle, batches, means = setup
    batch = batches[0]
    one_query = batch.select(torch.nonzero(batch.original.positions["prev_query_label"]
                                           == batch.original.positions["prev_query_label"][0]).flatten())
    index = {name: int(v[0]) for name, v in one_query.original.positions.items()}
    absolute = {Site(s.component, f"t{index[s.position]}") for s in CIRCUIT}
    sites = [s for s in M.head_sites(handle, one_query.original.width) if s not in absolute]
    original = with_token_positions(one_query).original
    expected = patched_logits(handle, original, sites, expand_values({s.row_key: means[s.row_key] for s in sites},
                                                                     original.size))
    assert torch.allclose(M.ablated_logits(handle, one_query, CIRCUIT, means), expected, atol=1e-5)
    removed = [MOVER[0], Site(Component(0, 3), "query_label")]
    kept_out = [Site(s.component, f"t{index[s.position]}") for s in removed]
    expected = patched_logits(handle, original, kept_out, expand_values({s.row_key: means[s.row_key]
                                                                         for s in kept_out}, original.size))
    assert torch.allclose(M.ablated_logits(handle, one_query, None, means, ablate=removed), expected, atol=1e-5)


def test_circuit_evaluation_is_the_separate_metrics_in_one_call(setup):
    handle, batches, means = setup
    groups = {"binder": BINDER, "fetcher": FETCHER}
    table = M.circuit_evaluation(handle, batches, CIRCUIT, means, groups, n_random=3, n_subsets=2, seed=4)
    assert {k: table[k] for k in ("model", "circuit", "faithfulness")} == M.faithfulness(handle, batches, CIRCUIT,
                                                                                           means)
    assert table["random_circuits"] == M.random_circuit_accuracy(handle, batches, CIRCUIT, means, n=3, seed=4)
    assert table["completeness_per_group"] == {g: M.completeness(handle, batches, CIRCUIT, k, means)
                                               for g, k in groups.items()}
    assert table["completeness_random_K"] == [M.completeness(handle, batches, CIRCUIT, k, means)
                                              for k in M.random_subsets(CIRCUIT, 2, seed=4)]
    assert table["faithfulness"] >= 0.99 and max(table["random_circuits"]) <= 0.3
