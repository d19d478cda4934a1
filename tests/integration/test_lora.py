"""A PEFT LoRA adapter (built offline with peft) loads over its base, unmerged, with every module at its path;
CMAP patches from it; an adapter of another base is refused with the reason."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lib.builtin import toy
from lib.cmap import cross_model_patch
from lib.data_gen import encode_answers, entity_triples
from lib.models import ModelLoadError, is_lora_adapter, load_model, lora_base
from lib.patching import clean_logits
from lib.types import Component, Site


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A rank-4 LoRA on q/v/o of toy:entity-base with non-zero B (peft starts B at zero: the identity)."""
    from peft import LoraConfig, get_peft_model

    module, _ = toy.load("entity-base")   # peft records its directory as the adapter's base
    peft_model = get_peft_model(module, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    path = tmp_path_factory.mktemp("lora") / "entity-lora"
    peft_model.save_pretrained(path)
    return path, peft_model.eval()


def test_adapter_loads_over_its_base_unmerged_and_equals_peft(adapter, builtin_model):
    path, peft_model = adapter
    assert is_lora_adapter(path) and lora_base(path) == str(toy.MODELS_DIR / "entity-base")
    lora = load_model(path)
    base = builtin_model("toy:entity-base")
    assert lora.arch.n_layers == base.arch.n_layers and "LoRA" in lora.name
    assert type(lora.arch.attn_out(lora.lm._module, 0)).__name__ == "Linear"   # peft's lora.Linear, same path
    batch = encode_answers([t.original for t in entity_triples("object", 6, n_boxes=3, seed=0)], base.tokenizer)
    ours = clean_logits(lora, batch.original)
    position_ids = (batch.original.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = peft_model(**batch.original.inputs(), position_ids=position_ids).logits[:, -1]
    assert torch.allclose(ours, expected, atol=1e-4)
    assert (ours - clean_logits(base, batch.original)).abs().max() > 1e-2   # the adapter changes the model

    # CMAP: the adapter's head outputs written into the base (o_proj's input: the heads before the adapted o_proj)
    site = [Site(Component(2, 0), "last"), Site(Component(2, 1), "last")]
    patched = cross_model_patch(base, lora, batch, site)
    assert (patched - clean_logits(base, batch.original)).abs().max() > 1e-3


def test_adapter_of_another_base_is_refused(adapter):
    path, _ = adapter
    load_model(path, base="toy:entity-base")   # the built-in name of the same directory is the same base
    with pytest.raises(ModelLoadError, match=r"trained on .*entity-base, not on planted:strong: pass --model "
                                             r".*entity-base"):
        load_model(path, base="planted:strong")


def test_adapter_whose_weights_do_not_fit_its_base_is_refused(adapter, tmp_path):
    """An adapter whose config names a base of other sizes (planted:strong is a GPT-2: no q_proj or v_proj to attach to): its weights cannot be
    placed, and loading says which adapter failed instead of running the base as if it were the fine-tune."""
    path, _ = adapter
    copy = tmp_path / "mislabelled"
    shutil.copytree(path, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "planted:strong"}))
    with pytest.raises((ModelLoadError, RuntimeError), match="size mismatch|did not attach|could not attach"):
        load_model(copy)
