"""The logit lens: at the last layer it is the model's own logits; the components' direct logits through the frozen
final norm add up to the model's logits; on the planted model the value fetcher's reading names the answer."""
import random

import nnsight
import pytest
import torch

from lib.builtin.random_models import random_model
from lib.data_gen import encode_answers, random_entity_prompt
from lib.logit_lens import component_logits, lens_heatmap, lens_table, logit_lens, norm_kind
from lib.models import load_model
from lib.patching import clean_logits
from lib.types import PairBatch

KINDS = ["gpt2", "llama", "gemma", "gpt_neox", "gptj"]  # LayerNorm, RMSNorm, RMSNorm with 1 + weight, parallel


def _answers(tokenizer, n=6, n_boxes=3, seed=0):
    """Entity prompts scored against their own answers."""
    return encode_answers([random_entity_prompt(random.Random(seed + i), n_boxes) for i in range(n)], tokenizer)


def _random(kind, tokenizer, seed=0):
    module = random_model(kind, vocab_size=len(tokenizer), n_layers=3, n_heads=4, d_model=32, seed=seed)
    return load_model(module, tokenizer=tokenizer)


def _full_readings(lens):
    """(batch, n_layers, n_columns, vocab) every reading, rebuilt from a lens taken with k = vocab."""
    full = torch.empty(*lens.top_ids.shape)
    full.scatter_(-1, lens.top_ids, lens.top_logits)
    return full


@pytest.mark.parametrize("kind", KINDS)
def test_lens_at_the_last_layer_is_the_models_logits(kind, word_tokenizer, one_thread):
    handle = _random(kind, word_tokenizer)
    batch = _answers(word_tokenizer)
    vocab = handle.lm.config.vocab_size
    lens = logit_lens(handle, batch, k=vocab)
    readings = _full_readings(lens)
    model = clean_logits(handle, batch.original)          # an independent trace
    assert torch.allclose(lens.model_logits, model, atol=1e-6)
    resid = lens.columns.index("resid")
    assert torch.allclose(readings[:, -1, resid], model, atol=1e-5)
    above = (model > model[torch.arange(batch.size), batch.target_ids][:, None]).sum(-1).float()
    assert torch.equal(lens.target_rank[:, -1, resid], above)  # no ties in random logits
    assert not torch.allclose(readings[:, 0, resid], model, atol=1e-3)  # earlier layers read something else


@pytest.mark.parametrize("kind", KINDS)
def test_component_readings_add_up_to_the_models_logits(kind, word_tokenizer, one_thread):
    """Every summand of the final residual stream (embeddings, each head, each layer's attention output bias,
    each MLP) read through the frozen final norm, plus the norm's bias and the unembedding's bias read alone,
    gives the model's logits: the frozen norm is linear and exact on the whole stream."""
    handle = _random(kind, word_tokenizer, seed=1)
    batch = _answers(word_tokenizer, seed=1)
    arch, prompts = handle.arch, batch.original
    lens = logit_lens(handle, batch, k=handle.lm.config.vocab_size)
    readings = _full_readings(lens)
    examples, last = torch.arange(batch.size), prompts.positions["last"]
    with torch.no_grad(), handle.trace(prompts.inputs()):
        embedded = arch.layer(handle.model, 0).input[examples, last]
        biases = []
        for layer in range(arch.n_layers):
            z = arch.attn_out(handle.model, layer).input[examples, last]
            biases.append(arch.attn_out(handle.model, layer)(torch.zeros_like(z)))  # the bias, or 0
        final = arch.final_norm(handle.model).input[examples, last]
        saved = nnsight.save((embedded, final, torch.stack(biases)))
    embedded, final, biases = saved
    center, eps = norm_kind(handle)
    rest = component_logits(handle, torch.cat([embedded[None], biases]), final, center, eps).sum(0)
    norm, unembed = arch.final_norm(handle.model), arch.unembed(handle.model)
    offset = unembed(norm(torch.zeros_like(final))).float()     # the norm's bias and the unembedding's bias
    components = readings[:, :, [i for i, c in enumerate(lens.columns) if c != "resid"]].sum((1, 2))
    model = lens.model_logits
    assert torch.allclose(components + rest + offset, model, atol=1e-4), (components + rest + offset - model).abs().max()
    assert (components - (model - offset)).abs().max() > 1e-3  # the components alone are not the whole story


def test_planted_fetcher_reading_names_the_answer(builtin_model):
    """planted:strong: the value fetcher L2H3 writes the fetched object into the subspace the unembedding reads,
    so its reading at the last token ranks the answer first, by nats; the distractors write to a scratch subspace
    the unembedding ignores, so their readings are flat (no logit above round-off); the last residual stream
    names the answer too."""
    handle = builtin_model("planted:strong")
    batch = _answers(handle.tokenizer, n=12, n_boxes=5)
    lens = logit_lens(handle, batch, k=3)
    col = lens.columns.index
    assert (lens.target_rank[:, 2, col("H3")] == 0).all()
    assert (lens.target_rank[:, 2, col("resid")] == 0).all()
    assert (lens.top_ids[:, 2, col("H3"), 0] == batch.target_ids).all()
    assert (lens.top_logits[:, 2, col("H3"), 0] > 5).all()
    for layer, head in [(0, 0), (1, 1), (2, 2)]:
        assert (lens.top_logits[:, layer, col(f"H{head}")].abs() < 1e-3).all(), (layer, head)


def test_table_heatmap_and_errors(builtin_model, word_tokenizer, tmp_path):
    handle = builtin_model("planted:strong")
    batch = _answers(handle.tokenizer, n=3, n_boxes=3)
    lens = logit_lens(handle, batch, k=3)
    table = lens_table(lens, handle.tokenizer, example=1)
    lines = table.splitlines()
    assert lines[0].startswith("| layer | reading | top tokens | rank of `")
    assert len(lines) == 2 + lens.n_layers * len(lens.columns)
    answer = handle.tokenizer.convert_ids_to_tokens(int(batch.target_ids[1]))
    assert f"`{answer}`" in lines[-1]  # the last residual stream reads the answer first
    assert len(lens_table(lens, handle.tokenizer, columns=["resid"]).splitlines()) == 2 + lens.n_layers
    for value in ("rank", "logprob"):
        path = lens_heatmap(tmp_path / f"lens_{value}.png", lens, value)
        assert path.exists() and path.stat().st_size > 1000
    assert lens.mean("rank").shape == (lens.n_layers, len(lens.columns))
    resid_only = logit_lens(handle, batch, position="query_label", components=False)
    assert resid_only.columns == ["resid"] and resid_only.target_rank.shape == (3, 3, 1)
    with pytest.raises(ValueError, match="scores against target tokens"):
        logit_lens(handle, PairBatch(batch.original))
    with pytest.raises(ValueError, match="not defined for these prompts"):
        logit_lens(handle, batch, position="nowhere")
    with pytest.raises(ValueError, match="k must be between 1"):
        logit_lens(handle, batch, k=0)
    with pytest.raises(ValueError, match="out of range"):
        lens_table(lens, handle.tokenizer, example=3)
    with pytest.raises(ValueError, match="unknown lens columns"):
        lens_table(lens, handle.tokenizer, columns=["H9"])
    with pytest.raises(ValueError, match="choose 'rank' or 'logprob'"):
        lens_heatmap(tmp_path / "x.png", lens, "prob")
    gemma2 = _random("gemma2", word_tokenizer)
    with pytest.raises(ValueError, match="use components=False"):
        logit_lens(gemma2, _answers(word_tokenizer))
    assert logit_lens(gemma2, _answers(word_tokenizer), components=False).columns == ["resid"]
