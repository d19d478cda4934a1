"""DCM and the patching primitives against independent plain-PyTorch hooks (bench/plain_hooks.py), the generic
scan, and learning on a constructed case."""
import random

import pytest
import torch

from bench import plain_hooks
from lib.builtin.random_models import random_model
from lib.core.components import all_components
from lib.data_gen import encode_answers, encode_pairs, random_entity_prompt
from lib.mask_intervention import (
    DCMConfig, backward_on_batch, evaluate_mask, lambda_sweep, prepare_batches, train_mask,
)
from lib.models import load_model
from lib.patching import (
    activation_patch, clean_logits, collect, mean_ablate, mean_activations, patched_logits, patching_scan, sites_at,
)
from lib.scores import target_hit, target_prob
from lib.types import Component, PairBatch, Site, Triple


@pytest.fixture(scope="module")
def setup(word_tokenizer):
    module = random_model("llama", vocab_size=len(word_tokenizer), n_layers=3, n_heads=4, d_model=64,
                          n_kv_heads=2, seed=5)
    handle = load_model(module, tokenizer=word_tokenizer)
    rng = random.Random(0)
    originals = [random_entity_prompt(rng, rng.choice([2, 3])) for _ in range(8)]
    alternates = [random_entity_prompt(rng, rng.choice([2, 3])) for _ in range(8)]
    return handle, module, originals, alternates


def _pair(handle, originals, alternates):
    """A PairBatch whose target is each alternate's answer (the Object desideratum's shape)."""
    return encode_pairs([Triple(o, a, a.answer, "object") for o, a in zip(originals, alternates)], handle.tokenizer)


SITES = [Site(Component(0, 1), "query_label"), Site(Component(1, 3)), Site(Component(1, 0)), Site(Component(1)),
         Site(Component(2, 2), "prev_query_label"), Site(Component(2, 2))]


def test_all_ones_leaves_logits_and_zeros_equal_activation_patching(setup):
    handle, module, originals, alternates = setup
    pair = _pair(handle, originals, alternates)
    ob, ab = pair.original, pair.alternate
    values = collect(handle, ab, SITES)
    clean = clean_logits(handle, ob)
    assert torch.allclose(patched_logits(handle, ob, SITES, values, torch.ones(len(SITES))), clean, atol=1e-5)
    fully = patched_logits(handle, ob, SITES, values, torch.zeros(len(SITES)))
    assert torch.allclose(fully, activation_patch(handle, pair, SITES), atol=1e-5)
    assert (fully - clean).abs().max() > 1e-3
    reference_rows = plain_hooks.capture(module, handle.arch, ab, SITES)
    assert reference_rows.keys() == values.keys()
    assert all(torch.allclose(reference_rows[k], values[k], atol=1e-5) for k in values)
    expected = plain_hooks.blended_logits(module, handle.arch, ob, SITES, torch.zeros(len(SITES)), reference_rows)
    assert torch.allclose(fully, expected, atol=1e-5)


def test_patching_scan_equals_one_patched_run_per_site(setup):
    """The generic scan: one alternate run serves every patch; each score equals that patch's own run."""
    handle, module, originals, alternates = setup
    pair = _pair(handle, originals, alternates)
    patches = [*SITES, SITES[:3]]   # single sites and one group patched together
    for metric in (target_hit, target_prob):
        scores = patching_scan(handle, [pair.select(torch.arange(4)), pair.select(torch.arange(4, 8))], patches,
                               metric=metric)
        expected = torch.stack([metric(activation_patch(handle, pair, p if isinstance(p, list) else [p]), pair).mean()
                                for p in patches])
        assert scores.shape == (len(patches),)
        assert torch.allclose(scores, expected, atol=1e-6)
    probs = patching_scan(handle, [pair], patches, metric=target_prob)
    assert probs.max() > probs.min()  # the sites differ in effect: the test can fail
    with pytest.raises(ValueError, match="no source to patch from"):
        patching_scan(handle, [PairBatch(pair.original, target_ids=pair.target_ids)], SITES)


def test_loss_and_gradient_equal_plain_hooks(setup):
    handle, module, originals, alternates = setup
    tok = handle.tokenizer
    triples = [Triple(o, a, a.answer, "object") for o, a in zip(originals, alternates)]
    prepared = prepare_batches(handle, triples, SITES, batch_size=8)[0]
    pb = prepared[0]
    weights = torch.tensor([0.3, 0.9, 0.5, 0.7, 0.1, 0.6], requires_grad=True)
    loss = backward_on_batch(handle, prepared, SITES, weights, "logit_diff")
    grad = weights.grad.clone()

    ref_w = weights.detach().clone().requires_grad_(True)
    ab = encode_pairs(triples, tok).alternate
    logits = plain_hooks.blended_logits(module, handle.arch, pb.original, SITES, ref_w,
                                        plain_hooks.capture(module, handle.arch, ab, SITES))
    rows = torch.arange(len(triples))
    ref_loss = -(logits[rows, pb.target_ids] - logits[rows, pb.foil_ids]).mean()
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) < 1e-5
    assert torch.allclose(grad, ref_w.grad, atol=1e-5)
    assert grad.abs().max() > 1e-4


def test_mean_ablation_writes_the_mean(setup):
    handle, module, originals, _ = setup
    batch = encode_answers(originals, handle.tokenizer)
    ob = batch.original
    sites = [Site(Component(1, 2)), Site(Component(0))]
    means = mean_activations(handle, [ob], sites)
    ablated = mean_ablate(handle, ob, sites, means)
    ref_values = {k: v.expand(len(originals), -1) for k, v in means.items()}
    expected = plain_hooks.blended_logits(module, handle.arch, ob, sites, torch.zeros(len(sites)), ref_values)
    assert torch.allclose(ablated, expected, atol=1e-5)
    scanned = patching_scan(handle, [batch], [sites], values=means)
    assert scanned[0] == pytest.approx(float(target_hit(ablated, batch).mean()))


def _constructed_case(handle, n=160, seed=0):
    """Triples whose target is, by construction, what patching a known set of sites produces."""
    tok = handle.tokenizer
    rng = random.Random(seed)
    origs = [random_entity_prompt(rng, 3) for _ in range(n)]
    alts = [random_entity_prompt(rng, 3) for _ in range(n)]
    truth = [Site(Component(2, 1)), Site(Component(1, 3))]
    pair = encode_pairs([Triple(o, a, a.answer, "x") for o, a in zip(origs, alts)], tok)
    clean = clean_logits(handle, pair.original).argmax(-1)
    patched = activation_patch(handle, pair, truth).argmax(-1)
    triples = [Triple(o, a, " " + tok.convert_ids_to_tokens(int(t)), "made")
               for o, a, t, c in zip(origs, alts, patched, clean) if t != c]
    half = len(triples) // 2
    return truth, {"made": triples[:half]}, {"made": triples[half:]}


def test_dcm_recovers_the_constructed_set(setup):
    handle = setup[0]
    truth, train, val = _constructed_case(handle)
    assert len(train["made"]) >= 15
    sites = sites_at(all_components(handle.arch))
    config = DCMConfig(lam=0.001, loss="logit_diff", lr=0.05, epochs=8, batch_size=32)
    result = train_mask(handle, train, val, sites, config, progress=False)
    found, true = set(result.selected_patched), {str(s) for s in truth}
    precision = len(found & true) / max(len(found), 1)
    recall = len(found & true) / len(true)
    assert precision >= 0.8 and recall >= 0.8, (result.selected_patched, result.weights)
    assert result.selected_val_accuracy["made"] >= 0.8
    assert evaluate_mask(handle, val, sites, result.selected_patched)["made"] == pytest.approx(
        result.selected_val_accuracy["made"])
    assert len(result.history) == 8 * 2 and all("loss" in h for h in result.history)
    assert result.final_patched == [str(s) for s, w in zip(sites, result.weights) if w < 0.5]
    assert result.final_val_accuracy == result.history[-1]["val_accuracy"]


def test_lambda_sweep_gives_smaller_masks_for_larger_lambda(setup):
    handle = setup[0]
    _, train, val = _constructed_case(handle)
    sites = sites_at(all_components(handle.arch))
    config = DCMConfig(loss="logit_diff", lr=0.1, epochs=10, batch_size=32, prune=False)
    rows = lambda_sweep(handle, train, val, sites, [0.0, 0.003, 0.1], config, progress=False)
    sizes = [r["n_final"] for r in rows]
    assert all(len(r["final_patched"]) == sum(w < 0.5 for w in r["weights"]) for r in rows)  # what lambda produced
    assert all(r["n_selected"] == len(r["selected_patched"]) for r in rows)
    assert sizes[0] >= sizes[1] >= sizes[2] and sizes[0] > sizes[2], sizes


def test_bad_input_errors(setup):
    handle, _, originals, alternates = setup
    pair = _pair(handle, originals, alternates)
    ob = pair.original
    with pytest.raises(ValueError, match="no components to patch"):
        train_mask(handle, {"x": [Triple(originals[0], alternates[0], alternates[0].answer, "x")]}, {}, [])
    with pytest.raises(ValueError, match="not defined for these prompts"):
        activation_patch(handle, pair, [Site(Component(0, 0), "nowhere")])
    with pytest.raises(ValueError, match="needs a batch with an alternate"):
        activation_patch(handle, PairBatch(ob), SITES)
    ob = ob.with_positions({**ob.positions, "bad": torch.full_like(ob.positions["last"], 99)})
    with pytest.raises(ValueError, match="outside the prompt"):
        patched_logits(handle, ob, [Site(Component(0, 0), "bad")], {})
    multi = Triple(originals[0], alternates[0], " apple cup", "x")
    with pytest.raises(ValueError, match="targets must be one token"):
        prepare_batches(handle, [multi], SITES, 4)
    with pytest.raises(ValueError, match="choose one of"):
        train_mask(handle, {"x": [multi]}, {}, SITES, DCMConfig(loss="mse"))
    for bad, message in [(dict(init="ones", parameterization="sigmoid"), "sigmoid parameterisation cannot start at"),
                         (dict(init="ones", parameterization="hard_concrete"), "hard_concrete parameterisation"),
                         (dict(lr=0), "lr must be > 0"), (dict(epochs=0), "epochs must be > 0"),
                         (dict(lam=-1), "lam .* must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            DCMConfig(**bad).check()


def test_papers_recipe_misses_a_saturated_component_that_init_half_finds():
    """Planted model with its value fetcher's query scaled x7 (attention logit gaps ~40 nats): the query-label
    mover L1H2 gets a gradient of ~1e-7 at w = 1, so the papers' recipe never selects it, although patching it
    alone hits the Label target every time. Starting the weights at 0.5 finds it."""
    from lib.builtin import planted
    from lib.data_gen import entity_triples

    module, tok = planted.build("strong")
    attn = module.transformer.h[2].attn
    query_cols = slice(3 * 48, 4 * 48)  # L2H3's query (d_head 48)
    attn.c_attn.weight.data[:, query_cols] *= 7
    attn.c_attn.bias.data[query_cols] *= 7
    handle = load_model(module, tokenizer=tok)
    train = {"label": entity_triples("label", 64, seed=1, n_boxes=5, tokenizer=tok)}
    val = {"label": entity_triples("label", 32, seed=2, n_boxes=5, tokenizer=tok)}
    sites = sites_at(all_components(handle.arch, mlps=False), "last")
    assert evaluate_mask(handle, val, sites, ["L1H2@last"])["label"] == 1.0

    prepared = prepare_batches(handle, train["label"], sites, 32)[0]
    w = torch.ones(len(sites), requires_grad=True)
    backward_on_batch(handle, prepared, sites, w, "target_logit")
    assert abs(w.grad[sites.index(Site(Component(1, 2)))]) < 1e-5

    papers = train_mask(handle, train, val, sites, DCMConfig(lr=0.05, epochs=6, init="ones"), progress=False)
    half = train_mask(handle, train, val, sites, DCMConfig(lr=0.05, epochs=6, init="half"), progress=False)
    default = train_mask(handle, train, val, sites, progress=False)   # DCMConfig(): lr 0.1, 2 epochs, init half
    assert default.selected_patched == ["L1H2@last"] and default.config["init"] == "half"
    assert "L1H2@last" not in papers.selected_patched and papers.selected_val_accuracy["label"] == 0.0
    assert half.selected_patched == ["L1H2@last"] and half.selected_val_accuracy["label"] == 1.0
    assert half.config["init"] == "half"


def test_dcm_step_on_an_offloaded_device_map_equals_in_memory(setup, tmp_path):
    """accelerate's hooks (device_map with a layer offloaded to disk, the CPU stand-in for sharding) leave the
    blend, the loss and the mask's gradient unchanged."""
    handle, module, originals, alternates = setup
    module.save_pretrained(tmp_path)
    handle.tokenizer.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    sharded = load_model(tmp_path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    triples = [Triple(o, a, a.answer, "object") for o, a in zip(originals, alternates)]
    grads, losses = [], []
    for h in (handle, sharded):
        prepared = prepare_batches(h, triples, SITES, batch_size=8)[0]
        w = torch.full((len(SITES),), 0.5, requires_grad=True)
        losses.append(backward_on_batch(h, prepared, SITES, w, "target_logit"))
        grads.append(w.grad)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and grads[0].abs().max() > 1e-4
