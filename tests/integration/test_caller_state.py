"""No library call changes what the caller owns: the tokenizer, the model's settings, torch's global RNG."""
import torch

from lib.attention import attention_weights
from lib.builtin.random_models import random_model
from lib.core.components import all_components
from lib.data_gen import encode_pairs, entity_triples
from lib.mask_intervention import DCMConfig, train_mask
from lib.patching import sites_at


def test_encoding_leaves_the_tokenizer_as_it_was(word_tokenizer):
    word_tokenizer.padding_side = "right"
    before = (word_tokenizer.padding_side, word_tokenizer.pad_token, len(word_tokenizer))
    batch = encode_pairs(entity_triples("object", 6, n_boxes=3, seed=0, tokenizer=word_tokenizer), word_tokenizer)
    assert (word_tokenizer.padding_side, word_tokenizer.pad_token, len(word_tokenizer)) == before
    assert bool((batch.original.attention_mask[:, -1] == 1).all())  # left-padded all the same


def test_attention_weights_restore_the_attention_implementation(builtin_model):
    handle = builtin_model("toy:entity-base")
    before = handle.lm._module.config._attn_implementation
    prompts = [t.original for t in entity_triples("object", 4, n_boxes=3, seed=1)]
    weights, _ = attention_weights(handle, prompts)
    assert len(weights) == handle.arch.n_layers and weights[0].shape[1] == handle.arch.n_heads
    assert handle.lm._module.config._attn_implementation == before


def test_dcm_and_random_models_leave_the_global_rng_alone(builtin_model):
    handle = builtin_model("planted:strong")
    triples = entity_triples("object", 8, n_boxes=3, seed=2, tokenizer=handle.tokenizer)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    train_mask(handle, {"object": triples}, {"object": triples}, sites_at(all_components(handle.arch)),
               DCMConfig(epochs=1, batch_size=4, init="random", parameterization="hard_concrete"), progress=False)
    random_model("llama", vocab_size=20, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
