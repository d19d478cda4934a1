"""Attribution patching and edge attribution: exact where the model is linear in the patched component, equal to
an independent plain-PyTorch gradient, rank-correlated with activation patching on the built-in models, and
finding the planted circuits (lib.builtin.planted.ground_truth)."""
import random

import pytest
import torch

from bench import plain_hooks
from lib.attribution import (LOGITS, attribution_scan, edge_attribution, rank_correlation, rank_sites, site_grid,
                             site_heatmap)
from lib.builtin import planted
from lib.builtin.random_models import random_model
from lib.core.components import all_components
from lib.data_gen import encode_pairs, entity_triples, random_entity_prompt
from lib.evaluation import scores
from lib.models import load_model
from lib.patching import collect, mean_activations, patching_scan, sites_at
from lib.scores import logit_diff, target_hit, target_logit
from lib.types import Component, PairBatch, Site, Triple

POSITIONS = ("last", "query_label", "prev_query_label")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs small models: one intra-op thread (conftest.one_thread)."""
    yield


def _pairs(tokenizer, n=8, seed=0):
    """Entity prompts whose target is each alternate's answer (the Object desideratum's shape), 2-3 boxes."""
    rng = random.Random(seed)
    originals = [random_entity_prompt(rng, rng.choice([2, 3])) for _ in range(n)]
    alternates = [random_entity_prompt(rng, rng.choice([2, 3])) for _ in range(n)]
    return encode_pairs([Triple(o, a, a.answer, "object") for o, a in zip(originals, alternates)], tokenizer)


def _effects(handle, batches, patches, metric, **source):
    """Exact patching effects: the patched mean metric minus the clean original's (attribution's baseline)."""
    return (patching_scan(handle, batches, patches, metric=metric, progress=False, **source)
            - scores(handle, batches, metric, progress=False).mean())


@pytest.fixture(scope="module")
def linear(word_tokenizer):
    """A random Llama made linear in its last layer's heads at the last token.

    The last layer's MLP is zeroed (Llama's MLP has no biases, so it outputs 0 and reads nothing) and the final
    RMSNorm is replaced by the identity. A last-layer head's output at the last token then reaches the logits
    only through o_proj, the residual add and lm_head, all linear, and nothing else reads it (no later layer,
    no later token). The target logit and the logit difference are linear in it, so the first-order estimate is
    the exact patching effect. Earlier layers stay non-linear (attention, SiLU MLPs, RMSNorms).
    """
    module = random_model("llama", vocab_size=len(word_tokenizer), n_layers=3, n_heads=4, d_model=64, seed=5)
    module.model.layers[-1].mlp.down_proj.weight.data.zero_()
    module.model.norm = torch.nn.Identity()
    module.lm_head.weight.data *= 20  # effects of order 0.1-1 (random init gives logits of ~0.05)
    module.model.layers[-1].self_attn.o_proj.weight.data *= 20
    return load_model(module, tokenizer=word_tokenizer), module


def test_attribution_equals_the_exact_patching_effect_where_the_model_is_linear(linear):
    handle, _ = linear
    pair = _pairs(handle.tokenizer)
    batches = [pair.select(torch.arange(4)), pair.select(torch.arange(4, 8))]
    last_layer = [Site(Component(2, h)) for h in range(4)] + [Site(Component(2))]
    earlier = [Site(Component(1, 1)), Site(Component(0, 2), "query_label"), Site(Component(1))]
    patches = [*last_layer, last_layer[:3], *earlier]
    for metric in (target_logit, logit_diff):
        estimate = attribution_scan(handle, batches, patches, metric=metric)
        exact = _effects(handle, batches, patches, metric)
        assert estimate.shape == (len(patches),)
        n = len(last_layer) + 1
        assert torch.allclose(estimate[:n], exact[:n], atol=1e-5), (estimate[:n], exact[:n])
        assert exact[:4].abs().min() > 1e-2  # real effects, not zeros that agree trivially
        assert exact[4].abs() < 1e-6          # the zeroed MLP does nothing, and attribution says so
        assert (estimate[n:] - exact[n:]).abs().max() > 1e-4  # elsewhere only a first-order estimate (10x the tol)


def test_attribution_equals_the_plain_pytorch_gradient(linear, word_tokenizer):
    """Non-linear sites too: the score is -(dM/dw) at w = 1 of the plain-hook blend w * v + (1 - w) * v_alt
    (bench/plain_hooks.py, no nnsight), i.e. (v_alt - v) . dM/dv summed over each site's slice."""
    module = random_model("llama", vocab_size=len(word_tokenizer), n_layers=3, n_heads=4, d_model=64,
                          n_kv_heads=2, seed=7)
    handle = load_model(module, tokenizer=word_tokenizer)
    pair = _pairs(word_tokenizer, seed=3)
    sites = [Site(Component(0, 1), "query_label"), Site(Component(1, 3)), Site(Component(1, 0)),
             Site(Component(1)), Site(Component(2, 2), "prev_query_label"), Site(Component(2, 2))]
    estimate = attribution_scan(handle, [pair], sites, metric=logit_diff)
    weights = torch.ones(len(sites), requires_grad=True)
    logits = plain_hooks.blended_logits(module, handle.arch, pair.original, sites, weights,
                                        plain_hooks.capture(module, handle.arch, pair.alternate, sites))
    logit_diff(logits, pair).mean().backward()
    assert torch.allclose(estimate, -weights.grad, atol=1e-6), (estimate, -weights.grad)
    assert estimate.abs().max() > 1e-3


def test_attribution_takes_the_sources_of_patching_scan(linear, word_tokenizer):
    """values= (e.g. means) and donor= (another model on the same input), as in patching_scan: exact again on
    the linear sites."""
    handle, _ = linear
    pair = _pairs(handle.tokenizer, seed=1)
    sites = [Site(Component(2, h)) for h in range(4)]
    means = mean_activations(handle, [pair.original, pair.alternate], sites)
    donor = load_model(random_model("llama", vocab_size=len(word_tokenizer), n_layers=3, n_heads=4, d_model=64,
                                    seed=9), tokenizer=word_tokenizer)
    plain = PairBatch(pair.original, None, pair.target_ids, pair.foil_ids)  # no alternate needed for these
    for source in ({"values": means}, {"donor": donor}):
        estimate = attribution_scan(handle, [plain], sites, metric=target_logit, **source)
        exact = _effects(handle, [plain], sites, target_logit, **source)
        assert torch.allclose(estimate, exact, atol=1e-5)
        assert exact.abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["strong", "positional"])
def test_attribution_ranks_correlate_with_patching_on_planted_models(builtin_model, variant):
    """Spearman >= 0.8 over every head at the task's three positions, per desideratum (logit difference).

    Most planted sites do nothing: their patching effects are float32 round-off (|effect| ~1e-6 on logits of
    ~10) and would rank at random; values below 1e-4 of a vector's largest count as ties (rank_correlation's
    floor). Measured with the floor: 0.99-1.00 for every desideratum of both variants; raw, 0.13-0.34.
    """
    handle = builtin_model(f"planted:{variant}")
    sites = [s for p in POSITIONS for s in sites_at(all_components(handle.arch, mlps=False), p)]
    for desideratum in ("object", "label", "position"):
        batch = encode_pairs(entity_triples(desideratum, 24, n_boxes=5, seed=1, tokenizer=handle.tokenizer),
                             handle.tokenizer)
        estimate = attribution_scan(handle, [batch], sites, metric=logit_diff)
        exact = _effects(handle, [batch], sites, logit_diff)
        rho = rank_correlation(estimate, exact, floor=1e-4)
        assert rho >= 0.8, (variant, desideratum, rho)


def test_attribution_ranks_correlate_with_patching_on_a_trained_toy_model(builtin_model):
    """toy:entity-base (a trained Llama), every head at the three positions, 5 boxes.

    Measured (64 triples): Object 0.98 (target logit and logit difference), Position 0.86 (target logit). The
    Label desideratum correlates at only ~0.6 (target logit) there: its patches move the attention of later heads
    by whole positions, far outside the first-order regime, and attribution misranks those heads; it is not
    asserted (bench/BENCHMARKS.md has every figure).
    """
    handle = builtin_model("toy:entity-base")
    sites = [s for p in POSITIONS for s in sites_at(all_components(handle.arch, mlps=False), p)]
    for desideratum, metric in (("object", target_logit), ("object", logit_diff), ("position", target_logit)):
        batch = encode_pairs(entity_triples(desideratum, 48, n_boxes=5, seed=1, tokenizer=handle.tokenizer),
                             handle.tokenizer)
        rho = rank_correlation(attribution_scan(handle, [batch], sites, metric=metric),
                               _effects(handle, [batch], sites, metric))
        assert rho >= 0.8, (desideratum, metric.__name__, rho)


@pytest.mark.parametrize("variant", ["strong", "positional"])
def test_planted_heads_rank_first_for_their_desideratum(builtin_model, variant):
    """rank_sites over every head and MLP at the three positions: the ground truth's heads (at their positions)
    are exactly the top of the ranking by increase of the target logit, for each desideratum that has any."""
    handle = builtin_model(f"planted:{variant}")
    truth = planted.ground_truth(variant)["patching"]
    for desideratum, table in truth.items():
        expected = {Site(Component.parse(c), p) for p, heads in table.items() for c in heads}
        if not expected:
            continue
        batch = encode_pairs(entity_triples(desideratum, 24, n_boxes=5, seed=2, tokenizer=handle.tokenizer),
                             handle.tokenizer)
        ranked = rank_sites(handle, [batch], POSITIONS, by="increase", metric=target_logit)
        assert len(ranked) == len(POSITIONS) * 15
        top = {site for site, _ in ranked[:len(expected)]}
        assert top == expected, (desideratum, ranked[:len(expected) + 2])
        assert ranked[len(expected) - 1][1] > 10 * abs(ranked[len(expected)][1])  # by a wide margin
    top3 = rank_sites(handle, [batch], ["last"], k=3, mlps=False)
    assert len(top3) == 3 and all(s.position == "last" and s.component.is_head for s, _ in top3)


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)  # ties share a rank
    assert rank_correlation([1e-9, -1e-9, 1.0], [-1e-9, 1e-9, 2.0], floor=1e-4) == pytest.approx(1.0)
    assert rank_correlation([1e-9, -1e-9, 1.0], [-1e-9, 1e-9, 2.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one length"):
        rank_correlation([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="constant"):
        rank_correlation([1, 1, 1], [1, 2, 3])


# ---- edge attribution -------------------------------------------------------------------------------------------


def test_edge_to_the_logits_is_the_node_score_where_it_is_the_only_path(linear):
    """In the linear model a last-layer head at the last token reaches the metric only by the direct path, so its
    edge to the logits equals its node attribution (= its exact patching effect); an earlier head's edge is its
    contribution read by the unembedding alone: (U[target] . W_O dz) computed here with the weights."""
    handle, module = linear
    pair = _pairs(handle.tokenizer, seed=2)
    senders = [Site(Component(2, 1)), Site(Component(2, 3)), Site(Component(0, 2)), Site(Component(1))]
    edges = edge_attribution(handle, [pair], senders, LOGITS, metric=target_logit)
    assert edges.shape == (1, len(senders))
    nodes = attribution_scan(handle, [pair], senders[:2], metric=target_logit)
    assert torch.allclose(edges[0, :2], nodes, atol=1e-5)
    alt, orig = collect(handle, pair.alternate, senders), collect(handle, pair.original, senders)
    unembed = module.lm_head.weight[pair.target_ids]                   # (batch, d), the final norm is the identity
    head_cols = handle.arch.head_slice(2)
    dz = (alt[("head", 0, "last")] - orig[("head", 0, "last")])[:, head_cols]
    direct_head = (unembed * (dz @ module.model.layers[0].self_attn.o_proj.weight[:, head_cols].T)).sum(-1).mean()
    direct_mlp = (unembed * (alt[("mlp", 1, "last")] - orig[("mlp", 1, "last")])).sum(-1).mean()
    assert float(edges[0, 2]) == pytest.approx(float(direct_head), abs=1e-5)
    assert float(edges[0, 3]) == pytest.approx(float(direct_mlp), abs=1e-5)
    assert min(abs(float(direct_head)), abs(float(direct_mlp))) > 1e-3


def _path_reference(module, arch, batch, sender, receiver, metric, eps=1e-4):
    """Plain PyTorch, float64: g_r . (z_r(x + eps dc) - z_r(x - eps dc)) / (2 eps), where x is the residual stream
    entering the receiver's layer, dc the sender's change of its residual contribution at the sender's token and
    g_r the gradient of the metric at the receiver's output (a central difference along the direct path)."""
    examples = torch.arange(batch.size)
    o_proj = lambda layer: arch.attn_out(module, layer)  # noqa: E731
    rows = {}

    def grab(name, layer):
        def hook(m, args):
            x = args[0].detach().requires_grad_(name == "grad")  # a leaf: its .grad is dM/dz at this layer
            rows[name] = x
            return (x, *args[1:])
        return o_proj(layer).register_forward_pre_hook(hook)

    def run(prompts, name, layer, shift=None):
        hooks = [grab(name, layer)]
        if shift is not None:
            hooks.append(arch.layer(module, receiver.component.layer).register_forward_pre_hook(
                lambda m, args: (args[0] + shift, *args[1:])))
        try:
            return plain_hooks._forward(module, prompts)
        finally:
            for h in hooks:
                h.remove()

    layer_s, cols_s = sender.component.layer, arch.head_slice(sender.component.head)
    with torch.no_grad():
        run(batch.alternate, "alt", layer_s)
        run(batch.original, "orig", layer_s)
        dz = torch.zeros_like(rows["orig"][examples, batch.original.positions[sender.position]])
        dz[:, cols_s] = (rows["alt"][examples, batch.alternate.positions[sender.position]]
                         - rows["orig"][examples, batch.original.positions[sender.position]])[:, cols_s]
        dc = o_proj(layer_s)(dz) - o_proj(layer_s)(torch.zeros_like(dz))
        shift = torch.zeros(batch.size, batch.original.width, arch.d_model, dtype=dc.dtype)
        shift[examples, batch.original.positions[sender.position]] = eps * dc
    with torch.enable_grad():
        module.requires_grad_(False)
        logits = run(batch.original, "grad", receiver.component.layer)
        metric(logits, batch).sum().backward()
    t = batch.original.positions[receiver.position]
    cols_r = arch.head_slice(receiver.component.head)
    g = rows["grad"].grad[examples, t][:, cols_r]
    with torch.no_grad():
        run(batch.original, "up", receiver.component.layer, shift)
        run(batch.original, "down", receiver.component.layer, -shift)
    dz_r = (rows["up"] - rows["down"])[examples, t][:, cols_r] / (2 * eps)
    return float((g * dz_r).sum() / batch.size)


def test_edge_to_a_head_equals_a_plain_pytorch_finite_difference(word_tokenizer):
    """GPT-2 in float64 (Llama computes its norms and softmax in float32 whatever the dtype, too coarse for a
    finite difference)."""
    module = random_model("gpt2", vocab_size=len(word_tokenizer), n_layers=3, n_heads=4, d_model=64, seed=11)
    module = module.double()
    handle = load_model(module, tokenizer=word_tokenizer)
    pair = _pairs(word_tokenizer, seed=4)
    senders = [Site(Component(0, 1), "query_label"), Site(Component(1, 2)), Site(Component(0, 3), "last")]
    receivers = [Site(Component(2, 0)), Site(Component(1, 1))]
    edges = edge_attribution(handle, [pair], senders, receivers, metric=logit_diff)
    assert edges.shape == (2, 3)
    for i, r in enumerate(receivers):
        for j, s in enumerate(senders):
            if s.component.layer >= r.component.layer:
                assert edges[i, j] == 0  # no path from a sender in the receiver's layer or above
                continue
            expected = _path_reference(module, handle.arch, pair, s, r, logit_diff)
            assert float(edges[i, j]) == pytest.approx(expected, rel=1e-5, abs=1e-12), (r, s)
    assert edges.abs().max() > 1e-6  # random GPT-2 init: small but float64-exact effects


@pytest.mark.parametrize("variant", ["strong", "positional"])
def test_edges_follow_the_planted_circuit(builtin_model, variant):
    """Among every head and MLP at the three positions, the strongest edge into each circuit head is its planted
    input (ground truth), and the fetcher's edge to the logits is the strongest one there."""
    handle = builtin_model(f"planted:{variant}")
    senders = [s for p in POSITIONS for s in sites_at(all_components(handle.arch), p)]
    fetcher, mover = Site(planted.FETCHER, "last"), Site(planted.MOVER, "last")
    if variant == "strong":   # object: binder -> fetcher's values; label: mover -> fetcher's query
        cases = {"object": {fetcher: Site(planted.BINDER, "prev_query_label")}, "label": {fetcher: mover}}
    else:                     # position: detector -> transmitter -> fetcher
        cases = {"position": {mover: Site(planted.POSITION_DETECTOR, "query_label"), fetcher: mover}}
    for desideratum, edges in cases.items():
        batch = encode_pairs(entity_triples(desideratum, 16, n_boxes=5, seed=3, tokenizer=handle.tokenizer),
                             handle.tokenizer)
        receivers = list(edges)
        scores_ = edge_attribution(handle, [batch], senders, receivers, metric=target_logit)
        for i, r in enumerate(receivers):
            best = senders[int(scores_[i].abs().argmax())]
            assert best == edges[r], (desideratum, r, best)
        to_logits = edge_attribution(handle, [batch], senders, LOGITS, metric=target_logit)[0]
        if desideratum == "object":
            assert senders[int(to_logits.abs().argmax())] == fetcher


def test_edge_and_node_errors(linear, builtin_model, word_tokenizer):
    handle, _ = linear
    pair = _pairs(handle.tokenizer)
    sites = [Site(Component(1, 0))]
    with pytest.raises(ValueError, match="not differentiable"):
        attribution_scan(handle, [pair], sites, metric=target_hit)
    with pytest.raises(ValueError, match="not differentiable"):
        attribution_scan(handle, [pair], sites, metric=lambda logits, batch: logits.argmax(-1).float())
    with pytest.raises(ValueError, match="no source to patch from"):
        attribution_scan(handle, [PairBatch(pair.original, target_ids=pair.target_ids)], sites)
    with pytest.raises(ValueError, match="donor= or values=, not both"):
        attribution_scan(handle, [pair], sites, donor=handle, values={})
    with pytest.raises(ValueError, match="at least one patch"):
        attribution_scan(handle, [pair], [])
    with pytest.raises(ValueError, match="not defined for these prompts"):
        attribution_scan(handle, [pair], [Site(Component(0, 0), "nowhere")])
    with pytest.raises(ValueError, match="scores against target tokens"):
        attribution_scan(handle, [PairBatch(pair.original, pair.alternate)], sites)
    with pytest.raises(ValueError, match="choose one of"):
        rank_sites(handle, [pair], by="largest")
    with pytest.raises(ValueError, match="k must be at least 1"):
        rank_sites(handle, [pair], k=0)
    with pytest.raises(NotImplementedError, match="query/key/value input from the architecture adapter"):
        edge_attribution(handle, [pair], sites, [Site(Component(2, 0))], receiver_input="q")
    with pytest.raises(ValueError, match="receiver_input="):
        edge_attribution(handle, [pair], sites, [Site(Component(2, 0))], receiver_input="query")
    with pytest.raises(ValueError, match="MLP receivers are not supported"):
        edge_attribution(handle, [pair], sites, [Site(Component(2))])
    with pytest.raises(ValueError, match="'logits' or a list of head sites"):
        edge_attribution(handle, [pair], sites, "logit")
    with pytest.raises(ValueError, match="at least one sender"):
        edge_attribution(handle, [pair], [], LOGITS)
    gemma2 = load_model(random_model("gemma2", vocab_size=len(word_tokenizer), n_layers=2, n_heads=4, d_model=32),
                        tokenizer=word_tokenizer)
    with pytest.raises(ValueError, match="normalises each block's attention and MLP outputs"):
        edge_attribution(gemma2, [_pairs(word_tokenizer)], sites, LOGITS)


def test_site_grid_and_heatmap(linear, tmp_path):
    handle, _ = linear
    sites = [Site(Component(0, 1)), Site(Component(2)), Site(Component(1, 3), "query_label")]
    grid = site_grid(handle, sites, [0.5, -2.0, 7.0], "last")
    assert grid.shape == (3, 5)
    assert grid[0, 1] == 0.5 and grid[2, 4] == -2.0 and int((~torch.isnan(torch.tensor(grid))).sum()) == 2
    path = site_heatmap(tmp_path / "attr.png", handle, sites, [0.5, -2.0, 7.0], "last", "attribution at last")
    assert path.exists() and path.stat().st_size > 1000


def test_offloaded_device_map_equals_in_memory(word_tokenizer, tmp_path):
    """accelerate's hooks (a layer offloaded to disk, the CPU stand-in for sharding) leave attribution, edge
    scores and the logit lens unchanged: the zero leaves are made where each row lives and the ad hoc module calls
    (o_proj, final norm, unembedding) go through the hooks."""
    from lib.logit_lens import logit_lens

    module = random_model("llama", vocab_size=len(word_tokenizer), n_layers=3, n_heads=4, d_model=64, seed=13)
    module.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    handles = [load_model(module, tokenizer=word_tokenizer),
               load_model(tmp_path, device_map=device_map, offload_folder=str(tmp_path / "offload"))]
    pair = _pairs(word_tokenizer, seed=5)
    sites = [Site(Component(1, 2)), Site(Component(1)), Site(Component(0, 1), "query_label")]
    nodes = [attribution_scan(h, [pair], sites, metric=logit_diff) for h in handles]
    edges = [edge_attribution(h, [pair], sites[2:], [Site(Component(1, 0)), Site(Component(2, 3))]) for h in handles]
    lenses = [logit_lens(h, pair, k=4) for h in handles]
    assert torch.allclose(nodes[0], nodes[1], atol=1e-5) and nodes[0].abs().max() > 1e-4
    assert torch.allclose(edges[0], edges[1], atol=1e-6) and edges[0].abs().max() > 1e-6
    assert torch.allclose(lenses[0].top_logits, lenses[1].top_logits, atol=1e-5)
