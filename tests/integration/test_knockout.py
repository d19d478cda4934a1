"""Attention knockout (lib.knockout) on the planted models: each knockout curve drops exactly where the planted
head that reads that token sits (lib.builtin.planted.ground_truth), and the mask edit is the real one per
architecture and attention implementation."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from lib.builtin import planted
from lib.builtin.random_models import random_model
from lib.data_gen import encode_answers, random_entity_prompt
from lib.knockout import block_attention, knockout_curve, knockout_logits
from lib.models import load_model
from lib.patching import clean_logits
from lib.types import Component
from tests.conftest import ARCHITECTURES, GQA

N_BOXES = 5
CHANCE = 1 / N_BOXES


def _batch(handle, n=30, seed=0):
    rng = random.Random(seed)
    return encode_answers([random_entity_prompt(rng, N_BOXES) for _ in range(n)], handle.tokenizer)


def _drops_from(curve: dict, layer: int, ceiling: float = CHANCE) -> None:
    """At most `ceiling` while the knockout covers `layer`, the full model's 1.0 from layer + 1 on."""
    assert all(curve[start] <= ceiling for start in range(layer + 1)), curve
    assert all(curve[start] == 1.0 for start in range(layer + 1, len(curve))), curve


def test_blocking_the_value_fetchers_read_drops_accuracy_from_its_layer_on(builtin_model):
    handle = builtin_model("planted:strong")
    batch = _batch(handle)
    fetcher_layer = planted.FETCHER.layer
    _drops_from(knockout_curve(handle, [batch], "last", "prev_query_label"), fetcher_layer)
    _drops_from(knockout_curve(handle, [batch], "last", "prev_query_label", heads=[planted.FETCHER]), fetcher_layer)
    # the same attention of a distractor, and the fetcher's attention to a token it does not read: nothing
    for heads, to in [([Component(2, 1)], "prev_query_label"), (None, "correct_object")]:
        curve = knockout_curve(handle, [batch], "last", to, heads=heads)
        assert set(curve.values()) == {1.0}, (heads, to, curve)


def test_knockout_curves_follow_the_positional_circuit(builtin_model):
    """planted:positional: the fetcher (layer 2) reads the object, the transmitter (layer 1) the query label, the
    detector (layer 0, at the query label) the label's earlier occurrence. Without the pointer the fetcher's
    query carries no position and it falls back on a fixed preference among the objects: near chance, not at it
    (0.3 on these 30 prompts), hence the looser ceiling there."""
    handle = builtin_model("planted:positional")
    batch = _batch(handle, seed=1)
    _drops_from(knockout_curve(handle, [batch], "last", "correct_object"), planted.FETCHER.layer)
    _drops_from(knockout_curve(handle, [batch], "last", "query_label"), planted.POSITION_TRANSMITTER.layer, 0.5)
    _drops_from(knockout_curve(handle, [batch], "query_label", "prev_query_label"), planted.POSITION_DETECTOR.layer,
                0.5)
    assert set(knockout_curve(handle, [batch], "last", "prev_query_label").values()) == {1.0}  # nobody reads it


def _with_implementation(module, impl, tokenizer):
    module = copy.deepcopy(module)
    module.set_attn_implementation(impl)
    return load_model(module, tokenizer=tokenizer)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_knockout_zeroes_exactly_the_blocked_attention(kind, word_tokenizer):
    """Under eager attention (which returns the weights) the blocked heads' weight on the key token is 0 in the
    first blocked layer and every other weight is the clean one; sdpa gives the same logits as eager."""
    module = random_model(kind, vocab_size=len(word_tokenizer), n_layers=2, n_heads=4, d_model=32,
                          n_kv_heads=2 if kind in GQA else None, seed=2)
    rng = random.Random(3)
    prompts = encode_answers([random_entity_prompt(rng, n) for n in (2, 3, 3)], word_tokenizer).original  # padded
    eager = _with_implementation(module, "eager", word_tokenizer)
    ex = torch.arange(prompts.size)
    rows, cols = prompts.positions["last"], prompts.positions["prev_query_label"]
    weights = {}
    for name, blocked in (("clean", False), ("knocked", True)):
        with torch.no_grad(), eager.trace(prompts.inputs()):
            if blocked:
                block_attention(eager, prompts, 1, [0, 3], "last", "prev_query_label")
            weights[name] = eager.arch.attn(eager.model, 1).output[1].save()
    clean, knocked = weights["clean"], weights["knocked"]
    assert (knocked[ex, :, rows, cols][:, [0, 3]] == 0).all()
    assert (clean[ex, :, rows, cols][:, [0, 3]] > 1e-3).all()   # there was attention to remove
    assert torch.allclose(knocked[:, [1, 2]], clean[:, [1, 2]], atol=1e-6)
    same = torch.ones_like(clean[:, 0], dtype=torch.bool)
    same[ex, rows] = False   # every other query row of the blocked heads is untouched
    assert torch.allclose(knocked[:, [0, 3]][same.unsqueeze(1).expand(-1, 2, -1, -1)],
                          clean[:, [0, 3]][same.unsqueeze(1).expand(-1, 2, -1, -1)], atol=1e-6)
    expected = knockout_logits(eager, prompts, "last", "prev_query_label", start_layer=0)
    assert (expected - clean_logits(eager, prompts)).abs().max() > 1e-5
    if kind in ("gemma2", "gptj"):   # no sdpa in transformers for these: eager is their only mask path
        return
    sdpa = _with_implementation(module, "sdpa", word_tokenizer)
    assert torch.allclose(knockout_logits(sdpa, prompts, "last", "prev_query_label", start_layer=0), expected,
                          atol=1e-5)
    unpadded = prompts.select(torch.tensor([1, 2]))   # same length: sdpa passes no mask, knockout builds one
    assert torch.allclose(knockout_logits(sdpa, unpadded, "last", "prev_query_label"),
                          knockout_logits(eager, unpadded, "last", "prev_query_label"), atol=1e-5)


def test_unsupported_attention_and_impossible_knockouts_are_refused(word_tokenizer):
    module = random_model("llama", vocab_size=len(word_tokenizer), seed=4)
    handle = load_model(module, tokenizer=word_tokenizer)
    prompts = _batch(handle, n=2).original
    with pytest.raises(ValueError, match="'last' comes after 'query_label'"):
        knockout_logits(handle, prompts, "query_label", "last")
    with pytest.raises(ValueError, match="position 'nowhere' is not defined"):
        knockout_logits(handle, prompts, "last", "nowhere")
    with pytest.raises(ValueError, match="blocks heads, not MLPs"):
        knockout_logits(handle, prompts, "last", "query_label", heads=[Component(1)])
    module.config._attn_implementation = "flash_attention_2"   # this test's own model
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*supported: eager, sdpa"):
        knockout_logits(handle, prompts, "last", "query_label")
