"""Remote runs on a real NDIF server started on this machine (`make ndif-up`) equal local runs on the same model.

Every test here talks to the server; they are skipped when it is not running (CI starts it and sets
NDIF_REQUIRED=1, which turns the skip into a failure).
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import nnsight
import pytest
import torch

from lib.core.remote import NDIFModelNotHosted, NDIFUnreachable, ProjectRemoteBackend, RemoteError, model_key
from lib.models import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / ".ndif" / "run" / "state.json"

pytestmark = pytest.mark.remote


def _server() -> dict | None:
    """The running local NDIF's state (host, deployed models), or None."""
    if not STATE.exists():
        return None
    state = json.loads(STATE.read_text())
    try:
        with urllib.request.urlopen(f"{state['host']}/ping", timeout=3) as resp:
            return state if resp.status == 200 else None
    except OSError:
        return None


@pytest.fixture(scope="module")
def server() -> dict:
    state = _server()
    if state is None:
        reason = "the local NDIF server is not running: start it with `make ndif-up` (stop: make ndif-down)"
        if os.environ.get("NDIF_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    return state


@pytest.fixture(scope="module")
def model_dir(server) -> str:
    return server["models"]["random-llama"]["path"]


@pytest.fixture(scope="module")
def local(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def remote(server, model_dir):
    handle = load_model(model_dir, remote=True, backend=server["host"])
    handle.backend.display.enabled = False  # nnsight's live status line; keep test output readable
    return handle


def _enc(handle, texts):
    return dict(handle.tokenizer(texts, padding=True, return_tensors="pt"))


PROMPTS = ["the apple is in box a , the cup is in box b . box a contains the", "the key is in box c . box c contains the"]


def _hidden_and_logits(handle, enc):
    with handle.trace(enc):
        heads = handle.arch.attn_out(handle.model, 1).input.save()
        logits = handle.arch.unembed(handle.model).output.save()
    return heads, logits


def test_remote_handle_is_bound_to_the_deployed_model(remote, model_dir, server):
    assert remote.remote and remote.backend.host == server["host"]
    assert remote.backend.model_key == model_key(str(Path(model_dir).resolve()))
    assert remote.backend.model_key == server["models"]["random-llama"]["model_key"]
    assert all(p.device.type == "meta" for p in remote.lm._module.parameters())  # no local weights


def test_remote_trace_equals_local(local, remote):
    enc = _enc(local, PROMPTS)
    heads_l, logits_l = _hidden_and_logits(local, enc)
    heads_r, logits_r = _hidden_and_logits(remote, enc)
    assert logits_r.shape == logits_l.shape == (2, enc["input_ids"].shape[1], len(local.tokenizer))
    assert torch.allclose(heads_r, heads_l, atol=1e-5)
    assert torch.allclose(logits_r, logits_l, atol=1e-5)


def test_remote_intervention_equals_local(local, remote):
    """An edit (zeroing one head through the adapter) runs on the server as it does locally."""
    enc = _enc(local, PROMPTS)

    def zero_head(handle):
        with handle.trace(enc):
            module = handle.arch.attn_out(handle.model, 1)
            x = module.input.clone()
            x[..., handle.arch.head_slice(2)] = 0
            module.input = x
            logits = handle.arch.unembed(handle.model).output.save()
        return logits

    patched_l, patched_r = zero_head(local), zero_head(remote)
    _, clean = _hidden_and_logits(local, enc)
    assert torch.allclose(patched_r, patched_l, atol=1e-5)
    assert (patched_r - clean).abs().max() > 1e-3  # the edit happened on the server


def _mask_loop(handle, orig, alt, target, steps=4):
    """A DCM-style loop in ONE session: a head mask blended into activations, loss.backward in each trace."""
    n_heads = handle.arch.n_heads
    with handle.session():
        logit = torch.nn.Parameter(torch.zeros(n_heads))  # sigmoid(0) = 0.5: every head half patched
        opt = torch.optim.Adam([logit], lr=0.2)
        losses = nnsight.save([])
        for _ in range(steps):
            with handle.trace(alt):
                v_alt = handle.arch.attn_out(handle.model, 1).input
            with handle.trace(orig):
                module = handle.arch.attn_out(handle.model, 1)
                x = module.input
                w = torch.sigmoid(logit).repeat_interleave(x.shape[-1] // n_heads)
                module.input = w * x + (1 - w) * v_alt
                logits = handle.arch.unembed(handle.model).output
                loss = -logits[:, -1, target].mean() + 0.05 * (1 - torch.sigmoid(logit)).sum()
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        mask = nnsight.save(torch.sigmoid(logit).detach().clone())
    return losses, mask


def test_gradient_loop_in_one_remote_session_equals_local(local, remote):
    orig = _enc(local, ["the apple is in box a . box a contains the"])
    alt = _enc(local, ["the cup is in box b . box b contains the"])
    target = local.tokenizer.convert_tokens_to_ids("cup")
    losses_l, mask_l = _mask_loop(local, orig, alt, target)
    losses_r, mask_r = _mask_loop(remote, orig, alt, target)
    assert len(losses_r) == 4
    assert losses_r == pytest.approx(losses_l, abs=1e-5)
    assert torch.allclose(mask_r, mask_l, atol=1e-5)
    assert (mask_r - 0.5).abs().max() > 1e-3  # the optimiser moved the mask on the server


def test_error_in_traced_code_comes_back_with_the_server_message(remote):
    enc = _enc(remote, PROMPTS)
    with pytest.raises(RemoteError) as info:
        with remote.trace(enc):
            hidden = remote.arch.attn_out(remote.model, 1).input
            bad = hidden[..., 10_000].save()  # noqa: F841  (index out of range on the server)
    assert not isinstance(info.value, (NDIFUnreachable, NDIFModelNotHosted))
    assert "out of bounds" in str(info.value) or "index" in str(info.value).lower()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stopped_server_gives_the_documented_error_after_bounded_retries(model_dir, local):
    """Nothing listens at the host (a stopped server): retried with backoff, then NDIFUnreachable saying what to do."""
    host = f"http://127.0.0.1:{_free_port()}"
    backend = ProjectRemoteBackend(model_key(model_dir), host=host, retries=2, backoff_s=0.2)
    handle = load_model(model_dir, remote=True, backend=backend)
    t0 = time.time()
    with pytest.raises(NDIFUnreachable) as info:
        with handle.trace(_enc(local, PROMPTS)):
            handle.arch.unembed(handle.model).output.save()
    elapsed = time.time() - t0
    message = str(info.value)
    assert host in message and "after 3 tries" in message and "make ndif-up" in message
    assert 0.2 + 0.4 <= elapsed < 30  # two backoffs (0.2 s, 0.4 s), then it gives up


def test_unknown_model_gives_the_documented_error(server, model_dir, local):
    missing = str(ROOT / ".ndif" / "models" / "no-such-model")
    backend = ProjectRemoteBackend(model_key(missing), host=server["host"], retries=0)
    handle = load_model(model_dir, remote=True, backend=backend)  # traced like random-llama, sent as another key
    with pytest.raises(NDIFModelNotHosted) as info:
        with handle.trace(_enc(local, PROMPTS)):
            handle.arch.unembed(handle.model).output.save()
    message = str(info.value)
    assert "does not host model" in message and "no-such-model" in message and "make ndif-up" in message


def test_in_memory_model_cannot_be_remote(local):
    with pytest.raises(ModelLoadError, match="cannot run remotely"):
        load_model(local.lm._module, tokenizer=local.tokenizer, remote=True)


# ---- the project's methods, remote against local on the same model --------------------------------------------

def _entity_batches(handle, n=8, seed=0):
    import random

    from lib.data_gen import encode_pairs, random_entity_prompt
    from lib.types import Triple

    rng = random.Random(seed)
    originals = [random_entity_prompt(rng, rng.choice([2, 3])) for _ in range(n)]
    alternates = [random_entity_prompt(rng, rng.choice([2, 3])) for _ in range(n)]
    pair = encode_pairs([Triple(o, a, a.answer, "object") for o, a in zip(originals, alternates)], handle.tokenizer)
    return originals, alternates, pair


def _sites():
    from lib.types import Component, Site

    return [Site(Component(0, 1), "query_label"), Site(Component(1, 3)), Site(Component(1, 0)), Site(Component(1)),
            Site(Component(1, 2), "prev_query_label")]


def test_activation_patching_remote_equals_local(local, remote):
    from lib.patching import activation_patch, clean_logits

    _, _, pair = _entity_batches(local)
    patched_l = activation_patch(local, pair, _sites())
    patched_r = activation_patch(remote, pair, _sites())
    assert patched_r.shape == (8, len(local.tokenizer))
    assert torch.allclose(patched_r, patched_l, atol=1e-5)
    assert (patched_r - clean_logits(local, pair.original)).abs().max() > 1e-3  # the patch changed the output


def test_patching_scan_remote_equals_local(local, remote):
    """patching_scan sends one request per batch (a session holding the source run and every patched run)."""
    from lib.patching import patching_scan
    from lib.scores import target_prob

    _, _, pair = _entity_batches(local)
    patches = [*_sites(), _sites()[:2]]
    scan_l = patching_scan(local, [pair], patches, metric=target_prob)
    scan_r = patching_scan(remote, [pair], patches, metric=target_prob)
    assert scan_r.shape == (len(patches),)
    assert torch.allclose(scan_r, scan_l, atol=1e-5)
    assert scan_l.max() > scan_l.min()


def test_mean_ablation_remote_equals_local(local, remote):
    from lib.patching import clean_logits, mean_ablate, mean_activations

    _, _, pair = _entity_batches(local)
    ob, ab = pair.original, pair.alternate
    sites = _sites()[1:4]
    means_l = mean_activations(local, [ob, ab], sites)
    means_r = mean_activations(remote, [ob, ab], sites)
    assert means_r.keys() == means_l.keys()
    assert all(torch.allclose(means_r[k], means_l[k], atol=1e-5) for k in means_l)
    ablated_l = mean_ablate(local, ob, sites, means_l)
    ablated_r = mean_ablate(remote, ob, sites, means_r)
    assert torch.allclose(ablated_r, ablated_l, atol=1e-5)
    assert (ablated_r - clean_logits(local, ob)).abs().max() > 1e-3


def test_circuit_evaluation_is_one_remote_request_and_equals_local(server):
    """On the deployed paper pair's base, whose circuit is known: the accuracies are far from 0, so equal means
    the same ablations ran."""
    from lib import metrics as M
    from lib.builtin.circuits import planted_circuit
    from lib.data_gen import encode_pairs, entity_noise_triples

    local = load_model("planted:paper-base")
    remote = load_model("planted:paper-base", remote=True, backend=server["host"])
    remote.backend.display.enabled = False
    groups = planted_circuit("paper-base", 3)
    circuit = [s for sites in groups.values() for s in sites]

    def batch(n, seed):
        return encode_pairs(entity_noise_triples(n, n_boxes=3, seed=seed, tokenizer=local.tokenizer), local.tokenizer)

    means = M.whole_sequence_means(local, [batch(32, 1)])
    args = ([batch(24, 2)], circuit, means, groups)
    table_l = M.circuit_evaluation(local, *args, n_random=3, n_subsets=2)
    remote.backend.reset_traffic()
    table_r = M.circuit_evaluation(remote, *args, n_random=3, n_subsets=2)
    assert remote.backend.reset_traffic()["requests"] == 1
    assert table_l["model"] > 0.5 and table_l["faithfulness"] > 0.9   # the ablations did something to compare
    assert table_r.keys() == table_l.keys()
    flat = lambda t: [t["model"], t["circuit"], *t["random_circuits"], *t["completeness_per_group"].values(),  # noqa: E731
                      *t["completeness_random_K"]]
    assert flat(table_r) == pytest.approx(flat(table_l), abs=1e-6)


def test_dcm_in_one_remote_session_equals_local(local, remote):
    """train_mask runs its whole optimisation in one handle.in_one_request: one NDIF request for all the steps."""
    from lib.mask_intervention import DCMConfig, train_mask
    from lib.types import Triple

    originals, alternates, _ = _entity_batches(local, n=24, seed=1)
    triples = [Triple(o, a, a.answer, "object") for o, a in zip(originals, alternates)]
    train, val = {"object": triples[:16]}, {"object": triples[16:]}
    config = DCMConfig(lam=0.01, loss="logit_diff", lr=0.1, epochs=2, batch_size=8, init="half", prune=False)
    result_l = train_mask(local, train, val, _sites(), config, progress=False)
    remote.backend.reset_traffic()
    result_r = train_mask(remote, train, val, _sites(), config, progress=False)
    traffic = remote.backend.reset_traffic()
    assert traffic["requests"] == 1 and traffic["bytes_sent"] > 0 and traffic["bytes_received"] > 0
    losses_l = [h["loss"]["object"] for h in result_l.history]
    losses_r = [h["loss"]["object"] for h in result_r.history]
    assert len(losses_r) == 4  # 2 epochs x 2 batches
    assert losses_r == pytest.approx(losses_l, abs=1e-4)
    assert result_r.weights == pytest.approx(result_l.weights, abs=1e-4)
    assert result_r.selected_mask == result_l.selected_mask
    assert result_r.selected_val_accuracy == pytest.approx(result_l.selected_val_accuracy)
    assert max(abs(w - 1) for w in result_r.weights) > 1e-3  # the steps moved the mask on the server
    # twice the steps: still one request and the same payload (the loop runs on the server, not unrolled); the
    # compressed bytes differ by a few where the config's epoch count sits (measured: 30,190 vs 30,226)
    train_mask(remote, train, val, _sites(), dataclasses.replace(config, epochs=4), progress=False)
    longer = remote.backend.reset_traffic()
    assert longer["requests"] == 1
    assert abs(longer["bytes_sent"] - traffic["bytes_sent"]) < 0.01 * traffic["bytes_sent"]


def test_builtin_models_remote_equal_local(server):
    """`make ndif-up` deploys the toy models (lib/toy_models) and the default planted model; `toy:<name>` and
    `planted:<variant>` load them remotely, under the name they were asked by."""
    builtins = sorted(name.replace("-", ":", 1) for name in server["models"] if name.startswith(("toy-", "planted-")))
    assert "planted:strong" in builtins  # the workflows' default model
    for name in builtins:
        local = load_model(name)
        remote = load_model(name, remote=True, backend=server["host"])
        remote.backend.display.enabled = False
        assert remote.backend.model_key == server["models"][name.replace(":", "-", 1)]["model_key"]
        assert remote.name == local.name == name
        enc = _enc(local, PROMPTS)
        _, logits_l = _hidden_and_logits(local, enc)
        _, logits_r = _hidden_and_logits(remote, enc)
        # float32 on another torch build (the server's is PyPI's CUDA wheel for Python 3.12): ~1e-6 of the scale
        diff, scale = (logits_r - logits_l).abs().max(), logits_l.abs().max().clamp(min=1)
        assert diff <= 1e-5 * scale, (name, diff, scale)


def test_builtin_model_that_is_not_deployed_says_so(server):
    with pytest.raises(ValueError, match="no saved copy .*make ndif-up"):
        load_model("planted:no-such-variant", remote=True, backend=server["host"])
