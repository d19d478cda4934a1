"""The adapter points at the real per-head outputs and MLP outputs, for every supported architecture."""
import copy

import pytest
import torch

from lib.core.components import all_components
from lib.types import Component
from lib.models import ModelLoadError, load_model
from lib.builtin.random_models import random_model
from tests.conftest import ARCHITECTURES, GQA

PROMPTS = ["The apple is in Box F, the cup is in Box Q. Box F contains the", "The key is in Box A. Box A contains the"]


def _build(kind, tokenizer):
    module = random_model(kind, vocab_size=len(tokenizer), n_layers=2, n_heads=4, d_model=32,
                          n_kv_heads=2 if kind in GQA else None, seed=1)
    return module, load_model(copy.deepcopy(module), tokenizer=tokenizer)


def _reference(module, enc):
    """Plain forward with the position ids nnsight derives for left padding."""
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return module(**enc, position_ids=position_ids).logits


def _logits(handle, layer, head=None):
    """Logits with one head (slice of the output projection's input) or one MLP zeroed through the adapter."""
    enc = handle.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with handle.trace(dict(enc)):
        if head is None:
            handle.arch.mlp(handle.model, layer).output = torch.zeros_like(handle.arch.mlp(handle.model, layer).output)
        else:
            module = handle.arch.attn_out(handle.model, layer)
            x = module.input.clone()
            x[..., handle.arch.head_slice(head)] = 0
            module.input = x
        logits = handle.arch.unembed(handle.model).output.save()
    return logits, enc


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_zeroing_a_head_equals_zeroing_its_output_projection_columns(kind, word_tokenizer):
    module, handle = _build(kind, word_tokenizer)
    arch = handle.arch
    layer, head = 1, 2
    patched, enc = _logits(handle, layer, head)

    edited = copy.deepcopy(module)
    proj = arch.attn_out(edited, layer)
    cols = arch.head_slice(head)
    if type(proj).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        proj.weight.data[cols, :] = 0
    else:
        proj.weight.data[:, cols] = 0
    expected = _reference(edited, enc)
    unpatched = _reference(module, enc)
    assert torch.allclose(patched, expected, atol=1e-4)
    assert (patched - unpatched).abs().max() > 1e-3  # the head mattered: the test can fail


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_zeroing_the_mlp_equals_zeroing_its_down_projection(kind, word_tokenizer):
    module, handle = _build(kind, word_tokenizer)
    patched, enc = _logits(handle, layer=0)

    edited = copy.deepcopy(module)
    mlp = handle.arch.mlp(edited, 0)
    down = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"][-1]
    down.weight.data.zero_()
    if down.bias is not None:
        down.bias.data.zero_()
    assert torch.allclose(patched, _reference(edited, enc), atol=1e-4)
    assert (patched - _reference(module, enc)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_adapter_sizes_match_config(kind, word_tokenizer):
    _, handle = _build(kind, word_tokenizer)
    arch = handle.arch
    assert (arch.n_layers, arch.n_heads, arch.head_dim, arch.d_model) == (2, 4, 8, 32)
    assert arch.n_kv_heads == (2 if kind in GQA else 4)
    assert len(all_components(arch)) == 2 * 4 + 2
    assert len(all_components(arch, mlps=False)) == 8


def test_component_check_rejects_out_of_range(word_tokenizer):
    _, handle = _build("llama", word_tokenizer)
    with pytest.raises(ValueError, match="layer 5 out of range"):
        Component(5, 0).check(handle.arch)
    with pytest.raises(ValueError, match="head 9 out of range"):
        Component(0, 9).check(handle.arch)


def test_bad_path_and_missing_tokenizer(tmp_path, word_tokenizer):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    random_model("llama", vocab_size=len(word_tokenizer)).save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="no tokenizer could be loaded"):
        load_model(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="needs its tokenizer"):
        load_model(random_model("llama", vocab_size=10))


def test_local_directory_loads_same_logits(tmp_path, word_tokenizer):
    module = random_model("llama", vocab_size=len(word_tokenizer), seed=3)
    module.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    handle = load_model(tmp_path, dtype="float32")
    enc = word_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with handle.trace(dict(enc)):
        logits = handle.arch.unembed(handle.model).output.save()
    assert torch.allclose(logits, _reference(module, enc), atol=1e-4)


def test_offline_hub_id_says_to_pass_a_local_path(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError, match="local directory"):
        load_model("meta-llama/Llama-2-7b-hf")


def test_disk_offloaded_device_map_gives_same_logits(tmp_path, word_tokenizer):
    """accelerate's hooks (the CPU stand-in for sharding) leave nnsight reads and logits correct."""
    module = random_model("llama", vocab_size=len(word_tokenizer), n_layers=3, seed=4)
    module.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    handle = load_model(tmp_path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    enc = word_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with handle.trace(dict(enc)):
        hidden = handle.arch.attn_out(handle.model, 1).input.save()
        logits = handle.arch.unembed(handle.model).output.save()
    assert hidden.shape[-1] == 32
    assert torch.allclose(logits, _reference(module, enc), atol=1e-4)
