"""Attribution patching, edge attribution, gradient hints and the logit lens on the local NDIF server equal the same
calls run locally on the same weights (every gradient is taken inside the server-side session).

Same server, fixtures and skip/fail rule as test_remote.py: skipped when the server is not running, a failure
under NDIF_REQUIRED=1.
"""
from __future__ import annotations

import pytest
import torch

from lib.attribution import LOGITS, attribution_scan, edge_attribution, rank_sites
from lib.core.components import all_components
from lib.data_gen import encode_answers, encode_pairs, entity_triples
from lib.gradient_hints import gradient_hints
from lib.logit_lens import logit_lens
from lib.models import load_model
from lib.patching import sites_at
from lib.scores import logit_diff, target_logit
from lib.types import Component, Site
from tests.acceptance.test_remote import _entity_batches, _sites, local, model_dir, remote, server  # noqa: F401

pytestmark = pytest.mark.remote


def test_attribution_remote_equals_local(local, remote):  # noqa: F811
    _, _, pair = _entity_batches(local)
    patches = [*_sites(), _sites()[:2]]
    batches = [pair.select(torch.arange(4)), pair.select(torch.arange(4, 8))]  # one request per batch
    for metric in (target_logit, logit_diff):
        scores_l = attribution_scan(local, batches, patches, metric=metric)
        scores_r = attribution_scan(remote, batches, patches, metric=metric)
        assert scores_r.shape == (len(patches),)
        assert torch.allclose(scores_r, scores_l, atol=1e-5)
        assert scores_l.abs().max() > 1e-4  # the gradient was taken on the server


def test_edge_attribution_remote_equals_local(local, remote):  # noqa: F811
    _, _, pair = _entity_batches(local)
    senders = [Site(Component(0, 1), "query_label"), Site(Component(0, 3)), Site(Component(0)),
               Site(Component(1, 2))]
    receivers = [Site(Component(1, 0)), Site(Component(1, 3))]
    for recv in (LOGITS, receivers):
        edges_l = edge_attribution(local, [pair], senders, recv, metric=logit_diff)
        edges_r = edge_attribution(remote, [pair], senders, recv, metric=logit_diff)
        assert edges_r.shape == edges_l.shape
        assert torch.allclose(edges_r, edges_l, atol=1e-6)
        assert edges_l.abs().max() > 1e-6


def test_gradient_hints_remote_equal_local(local, remote):  # noqa: F811
    """most_dissimilar is chosen on the server (from the real unembedding), lowest_logit from the run's logits."""
    originals, _, _ = _entity_batches(local)
    batch = encode_answers(originals, local.tokenizer)
    sites = _sites()
    for wrong in ("most_dissimilar", "lowest_logit", "box"):
        hints_l = gradient_hints(local, [batch], sites, wrong=wrong)
        hints_r = gradient_hints(remote, [batch], sites, wrong=wrong)
        assert torch.allclose(hints_r, hints_l, atol=1e-5), wrong
        assert hints_r[:4].min() > 1e-3
        assert local.arch.n_layers == 2 and hints_r[4] == 0  # a last-layer head off the last token: read by nothing


def test_logit_lens_remote_equals_local(local, remote):  # noqa: F811
    originals, _, _ = _entity_batches(local)
    batch = encode_answers(originals, local.tokenizer)
    lens_l, lens_r = logit_lens(local, batch, k=4), logit_lens(remote, batch, k=4)
    assert lens_r.columns == lens_l.columns
    assert torch.allclose(lens_r.model_logits, lens_l.model_logits, atol=1e-5)
    assert torch.allclose(lens_r.target_logprob, lens_l.target_logprob, atol=1e-4)
    assert torch.allclose(lens_r.top_logits, lens_l.top_logits, atol=1e-4)
    assert torch.equal(lens_r.target_rank, lens_l.target_rank)


def test_planted_ranking_remote_equals_local(server):  # noqa: F811
    """planted:strong (deployed by make ndif-up): the remote ranking finds the planted value fetcher first."""
    local_h = load_model("planted:strong")
    remote_h = load_model("planted:strong", remote=True, backend=server["host"])
    remote_h.backend.display.enabled = False
    batch = encode_pairs(entity_triples("object", 8, n_boxes=5, seed=4, tokenizer=local_h.tokenizer),
                         local_h.tokenizer)
    sites = sites_at(all_components(local_h.arch), "last")
    ranked_l = rank_sites(local_h, [batch], sites=sites, k=3, by="increase")
    ranked_r = rank_sites(remote_h, [batch], sites=sites, k=3, by="increase")
    assert [s for s, _ in ranked_r] == [s for s, _ in ranked_l]
    assert ranked_r[0][0] == Site(Component(2, 3))
    assert [v for _, v in ranked_r] == pytest.approx([v for _, v in ranked_l], abs=1e-4)
