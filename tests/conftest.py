"""Shared fixtures: the task tokenizer, the architectures under test, one-thread runs and the built-in models
(loaded once per session, read-only: no test may change a model it gets from here)."""
from __future__ import annotations

import pytest
import torch

from lib.builtin.random_models import TASK_WORDS, task_tokenizer  # noqa: F401  (TASK_WORDS for the tests' prompts)
from lib.models import load_model

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gptj", "gpt_neox"]
GQA = {"llama", "mistral", "qwen2", "qwen3", "gemma2"}  # built with fewer key/value heads than query heads


@pytest.fixture(scope="session")
def word_tokenizer():
    """The word-level tokenizer over both tasks' words (lib.builtin.random_models.task_tokenizer)."""
    return task_tokenizer()


@pytest.fixture(scope="session")
def builtin_model():
    """builtin_model("planted:strong") -> its ModelHandle, built once per session."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]

    return get


@pytest.fixture
def one_thread():
    """Small models run several times faster on one intra-op thread than on two busy cores; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
