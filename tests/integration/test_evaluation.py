"""The correct-answer filter and accuracy on a real (random) model, against a plain-torch reference."""
import copy
import random

import pytest
import torch

from lib import data_gen as dg
from lib.builtin.random_models import random_model
from lib.evaluation import answers_correct, filter_correct, prompt_accuracy
from lib.models import load_model


def _digit_model(tokenizer):
    """A random Llama whose unembedding can only say a digit, so that some answers are right and some wrong."""
    module = random_model("llama", vocab_size=len(tokenizer), n_layers=2, n_heads=4, d_model=32, seed=5)
    for name, param in module.named_parameters():
        if "proj" in name:  # large weights: the prediction depends on the values in the prompt
            param.data *= 20
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "123456789"]
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    torch.manual_seed(0)
    head.weight.data = torch.randn(len(tokenizer), 32) * 5
    head.bias.data = torch.full((len(tokenizer),), -1e4)
    head.bias.data[digits] = 0
    module.lm_head = head.requires_grad_(False)
    return module


def _reference_correct(module, tokenizer, prompts):
    """Plain torch: one right-padded forward (pads after the text cannot change it), logits at each own last token."""
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    enc = tokenizer([p.text for p in prompts], padding=True, return_tensors="pt")
    tokenizer.padding_side = side
    logits = module(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    predicted = logits[torch.arange(len(prompts)), last].argmax(-1).tolist()
    return [pred == dg.answer_token_id(tokenizer, p.answer) for pred, p in zip(predicted, prompts)]


def test_filter_correct_keeps_exactly_what_the_model_answers(word_tokenizer):
    module = _digit_model(word_tokenizer)
    handle = load_model(copy.deepcopy(module), tokenizer=word_tokenizer)
    triples = (dg.vb_triples("value_dependence", 27, seed=14, names=("x", "y"))
               + dg.vb_triples("operation_invariance", 27, seed=15))
    random.Random(0).shuffle(triples)  # batches mix prompt lengths
    orig_ok = _reference_correct(module, word_tokenizer, [t.original for t in triples])
    alt_ok = _reference_correct(module, word_tokenizer, [t.alternate for t in triples])
    both_ok = [a and b for a, b in zip(orig_ok, alt_ok)]
    assert 0 < sum(both_ok) < sum(orig_ok) < len(triples)  # each filter has something to keep and to drop

    kept = filter_correct(handle, triples, batch_size=32, require_alternate=False)
    assert kept == [t for t, ok in zip(triples, orig_ok) if ok]
    kept_both = filter_correct(handle, triples, batch_size=32)
    assert kept_both == [t for t, ok in zip(triples, both_ok) if ok]
    prompts = [t.original for t in triples]
    assert answers_correct(handle, prompts, batch_size=8) == orig_ok
    assert prompt_accuracy(handle, prompts, batch_size=8) == pytest.approx(sum(orig_ok) / len(orig_ok))
