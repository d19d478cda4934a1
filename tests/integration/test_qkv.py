"""The adapter's per-head query / key / value inputs are the real ones, for every supported architecture (the way
tests/integration/test_models.py proves the head outputs)."""
import copy

import pytest
import torch

from lib.builtin.random_models import random_model
from lib.core.architectures import QKV_KINDS
from lib.models import load_model
from tests.conftest import ARCHITECTURES, GQA

PROMPTS = ["The apple is in Box F, the cup is in Box Q. Box F contains the", "The key is in Box A. Box A contains the"]
LAYER, HEAD = 1, 3   # under GQA (2 key/value heads for 4 query heads) head 3 reads key/value head 1


def _build(kind, tokenizer):
    module = random_model(kind, vocab_size=len(tokenizer), n_layers=2, n_heads=4, d_model=32,
                          n_kv_heads=2 if kind in GQA else None, seed=1)
    return module, load_model(copy.deepcopy(module), tokenizer=tokenizer)


def _reference(module, arch, enc):
    """Plain forward (position ids as nnsight derives them for left padding): (layer LAYER's head outputs, logits)."""
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    seen = {}
    hook = arch.attn_out(module, LAYER).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        logits = module(**enc, position_ids=position_ids).logits
    finally:
        hook.remove()
    return seen["x"], logits


def _paths(arch, kinds):
    """The distinct projection modules holding `kinds`, in execution order (q before k before v)."""
    return list(dict.fromkeys(arch.qkv_path(k) for k in kinds))


def _zero_input(handle, enc, kind):
    """(layer LAYER's head outputs, logits) with HEAD's `kind` input zeroed through the adapter."""
    arch = handle.arch
    with handle.trace(enc):
        module = arch.qkv_module(handle.model, LAYER, kind)
        out = module.output.clone()
        out[..., arch.qkv_slice(kind, HEAD)] = 0
        module.output = out
        heads = arch.attn_out(handle.model, LAYER).input.save()
        logits = arch.unembed(handle.model).output.save()
    return heads, logits


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("qkv", QKV_KINDS)
def test_zeroing_a_heads_input_equals_zeroing_its_projection_rows(kind, qkv, word_tokenizer):
    module, handle = _build(kind, word_tokenizer)
    arch = handle.arch
    enc = dict(word_tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    heads, logits = _zero_input(handle, enc, qkv)

    edited = copy.deepcopy(module)
    proj = arch.qkv_module(edited, LAYER, qkv)
    cols = arch.qkv_slice(qkv, HEAD)
    if type(proj).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        proj.weight.data[:, cols] = 0
    else:
        proj.weight.data[cols, :] = 0
    if proj.bias is not None:
        proj.bias.data[cols] = 0
    heads_ref, logits_ref = _reference(edited, arch, enc)
    assert torch.allclose(heads, heads_ref, atol=1e-6)
    assert torch.allclose(logits, logits_ref, atol=1e-4)  # as test_models: gemma2 differs by 2e-5 unpatched
    clean, _ = _reference(module, arch, enc)
    # the input mattered (gemma2's small scaled, soft-capped scores move least: 3e-4): the test can fail
    assert (heads - clean)[..., arch.head_slice(HEAD)].abs().max() > 1e-4


def _heads_and_inputs(handle, enc, edit_layer0=False, inputs=None):
    """Layer LAYER's head outputs (o_proj input); optionally with layer 0's attention zeroed (run A), or with
    HEAD's q, k and v at every token written from `inputs` (run B). Also returns HEAD's q, k, v."""
    arch = handle.arch
    read = {}
    with handle.trace(enc):
        if edit_layer0:
            attn0 = arch.attn_out(handle.model, 0)
            attn0.input = torch.zeros_like(attn0.input)
        for path in _paths(arch, QKV_KINDS):
            module = arch.qkv_module(handle.model, LAYER, next(k for k in QKV_KINDS if arch.qkv_path(k) == path))
            out = module.output
            if inputs is not None:
                out = out.clone()
            for qkv in QKV_KINDS:
                if arch.qkv_path(qkv) != path:
                    continue
                cols = arch.qkv_slice(qkv, HEAD)
                if inputs is None:
                    read[qkv] = out[..., cols].save()
                else:
                    out[..., cols] = inputs[qkv]
            if inputs is not None:
                module.output = out
        heads = arch.attn_out(handle.model, LAYER).input.save()
    return heads, read


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_patching_all_of_a_heads_qkv_from_run_a_recomputes_it_in_run_a(kind, word_tokenizer):
    _, handle = _build(kind, word_tokenizer)
    arch = handle.arch
    enc = dict(word_tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    clean, _ = _heads_and_inputs(handle, enc)
    run_a, inputs = _heads_and_inputs(handle, enc, edit_layer0=True)
    run_b, _ = _heads_and_inputs(handle, enc, inputs=inputs)
    cols = arch.head_slice(HEAD)
    assert torch.allclose(run_b[..., cols], run_a[..., cols], atol=1e-5)
    assert (run_a[..., cols] - clean[..., cols]).abs().max() > 1e-3  # run A differs: the test can fail
    # heads that share none of HEAD's inputs keep their clean output; under GQA, HEAD's group partner (head 2)
    # reads the patched key/value too
    partners = {h for h in range(arch.n_heads) if arch.kv_head(h) == arch.kv_head(HEAD)}
    for h in range(arch.n_heads):
        if h in partners:
            continue
        c = arch.head_slice(h)
        assert torch.allclose(run_b[..., c], clean[..., c], atol=1e-5), h
    assert partners == ({2, 3} if kind in GQA else {3})


def test_bad_head_input_and_head_are_refused(word_tokenizer):
    _, handle = _build("llama", word_tokenizer)
    with pytest.raises(ValueError, match="unknown head input 'x'"):
        handle.arch.qkv_slice("x", 0)
    with pytest.raises(IndexError, match="head 7 out of range"):
        handle.arch.qkv_slice("q", 7)
