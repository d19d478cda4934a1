"""Shared fixtures: an offline word-level tokenizer and random tiny models of each architecture."""
from __future__ import annotations

import pytest

from lib.data_gen import LABELS, OBJECTS
from lib.tokenization import word_level_tokenizer

TASK_WORDS = [*OBJECTS, *LABELS, "the", "is", "in", "box", "contains", ",", ".", "=", "+", "-", "*",
              *"0123456789", *"abcdefghijklmnopqrstuvwxyz"]

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gptj", "gpt_neox"]
GQA = {"llama", "mistral", "qwen2", "qwen3", "gemma2"}  # built with fewer key/value heads than query heads


@pytest.fixture(scope="session")
def word_tokenizer():
    return word_level_tokenizer(TASK_WORDS)
