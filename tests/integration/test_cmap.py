"""Cross-model activation patching (lib.cmap) on real models: planted ground truth, an exact sanity check, errors,
and the toy entity models' base <- fine-tuned measurement (docs/CMAP.md)."""
from __future__ import annotations

import random

import pytest
import torch

from lib.builtin import planted, toy
from lib.builtin.circuits import toy_cmap_groups
from lib.cmap import IncompatibleModels, check_compatible, cmap_accuracy, cross_model_patch
from lib.core.components import all_components
from lib.data_gen import encode_answers, random_entity_prompt
from lib.models import load_model
from lib.patching import clean_logits, is_token_position, with_token_positions
from lib.types import Component, Site


def _prompts(n: int, n_boxes, seed: int):
    rng = random.Random(seed)
    counts = n_boxes if isinstance(n_boxes, tuple) else (n_boxes,)
    return [random_entity_prompt(rng, k) for k in counts for _ in range(n // len(counts))]


@pytest.fixture(scope="module")
def models(builtin_model):
    return builtin_model


def test_strong_value_fetcher_restores_the_weak_model_and_the_shared_mover_changes_nothing(models):
    """planted:strong and planted:weak differ only in the value fetcher L2H3's query/key weights (ground truth)."""
    strong, weak = models("planted:strong"), models("planted:weak")
    truth = planted.ground_truth("weak")
    fetcher = Component.parse(truth["desiderata"]["object"][0])   # the value fetcher, at the last token
    assert fetcher == planted.FETCHER == Component(2, 3)
    groups = {"fetcher": [Site(fetcher, "last")], "mover": [Site(planted.MOVER, "last")]}
    acc = cmap_accuracy(weak, strong, _prompts(240, (3, 5, 7), seed=11), groups, batch_size=80)
    assert acc["donor"] >= 0.99
    assert 0.45 <= acc["none"] <= 0.85                      # the weak model alone (~0.6)
    assert acc["fetcher"] >= 0.99
    assert abs(acc["mover"] - acc["none"]) <= 0.01          # L1H2 is the same head in both models


def _hybrid_receiver():
    """toy:entity-base whose embedding, attention output projections, final norm and unembedding are entity-ft's.

    Its heads and MLPs (q/k/v, their norms, the MLP weights) stay the base's. Patching the o_proj inputs of every
    head and the outputs of every MLP at every token makes each residual stream exactly entity-ft's, so the logits
    must be entity-ft's. With the plain base that cannot hold: its own embedding, o_proj (which maps the patched
    head outputs into the stream), final norm and unembedding differ from the fine-tune's.
    """
    base, tok = toy.load("entity-base")
    ft, _ = toy.load("entity-ft")
    outside = {k: v for k, v in ft.state_dict().items()
               if "o_proj" in k or "embed_tokens" in k or k.startswith("model.norm") or k.startswith("lm_head")}
    base.load_state_dict(outside, strict=False)
    return load_model(base, tokenizer=tok)


def test_patching_every_head_and_mlp_at_every_token_gives_the_donors_logits(models):
    donor, plain_base = models("toy:entity-ft"), models("toy:entity-base")
    receiver = _hybrid_receiver()
    batch = with_token_positions(encode_answers(_prompts(16, 7, seed=3), donor.tokenizer))
    columns = [p for p in batch.original.positions if is_token_position(p)]
    assert len(columns) == batch.original.width
    sites = [Site(c, p) for p in columns for c in all_components(receiver.arch)]
    target = clean_logits(donor, batch.original)
    assert not torch.allclose(clean_logits(receiver, batch.original), target, atol=1e-1)  # the hybrid alone is another model

    torch.testing.assert_close(cross_model_patch(receiver, donor, batch, sites), target, atol=1e-4, rtol=0)
    # The last token's residual stream is its embedding plus its own heads' (through o_proj) and MLPs' outputs, so
    # the last column alone already fixes the logits; leave out any one of its components and they differ.
    last = [s for s in sites if s.position == columns[-1]]
    assert len(last) == len(all_components(receiver.arch))
    torch.testing.assert_close(cross_model_patch(receiver, donor, batch, last), target, atol=1e-4, rtol=0)
    for left_out in (Site(Component(1, 0), columns[-1]), Site(Component(2), columns[-1])):
        partial = [s for s in last if s != left_out]
        assert not torch.allclose(cross_model_patch(receiver, donor, batch, partial), target, atol=1e-2), left_out
    # and the plain base, whose embedding / o_proj / norm / unembedding are its own, does not become the donor
    assert not torch.allclose(cross_model_patch(plain_base, donor, batch, last), target, atol=1e-2)


def test_incompatible_models_and_bad_requests_raise_clear_errors(models):
    base, planted_model = models("toy:entity-base"), models("planted:strong")
    with pytest.raises(IncompatibleModels, match="architectures differ.*n_heads: 2 vs 4"):
        check_compatible(base, planted_model)
    batch = encode_answers(_prompts(4, 3, seed=0), base.tokenizer)
    with pytest.raises(IncompatibleModels, match="architectures differ"):
        cross_model_patch(base, planted_model, batch, [Site(Component(0, 0), "last")])

    module, _ = toy.load("entity-base")   # same weights and sizes, another tokenizer
    other_vocab = load_model(module, tokenizer=planted.build_tokenizer())
    with pytest.raises(IncompatibleModels, match="tokenizer vocabularies differ"):
        cmap_accuracy(base, other_vocab, _prompts(4, 3, seed=0), {"g": [Site(Component(0, 0), "last")]})

    ft = models("toy:entity-ft")
    with pytest.raises(ValueError, match="reserved"):
        cmap_accuracy(base, ft, _prompts(4, 3, seed=0), {"none": [Site(Component(0, 0), "last")]})
    with pytest.raises(ValueError, match="position 'nowhere' is not defined"):
        cmap_accuracy(base, ft, _prompts(4, 3, seed=0), {"g": [Site(Component(0, 0), "nowhere")]})
    with pytest.raises(ValueError, match="one token length"):
        with_token_positions(encode_answers(_prompts(4, (3, 4), seed=0), base.tokenizer))


def test_toy_fine_tune_improves_the_binding_step_and_controls_change_little(models):
    """toy:entity-base <- toy:entity-ft at 7 boxes (docs/CMAP.md has the 500-prompt table)."""
    base, ft = models("toy:entity-base"), models("toy:entity-ft")
    acc = cmap_accuracy(base, ft, _prompts(200, 7, seed=77), toy_cmap_groups(7), batch_size=100)
    assert acc["none"] <= 0.8 and acc["donor"] >= 0.9
    for group in ("binding head L0H1 @ box labels", "L0H1 @ prev_query_label (queried box only)",
                  "label matching L1H0+L1H1 @ query_label", "mover L2H0+L2H1 @ last",
                  "circuit (the three above, each at its position)"):
        assert acc[group] >= acc["donor"] - 0.05, (group, acc)
    for group in ("control: L0H0+L0H1 @ last", "control: L0H0+L0H1 @ query_label"):
        assert abs(acc[group] - acc["none"]) <= 0.03, (group, acc)


def test_cmap_through_query_key_value_inputs(models):
    """planted:paper-ft differs from paper-base only in the pointer fetcher L3H2's query and key weights: its q and k
    at every token written into the base make the base's logits the fine-tune's; its v (the same in both) or the
    q of a head that is the same in both change nothing."""
    from lib.cmap import cmap_input_scores
    from lib.scores import target_hit

    base, ft = models("planted:paper-base"), models("planted:paper-ft")
    batch = with_token_positions(encode_answers(_prompts(40, 5, seed=9), base.tokenizer))
    every_token = [Site(Component(3, 2), p) for p in batch.original.positions if is_token_position(p)]
    scores = cmap_input_scores(base, ft, [batch], {"q,k": every_token}, kinds=("q", "k"))
    assert scores["q,k"] == pytest.approx(float(target_hit(clean_logits(ft, batch.original), batch).mean()))
    unpatched = float(target_hit(clean_logits(base, batch.original), batch).mean())
    assert unpatched < scores["q,k"] - 0.2
    same = cmap_input_scores(base, ft, [batch], {"v": every_token, "other head": [Site(Component(2, 1), "last")]},
                             kinds=("v",))
    assert same["v"] == pytest.approx(unpatched) and same["other head"] == pytest.approx(unpatched)
    with pytest.raises(ValueError, match="only heads have query / key / value inputs"):
        cmap_input_scores(base, ft, [batch], {"mlp": [Site(Component(1), "last")]})
