"""Attention weights of every head, read from an nnsight trace (the model runs with eager attention, which
returns them; its own implementation is restored afterwards).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lib.core.handle import ModelHandle
from lib.data.encoding import encode_prompts
from lib.types import EncodedPrompts, Prompt


@contextmanager
def eager_attention(handle: ModelHandle) -> Iterator[None]:
    """Run the model with eager attention inside the block (the only implementation that returns weights), then
    restore the implementation it had."""
    module = handle.lm._module
    before = getattr(module.config, "_attn_implementation", None) or "eager"
    module.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.set_attn_implementation(before)


def attention_weights(handle: ModelHandle, prompts: Sequence[Prompt]) -> tuple[list[torch.Tensor], EncodedPrompts]:
    """Per layer (batch, heads, query, key) attention weights on the left-padded prompts, and their encoding."""
    encoded = encode_prompts(prompts, handle.tokenizer)
    weights = []
    with eager_attention(handle), torch.no_grad(), handle.trace(encoded.inputs()):
        for layer in range(handle.arch.n_layers):
            weights.append(handle.arch.attn(handle.model, layer).output[1].save())
    return [w.float() for w in weights], encoded
