"""Path patching recovers the planted circuit of planted:strong (lib.planted.ground_truth), iteration by iteration."""
from __future__ import annotations

import pytest

from lib import planted
from lib.components import Component
from lib.data_gen import encode_batch, entity_noise_triples
from lib.models import load_model
from lib.path_patching import candidate_senders, path_patch, top_senders
from lib.patching import Site


@pytest.fixture(scope="module")
def strong():
    handle = load_model("planted:strong")
    # one queried box, so every named position sits at one token index: one group, fewer forward passes
    triples = [t for t in entity_noise_triples(60, n_boxes=3, seed=3, tokenizer=handle.tokenizer)
               if t.original.meta["query"] == 1][:12]
    original = encode_batch([t.original for t in triples], handle.tokenizer)
    noise = encode_batch([t.alternate for t in triples], handle.tokenizer)
    return handle, original, noise


def test_direct_paths_to_the_logits_rank_the_value_fetcher_first(strong):
    handle, original, noise = strong
    senders = candidate_senders(handle, ("last", "prev_query_label"))
    scores = path_patch(handle, original, noise, senders)
    (first, score), (_, second) = top_senders(scores, 2)
    assert first == Site(planted.FETCHER, "last")
    assert str(planted.FETCHER) in planted.ground_truth("strong")["desiderata"]["object"]
    assert score < -0.6 and second > -0.05   # only the fetcher writes to the logits directly
    # the binder and the mover act through the fetcher, which is frozen: no direct path
    assert abs(scores[Site(planted.BINDER, "prev_query_label")]) < 0.05
    assert abs(scores[Site(planted.MOVER, "last")]) < 0.05


def test_paths_into_the_fetcher_find_the_mover_and_the_binder(strong):
    handle, original, noise = strong
    receiver = Site(planted.FETCHER, "last")
    senders = candidate_senders(handle, ("last", "prev_query_label"), receivers=[receiver])
    assert receiver not in senders and all(s.component.layer < 2 for s in senders)
    scores = path_patch(handle, original, noise, senders, receivers=[receiver])
    top = [s for s, v in top_senders(scores, 2)]
    assert set(top) == {Site(planted.MOVER, "last"), Site(planted.BINDER, "prev_query_label")}
    assert scores[Site(planted.BINDER, "prev_query_label")] < -0.6
    assert scores[Site(planted.MOVER, "last")] < -0.4
    rest = [v for s, v in scores.items() if s not in top]
    assert max(abs(v) for v in rest) < 0.05   # distractors, and the binder at the last token


def test_mismatched_noise_is_refused(strong):
    handle, original, noise = strong
    short = encode_batch([t.original for t in entity_noise_triples(2, n_boxes=2, tokenizer=handle.tokenizer)],
                         handle.tokenizer)
    with pytest.raises(ValueError, match="same shape"):
        path_patch(handle, original, short, [Site(Component(0, 0), "last")])
