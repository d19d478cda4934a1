"""The planted models solve entity tracking through the circuit `lib.planted.ground_truth` documents.

Everything here is measured on freshly generated prompts through real nnsight traces; no accuracy is taken from
the builder.
"""
import random

import nnsight
import pytest
import torch

from lib import planted
from lib.components import Component
from lib.data_gen import ENTITY_DESIDERATA, encode_batch, entity_triples, random_entity_prompt
from lib.models import load_model

POSITIONS = ("last", "query_label", "prev_query_label")


@pytest.fixture(scope="module")
def strong():
    return load_model("planted:strong")


@pytest.fixture(scope="module")
def weak():
    return load_model("planted:weak")


def _prompts(n_boxes, n, seed):
    rng = random.Random(seed)
    return [random_entity_prompt(rng, n_boxes) for _ in range(n)]


def _predictions(handle, batch):
    with torch.no_grad(), handle.trace(batch.inputs()):
        logits = handle.arch.unembed(handle.model).output[:, -1].save()
    return logits.argmax(-1)


def _accuracy(handle, n_boxes, n=200, seed=1234):
    batch = encode_batch(_prompts(n_boxes, n, seed + n_boxes), handle.tokenizer)
    return float((_predictions(handle, batch) == batch.answer_ids).float().mean())


def _head_rows(handle, batch):
    """Every layer's head outputs (the input of attn.c_proj), [layer] -> (batch, seq, n_heads * head_dim)."""
    with torch.no_grad(), handle.trace(batch.inputs()):
        rows = nnsight.save([handle.arch.attn_out(handle.model, layer).input for layer in range(handle.arch.n_layers)])
    return rows


def _patch_each_head(handle, original, alternate, alt_rows, layer, position):
    """Predictions with one head of `layer` at `position` replaced by its output on the alternate, for each head.

    The batch is repeated once per head (copy h patches head h), so one trace covers the whole layer.
    """
    n, n_heads = original.input_ids.shape[0], handle.arch.n_heads
    inputs = {k: v.repeat(n_heads, 1) for k, v in original.inputs().items()}
    rows = torch.arange(n)
    with torch.no_grad(), handle.trace(inputs):
        module = handle.arch.attn_out(handle.model, layer)
        x = module.input.clone()
        for head in range(n_heads):
            cols = handle.arch.head_slice(head)
            x[head * n + rows, original.positions[position], cols] = \
                alt_rows[layer][rows, alternate.positions[position], cols]
        module.input = x
        logits = handle.arch.unembed(handle.model).output[:, -1].save()
    return logits.argmax(-1).view(n_heads, n)


def _triple_batches(desideratum, handle, n, seed):
    triples = [t for n_boxes in (3, 5, 7) for t in
               entity_triples(desideratum, n // 3, n_boxes=n_boxes, seed=seed + n_boxes, tokenizer=handle.tokenizer)]
    original = encode_batch([t.original for t in triples], handle.tokenizer, answers=[t.target for t in triples])
    alternate = encode_batch([t.alternate for t in triples], handle.tokenizer)
    return original, alternate


def test_builds_deterministically_as_gpt2_without_training():
    model_a, tok = planted.build("strong")
    model_b, _ = planted.build("strong")
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert model_a.config.model_type == "gpt2"
    assert model_a.lm_head.weight.data_ptr() != model_a.transformer.wte.weight.data_ptr()
    assert tok("Box F contains the apple")["input_ids"] == tok("box f contains the apple")["input_ids"]
    with pytest.raises(ValueError, match="strong, weak"):
        planted.build("medium")


def test_ground_truth_names_real_heads_and_every_desideratum(strong):
    for variant in planted.VARIANTS:
        truth = planted.ground_truth(variant)
        assert set(truth["patching"]) == set(ENTITY_DESIDERATA)
        named = [Component.parse(c["component"]) for c in truth["circuit"]]
        named += [Component.parse(h) for table in truth["patching"].values() for hs in table.values() for h in hs]
        for comp in named:
            comp.check(strong.arch)
        assert len(truth["distractors"]) + len(truth["circuit"]) == strong.arch.n_layers * strong.arch.n_heads


@pytest.mark.parametrize("n_boxes", [3, 5, 7])
def test_strong_model_solves_entity_tracking(strong, n_boxes):
    assert _accuracy(strong, n_boxes) >= 0.99


def test_weak_model_accuracy_is_in_the_documented_band(weak):
    accs = [_accuracy(weak, n_boxes) for n_boxes in (3, 5, 7)]
    assert all(0.45 <= a <= 0.85 for a in accs), accs
    assert accs[0] > accs[2]  # more boxes, more competitors for the blunted fetch


def test_layernorm_only_rescales_and_the_heads_attend_where_documented():
    """LayerNorm cannot break the construction: the stream stays zero-mean, and after LayerNorm each circuit head
    puts its attention on the documented token (measured with eager attention on a plain forward)."""
    model, tok = planted.build("strong")
    model.set_attn_implementation("eager")
    prompts = [p for n_boxes in (3, 5, 7) for p in _prompts(n_boxes, 40, 99 + n_boxes)]
    batch = encode_batch(prompts, tok)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**batch.inputs(), position_ids=position_ids, output_attentions=True, output_hidden_states=True)
    real = batch.attention_mask.bool()
    for hidden in out.hidden_states[:-1]:
        h = hidden[real]
        assert (h.mean(-1).abs() / h.norm(dim=-1)).max() < 1e-5
    rows, pos = torch.arange(len(prompts)), batch.positions
    binder, mover, fetcher = planted.BINDER, planted.MOVER, planted.FETCHER
    att = lambda comp: out.attentions[comp.layer][:, comp.head]  # noqa: E731
    labels = [name for name in pos if name.startswith("label_")]  # boxes every prompt has
    for name in labels:
        obj = pos[name.replace("label_", "object_")]
        assert att(binder)[rows, pos[name], obj].min() > 0.99
    assert att(mover)[rows, pos["last"], pos["query_label"]].min() > 0.99
    assert att(fetcher)[rows, pos["last"], pos["prev_query_label"]].min() > 0.95


@pytest.mark.parametrize("desideratum", ENTITY_DESIDERATA)
def test_activation_patching_reproduces_the_ground_truth_table(strong, desideratum):
    """Each head alone at each position: the planted head moves the output to the target, no other head does."""
    original, alternate = _triple_batches(desideratum, strong, n=30, seed=7)
    assert (_predictions(strong, original) == original.answer_ids).float().mean() == 0  # target != answer
    alt_rows = _head_rows(strong, alternate)
    expected = planted.ground_truth("strong")["patching"][desideratum]
    measured = {}
    for position in POSITIONS:
        for layer in range(strong.arch.n_layers):
            preds = _patch_each_head(strong, original, alternate, alt_rows, layer, position)
            for head in range(strong.arch.n_heads):
                measured[(str(Component(layer, head)), position)] = float((preds[head] == original.answer_ids)
                                                                           .float().mean())
    for (comp, position), moved in measured.items():
        if comp in expected[position]:
            assert moved >= 0.95, (comp, position, measured)
        else:
            assert moved <= 0.05, (comp, position, measured)


def test_patching_the_strong_value_fetcher_into_the_weak_model_restores_accuracy(strong, weak):
    """Cross-model patching: same input to both, strong L2H3 output at the last token written into the weak model."""
    prompts = [p for n_boxes in (3, 5, 7) for p in _prompts(n_boxes, 60, 555 + n_boxes)]
    batch = encode_batch(prompts, strong.tokenizer)
    strong_rows = _head_rows(strong, batch)
    fetcher, rows, last = planted.FETCHER, torch.arange(len(prompts)), batch.positions["last"]
    cols = weak.arch.head_slice(fetcher.head)
    with torch.no_grad(), weak.trace(batch.inputs()):
        module = weak.arch.attn_out(weak.model, fetcher.layer)
        x = module.input.clone()
        x[rows, last, cols] = strong_rows[fetcher.layer][rows, last, cols]
        module.input = x
        logits = weak.arch.unembed(weak.model).output[:, -1].save()
    patched = float((logits.argmax(-1) == batch.answer_ids).float().mean())
    weak_acc = float((_predictions(weak, batch) == batch.answer_ids).float().mean())
    strong_acc = float((_predictions(strong, batch) == batch.answer_ids).float().mean())
    assert weak_acc < 0.85 and strong_acc >= 0.99
    assert patched == strong_acc
