"""The paper pair (planted:paper-base and its fine-tune planted:paper-ft) has Prakash et al.'s four groups, and every
step of the paper's pipeline finds what `lib.builtin.planted.ground_truth` says it should.

Every number is measured on fresh prompts through real nnsight traces with the project's own methods (through the
functions workflows/measure_planted.py uses to write docs/PLANTED.md); nothing is taken from the builder. Bands
and thresholds are the documented ones (docs/PLANTED.md, "The paper pair").
"""
import random

import pytest
import torch

from lib import metrics
from lib.attention import attention_weights
from lib.builtin import planted
from lib.builtin.circuits import documented_circuit, planted_circuit
from lib.data_gen import ENTITY_DESIDERATA, random_entity_prompt
from lib.types import Component, Site
from workflows.measure_planted import (circuit_evaluation, group_dcm, pair_cmap, pair_path_patching, patching_table,
                                       prompt_batch, random_prompt_accuracy)

BASE, FT = planted.PAIR
GROUP_NAMES = ("Value Fetcher", "Position Transmitter", "Position Detector", "Structure Reader")
BASE_BANDS = {3: (0.72, 0.90), 5: (0.60, 0.80), 7: (0.55, 0.75)}   # docs/PLANTED.md (measured 0.81, 0.71, 0.65)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one intra-op thread is faster (tests/conftest.py)


@pytest.fixture(scope="module")
def pair(builtin_model):
    """{"paper-base": handle, "paper-ft": handle} (the session's shared copies)."""
    return {v: builtin_model(f"planted:{v}") for v in planted.PAIR}


def test_the_pair_builds_deterministically_and_differs_only_in_the_pointer_fetchers_query_key():
    base_a, tok = planted.build(BASE)
    base_b, _ = planted.build(BASE)
    ft, ft_tok = planted.build(FT)
    for (name, a), b in zip(base_a.state_dict().items(), base_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert base_a.config.model_type == ft.config.model_type == "gpt2"
    assert (base_a.config.n_layer, base_a.config.n_head, base_a.config.n_embd) == planted.PAIR_SIZES
    assert tok.get_vocab() == ft_tok.get_vocab() == planted.build_tokenizer().get_vocab()
    # The fine-tune changes the query and key columns of the pointer fetcher, nothing else.
    fetcher = planted.ground_truth(BASE)["fine_tune"]["changed"]
    assert fetcher == [str(planted.VALUE_FETCHER)]
    d_model, d_head = base_a.config.n_embd, base_a.config.n_embd // base_a.config.n_head
    layer, head = planted.VALUE_FETCHER.layer, planted.VALUE_FETCHER.head
    qk = torch.zeros(3 * d_model, dtype=torch.bool)
    for part in (0, 1):  # q, k
        qk[part * d_model + head * d_head: part * d_model + (head + 1) * d_head] = True
    changed = {name for (name, a), b in zip(base_a.state_dict().items(), ft.state_dict().values())
               if not torch.equal(a, b)}
    assert changed == {f"transformer.h.{layer}.attn.c_attn.weight", f"transformer.h.{layer}.attn.c_attn.bias"}
    weight_a = base_a.transformer.h[layer].attn.c_attn.weight
    weight_b = ft.transformer.h[layer].attn.c_attn.weight
    assert torch.equal(weight_a[:, ~qk], weight_b[:, ~qk]) and not torch.equal(weight_a[:, qk], weight_b[:, qk])


def test_the_saved_copy_ndif_serves_gives_the_same_answers(pair, tmp_path):
    """ndif/make_models.save_planted writes the directory a self-hosted NDIF serves; loaded back with
    lib.models.load_model it gives the built model's logits."""
    from lib.data_gen import encode_answers
    from lib.models import load_model
    from lib.patching import clean_logits
    from ndif.make_models import PLANTED, save_planted

    assert set(planted.PAIR) <= set(PLANTED)
    saved = load_model(str(save_planted(tmp_path, FT)))
    batch = encode_answers(_prompts(5, 12, 3), saved.tokenizer)
    assert torch.allclose(clean_logits(saved, batch.original), clean_logits(pair[FT], batch.original), atol=1e-5)


@pytest.mark.parametrize("variant", planted.PAIR)
def test_ground_truth_has_the_papers_four_groups(pair, variant):
    truth = planted.ground_truth(variant)
    arch = pair[variant].arch
    assert truth["name"] == f"planted:{variant}" and set(truth["patching"]) == set(ENTITY_DESIDERATA)
    for entry in truth["circuit"]:
        assert {"component", "role", "group", "position", "attends_to", "writes"} <= set(entry)
        Component.parse(entry["component"]).check(arch)
    assert len(truth["distractors"]) + len(truth["circuit"]) == arch.n_layers * arch.n_heads
    groups = planted_circuit(variant, n_boxes=7)
    assert tuple(groups) == GROUP_NAMES
    assert documented_circuit(f"planted:{variant}") == groups
    expected_positions = {"Value Fetcher": "last", "Position Transmitter": "last", "Position Detector": "query_label",
                          "Structure Reader": "prev_query_label"}
    for name, sites in groups.items():
        assert len(sites) == 2 and {s.position for s in sites} == {expected_positions[name]}
        assert [str(s.component) for s in sites] == truth["groups"][name]["heads"]
    order = [[s.component.layer for s in groups[name]] for name in reversed(GROUP_NAMES)]
    assert all(max(lower) < min(upper) for lower, upper in zip(order, order[1:]))  # D before C before B before A
    assert set(truth["dcm"]) == set(GROUP_NAMES)


def test_accuracy_is_in_the_documented_bands_and_the_fine_tune_is_better(pair):
    base = {k: random_prompt_accuracy(pair[BASE], k, n=200, seed=1234 + k) for k in (3, 5, 7)}
    ft = {k: random_prompt_accuracy(pair[FT], k, n=200, seed=1234 + k) for k in (3, 5, 7)}
    assert all(lo <= base[k] <= hi for k, (lo, hi) in BASE_BANDS.items()), base
    assert base[3] > base[7]  # more boxes, more objects the blunt fetcher can prefer
    assert all(a >= 0.97 for a in ft.values()), ft
    assert ft[7] - base[7] >= 0.15


def _prompts(n_boxes, n, seed):
    rng = random.Random(seed)
    return [random_entity_prompt(rng, n_boxes) for _ in range(n)]


@pytest.mark.parametrize("variant", planted.PAIR)
def test_each_head_attends_where_ground_truth_says(pair, variant):
    """Eager attention (lib.attention): every circuit head at its position puts > 0.95 of its attention on the
    documented token; the Structure Readers do so at every box label. The exception by design is paper-base's
    blunt pointer fetcher, whose per-object preference competes with the pointer: it still gives the correct object
    more than twice the uniform share 1 / n_boxes on average (measured 0.79 / 0.52 at 3 / 7 boxes)."""
    handle = pair[variant]
    for n_boxes in (3, 7):
        weights, encoded = attention_weights(handle, _prompts(n_boxes, 40, 99 + n_boxes))
        rows, pos = torch.arange(encoded.size), encoded.positions
        for entry in planted.ground_truth(variant)["circuit"]:
            comp = Component.parse(entry["component"])
            pairs = [(entry["position"], entry["attends_to"])]
            if entry["group"] == "Structure Reader":
                pairs += [(f"label_{i}", f"object_{i}") for i in range(n_boxes)]
            for query, key in pairs:
                w = weights[comp.layer][rows, comp.head, pos[query], pos[key]]
                if variant == BASE and comp == planted.VALUE_FETCHER:
                    assert w.mean() > 2 / n_boxes, (comp, n_boxes, w.mean())
                else:
                    assert w.min() > 0.95, (entry["component"], query, key, w.min())


@pytest.mark.parametrize("desideratum", ENTITY_DESIDERATA)
@pytest.mark.parametrize("variant", planted.PAIR)
def test_single_head_patching_matches_the_ground_truth_table(pair, variant, desideratum):
    """lib.patching.patching_scan of every head and MLP alone at last / query_label / prev_query_label, on triples
    the model answers correctly: only the ground-truth heads move the output to the target. paper-ft: >= 0.95 vs
    <= 0.05. paper-base's blunt fetcher reads every patch less reliably (>= 0.3), and where a patch breaks its
    inputs it lands on the target now and then by chance (<= 0.2; docs/PLANTED.md), so it gets more triples."""
    handle = pair[variant]
    table = patching_table(handle, desideratum, n=21 if variant == FT else 42, seed=7, correct_only=True)
    expected = planted.ground_truth(variant)["patching"][desideratum]
    assert set(table) == set(expected)
    hit, miss = (0.95, 0.05) if variant == FT else (0.3, 0.2)
    for position, components in table.items():
        assert len(components) == handle.arch.n_layers * (handle.arch.n_heads + 1)
        for comp, moved in components.items():
            if comp in expected[position]:
                assert moved >= hit, (comp, position, table)
            else:
                assert moved <= miss, (comp, position, moved)


@pytest.mark.parametrize("variant", planted.PAIR)
def test_the_circuit_is_faithful_random_circuits_are_not_and_each_group_is_needed(pair, variant):
    """lib.metrics with whole-sequence mean ablation (Prakash et al.'s Table 1) at 7 boxes: the four groups alone
    keep the accuracy, random circuits with the same per-position head counts lose it, removing A, B or C breaks
    the model, and the circuit is complete (removing a group costs it what it costs the model)."""
    row = circuit_evaluation(pair[variant], variant, n_boxes=7, n=42, seed=5, n_random=3)
    assert row["faithfulness"] >= 0.95, row
    assert max(row["random circuits"]) <= 0.2, row
    groups = row["groups"]
    for name in ("Value Fetcher", "Position Transmitter", "Position Detector"):
        assert groups[name]["circuit without"] <= 0.3, (name, row)
    assert all(g["completeness"] <= 0.05 for g in groups.values()), row


@pytest.mark.parametrize("variant", planted.PAIR)
def test_the_structure_reader_matters_only_where_the_pointer_fetch_is_blunt(pair, variant):
    """Mean-ablating Group D silences the bound-object fetcher L3H0, which rescues the base's blunt pointer fetch
    now and then (measured 0.650 -> 0.607 at 7 boxes) and never changes the sharp fine-tune's answer. Ablation
    can only lose those rescues, so the base's accuracy drops; many prompts make the drop visible."""
    handle = pair[variant]
    evals = [prompt_batch(handle.tokenizer, 7, 210, seed=8)]
    means = metrics.whole_sequence_means(handle, [prompt_batch(handle.tokenizer, 7, 105, seed=9)])
    full = metrics.model_accuracy(handle, evals, means)
    without = metrics.model_accuracy(handle, evals, means, without=planted_circuit(variant, 7)["Structure Reader"])
    if variant == BASE:
        assert full - 0.12 <= without <= full - 0.01, (full, without)
    else:
        assert without == full == 1.0, (full, without)


def test_cmap_of_the_value_fetcher_gives_the_base_the_fine_tunes_accuracy(pair):
    """lib.cmap.cmap_scores (same input; paper-ft's outputs written into paper-base): the Value Fetcher group (and
    its pointer head alone) lifts the base to the fine-tune's accuracy; the other groups, identical in both
    models, change nothing."""
    row = pair_cmap(pair[BASE], pair[FT], n_boxes=7, n=100, seed=21)
    assert row["donor"] - row["none"] >= 0.15, row
    for name in ("Value Fetcher", "circuit", f"{planted.VALUE_FETCHER}@last only"):
        assert row[name] == row["donor"], (name, row)
    for name in ("Position Transmitter", "Position Detector", "Structure Reader", f"{planted.BOUND_FETCHER}@last only"):
        assert abs(row[name] - row["none"]) <= 0.02, (name, row)


# DCM per group (their Table A2 setting). Carriers: the group's heads whose patching raises the target logit.
DCM_CASES = [("Value Fetcher", "object"), ("Position Transmitter", "position"), ("Position Detector", "position"),
             ("Position Transmitter", "object"), ("Structure Reader", "object"), ("Structure Reader", "label"),
             ("Structure Reader", "position")]


@pytest.mark.parametrize("group,desideratum", DCM_CASES)
def test_dcm_restricted_to_a_group_patches_the_heads_ground_truth_says(pair, group, desideratum):
    """On paper-base (where the paper runs DCM): the final weights patch exactly the ground-truth carriers (the
    Value Fetcher's two heads for Object; only the pointer heads of B and C for Position, not their bound-object
    heads), and where a group carries nothing no mask reaches the target (the Structure Reader: none of Object,
    Label, Position, as in the paper)."""
    carriers = planted.ground_truth(BASE)["dcm"][group][desideratum]
    result = group_dcm(pair[BASE], group, desideratum, n_train=48, n_val=24, seed=3)
    if carriers:
        assert result["final"] == sorted(carriers), result
        assert set(result["selected"]) <= set(carriers) and result["val_accuracy"] >= 0.5, result
    else:
        assert result["val_accuracy"] <= 0.15, result


@pytest.mark.slow
def test_dcm_on_the_fine_tune_prunes_the_weaker_value_fetcher(pair):
    """paper-ft: both value fetchers carry the object (final weights), but the pointer head alone outvotes the
    other (FETCH_SHARE), so the validated, pruned mask keeps only it."""
    result = group_dcm(pair[FT], "Value Fetcher", "object", n_train=48, n_val=24, seed=3)
    assert result["final"] == sorted(planted.ground_truth(FT)["dcm"]["Value Fetcher"]["object"]), result
    assert result["selected"] == [str(planted.VALUE_FETCHER)] and result["val_accuracy"] >= 0.95, result


def test_path_patching_finds_the_four_groups_step_by_step(pair):
    """lib.path_patching on paper-base, the authors' schedule (top 2 of each step become the next step's
    receivers): logits <- A at the last token <- B at the last token <- C at the query label <- D at the previous
    query label. The decoys (L1H1 attends like the detectors, L3H1 like the pointer fetcher) score nothing."""
    steps = pair_path_patching(pair[BASE], n=21, seed=4)
    truth = planted.ground_truth(BASE)["groups"]
    for step, group in zip("ABCD", GROUP_NAMES):
        ranked = steps[step]
        expected = {str(Site(Component.parse(h), truth[group]["position"])) for h in truth[group]["heads"]}
        assert {s for s, _ in ranked[:2]} == expected, (step, ranked[:4])
        assert all(v <= -0.05 for _, v in ranked[:2]) and all(abs(v) < 0.01 for _, v in ranked[2:]), (step, ranked)
