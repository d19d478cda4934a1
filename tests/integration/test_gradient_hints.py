"""Gradient hints: the wrong answer is chosen as documented, the norms equal a plain-PyTorch gradient, and on the
planted models the circuit's heads (at the positions where they work) get hints above every distractor."""
import random

import pytest
import torch

from bench import plain_hooks
from lib.builtin import planted
from lib.builtin.circuits import planted_working_sites
from lib.builtin.random_models import random_model
from lib.core.components import all_components
from lib.data.encoding import answer_token_id
from lib.data.entity import OBJECTS
from lib.data_gen import encode_answers, random_entity_prompt
from lib.gradient_hints import choose_wrong, gradient_hints, hints_heatmap
from lib.models import load_model
from lib.patching import sites_at
from lib.types import Component, PairBatch, Site

POSITIONS = ("last", "query_label", "prev_query_label")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _answers(tokenizer, n=16, n_boxes=5, seed=0):
    rng = random.Random(seed)
    return encode_answers([random_entity_prompt(rng, n_boxes) for _ in range(n)], tokenizer)


def test_choose_wrong_follows_its_definitions():
    unembedding = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
    logits = torch.tensor([[5.0, 1.0, 0.5, -2.0, 3.0, -1.0],
                           [0.0, 4.0, 1.0, 2.0, -3.0, 0.7]])
    targets = torch.tensor([0, 3])
    # lowest logit, never the target: row 0 -> token 3 (-2.0); row 1 -> token 4 (-3.0)
    assert choose_wrong(unembedding, logits, targets, "lowest_logit").tolist() == [3, 4]
    # lowest cosine with the target's row: row 0 -> tokens 2 and 5 tie at -1, token 5 has the lower logit;
    # row 1 (target [0, 1]): every other row has cosine 0 except token 1 (0.11): the lowest logit among the tied
    assert choose_wrong(unembedding, logits, targets, "most_dissimilar").tolist() == [5, 4]
    # restricted to candidates
    assert choose_wrong(unembedding, logits, targets, "lowest_logit", candidates=[1, 2, 3]).tolist() == [3, 2]
    with pytest.raises(ValueError, match="no wrong answer left"):
        choose_wrong(unembedding, logits, torch.tensor([1, 1]), "lowest_logit", candidates=[1])


def test_hints_equal_the_plain_pytorch_gradient_norm(word_tokenizer):
    """||d(logit[target] - logit[wrong]) / dv|| per site from hooks that keep each row's gradient (no nnsight)."""
    module = random_model("llama", vocab_size=len(word_tokenizer), n_layers=3, n_heads=4, d_model=64, seed=3)
    handle = load_model(module, tokenizer=word_tokenizer)
    batch = _answers(word_tokenizer, n=6, n_boxes=3)
    sites = [Site(Component(0, 1), "query_label"), Site(Component(1, 3)), Site(Component(2)),
             Site(Component(1, 0), "prev_query_label")]
    wrong = word_tokenizer.convert_tokens_to_ids("box")
    hints = gradient_hints(handle, [batch], sites, wrong="box")
    leaves = {}

    def make_leaf(kind, layer):
        def swap(x):
            if x.requires_grad:      # downstream of an earlier kept row: keep the graph, retain this gradient
                x.retain_grad()
            else:                    # nothing upstream carries a gradient: a leaf cuts nothing
                x = x.detach().requires_grad_(True)
            leaves[(kind, layer)] = x
            return x
        return plain_hooks._hook(module, handle.arch, kind, layer, swap)

    hooks = [make_leaf(s.component.kind, s.component.layer) for s in sites]
    try:
        with torch.enable_grad():
            logits = plain_hooks._forward(module, batch.original)
            rows = torch.arange(batch.size)
            (logits[rows, batch.target_ids] - logits[rows, wrong]).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    expected = []
    for s in sites:
        grad = leaves[(s.component.kind, s.component.layer)].grad[rows, batch.original.positions[s.position]]
        cols = handle.arch.head_slice(s.component.head) if s.component.is_head else slice(None)
        expected.append(grad[:, cols].norm(dim=-1).mean())
    assert torch.allclose(hints, torch.stack(expected), atol=1e-6), (hints, expected)
    assert hints.min() > 1e-4


@pytest.mark.parametrize("variant", ["strong", "positional"])
def test_hints_point_at_the_planted_circuit_above_every_distractor(builtin_model, variant):
    """Each circuit head at its working position (lib.builtin.circuits.planted_working_sites) gets a larger hint
    than every distractor head at every position, for every way of choosing the wrong answer and both losses.
    Measured: circuit >= 0.64, distractors <= 0.0016 (strong) / 0.0008 (positional)."""
    handle = builtin_model(f"planted:{variant}")
    batch = _answers(handle.tokenizer)
    sites = [s for p in POSITIONS for s in sites_at(all_components(handle.arch, mlps=False), p)]
    working = planted_working_sites(variant)
    distractors = [s for s in sites if str(s.component) in planted.ground_truth(variant)["distractors"]]
    objects = [answer_token_id(handle.tokenizer, " " + o) for o in OBJECTS if o in handle.tokenizer.get_vocab()]
    for wrong, candidates in (("most_dissimilar", None), ("most_dissimilar", objects), ("lowest_logit", objects),
                              ("box", None)):
        for loss in ("margin", "cross_entropy"):
            hints = dict(zip(sites, gradient_hints(handle, [batch], sites, wrong=wrong, loss=loss,
                                                   candidates=candidates).tolist()))
            lowest_circuit = min(hints[s] for s in working)
            highest_distractor = max(hints[s] for s in distractors)
            assert lowest_circuit > 10 * highest_distractor, (wrong, loss, lowest_circuit, highest_distractor)


def test_hint_errors_and_heatmap(builtin_model, tmp_path):
    handle = builtin_model("planted:strong")
    batch = _answers(handle.tokenizer, n=4)
    sites = sites_at(all_components(handle.arch), "last")
    answer = handle.tokenizer.convert_ids_to_tokens(int(batch.target_ids[0]))
    with pytest.raises(ValueError, match="is the target of some examples"):
        gradient_hints(handle, [batch], sites, wrong=answer)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gradient_hints(handle, [batch], sites, wrong=10_000)
    with pytest.raises(ValueError, match="loss="):
        gradient_hints(handle, [batch], sites, loss="hinge")
    with pytest.raises(ValueError, match="wrong="):
        gradient_hints(handle, [batch], sites, wrong=None)
    with pytest.raises(ValueError, match="neither a choice .* is 3 tokens"):
        gradient_hints(handle, [batch], sites, wrong="most-dissimilar")
    with pytest.raises(ValueError, match="neither a choice"):
        gradient_hints(handle, [batch], sites, wrong="zebra")   # one token, but the unknown one
    with pytest.raises(ValueError, match="scores against target tokens"):
        gradient_hints(handle, [PairBatch(batch.original)], sites)
    with pytest.raises(ValueError, match="at least one batch"):
        gradient_hints(handle, [], sites)
    hints = gradient_hints(handle, [batch], sites)
    path = hints_heatmap(tmp_path / "hints.png", handle, sites, hints, "last")
    assert path.exists() and path.stat().st_size > 1000
