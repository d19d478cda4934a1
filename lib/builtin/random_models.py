"""Randomly initialised small models of every supported architecture, built offline from configs.

Unit tests and benchmarks use them: real transformers modules, no downloaded weights.
"""
from __future__ import annotations

import torch
import transformers as tf

from lib.core.tokenization import word_level_tokenizer
from lib.data.entity import LABELS, OBJECTS

TASK_WORDS = [*OBJECTS, *LABELS, "the", "is", "in", "box", "contains", ",", ".", "=", "+", "-", "*",
              *"0123456789", *"abcdefghijklmnopqrstuvwxyz"]
"""Every word of both tasks' prompts: the vocabulary of `task_tokenizer`."""


def task_tokenizer():
    """A word-level tokenizer over TASK_WORDS: every object, label, digit and operator is one token."""
    return word_level_tokenizer(TASK_WORDS)


def _sizes(kind: str, n_layers: int, n_heads: int, d_model: int, vocab: int, n_kv_heads: int | None) -> dict:
    kv = n_kv_heads or n_heads
    common_llama = dict(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=kv, max_position_embeddings=512,
    )
    return {
        "llama": common_llama,
        "mistral": common_llama,
        "qwen2": common_llama,
        "qwen3": {**common_llama, "head_dim": d_model // n_heads},
        "gemma": {**common_llama, "head_dim": d_model // n_heads},
        "gemma2": {**common_llama, "head_dim": d_model // n_heads, "sliding_window": 64},
        "gpt2": dict(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=512),
        "gptj": dict(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=512,
                     rotary_dim=d_model // n_heads),
        "gpt_neox": dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, max_position_embeddings=512),
    }[kind]


CLASSES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
    "gptj": (tf.GPTJConfig, tf.GPTJForCausalLM),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
}


def random_model(
    kind: str = "llama",
    *,
    vocab_size: int,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 32,
    n_kv_heads: int | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """A frozen, eval-mode model with random weights (deterministic for a seed)."""
    if kind not in CLASSES:
        raise ValueError(f"no random builder for {kind!r}; known: {', '.join(CLASSES)}")
    config_cls, model_cls = CLASSES[kind]
    special = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)  # the ids lib.tokenization gives them
    config = config_cls(**_sizes(kind, n_layers, n_heads, d_model, vocab_size, n_kv_heads), **special)
    with torch.random.fork_rng(devices=[]):  # seeded here; the caller's global RNG is left as it was
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval().requires_grad_(False)
