"""Path patching recovers the planted circuit of planted:strong (lib.planted.ground_truth), iteration by iteration."""
from __future__ import annotations

import pytest

from lib.builtin import planted
from lib.data_gen import encode_pairs, entity_noise_triples
from lib.path_patching import candidate_senders, path_patch, top_senders
from lib.types import Component, Site


@pytest.fixture(scope="module")
def strong(builtin_model):
    handle = builtin_model("planted:strong")
    # one queried box, so every named position sits at one token index: one group, fewer forward passes
    triples = [t for t in entity_noise_triples(60, n_boxes=3, seed=3, tokenizer=handle.tokenizer)
               if t.original.meta["query"] == 1][:12]
    return handle, encode_pairs(triples, handle.tokenizer)


def test_direct_paths_to_the_logits_rank_the_value_fetcher_first(strong):
    handle, batch = strong
    senders = candidate_senders(handle, ("last", "prev_query_label"))
    scores = path_patch(handle, batch, senders)
    (first, score), (_, second) = top_senders(scores, 2)
    assert first == Site(planted.FETCHER, "last")
    assert str(planted.FETCHER) in planted.ground_truth("strong")["desiderata"]["object"]
    assert score < -0.6 and second > -0.05   # only the fetcher writes to the logits directly
    # the binder and the mover act through the fetcher, which is frozen: no direct path
    assert abs(scores[Site(planted.BINDER, "prev_query_label")]) < 0.05
    assert abs(scores[Site(planted.MOVER, "last")]) < 0.05


def test_paths_into_the_fetcher_find_the_mover_and_the_binder(strong):
    handle, batch = strong
    receiver = Site(planted.FETCHER, "last")
    senders = candidate_senders(handle, ("last", "prev_query_label"), receivers=[receiver])
    assert receiver not in senders and all(s.component.layer < 2 for s in senders)
    scores = path_patch(handle, batch, senders, receivers=[receiver])
    top = [s for s, v in top_senders(scores, 2)]
    assert set(top) == {Site(planted.MOVER, "last"), Site(planted.BINDER, "prev_query_label")}
    assert scores[Site(planted.BINDER, "prev_query_label")] < -0.6
    assert scores[Site(planted.MOVER, "last")] < -0.4
    rest = [v for s, v in scores.items() if s not in top]
    assert max(abs(v) for v in rest) < 0.05   # distractors, and the binder at the last token


def test_mismatched_noise_is_refused(strong):
    handle, batch = strong
    short = encode_pairs(entity_noise_triples(2, n_boxes=2, tokenizer=handle.tokenizer), handle.tokenizer)
    mismatched = type(batch)(batch.original, short.original, batch.target_ids)
    with pytest.raises(ValueError, match="same shape"):
        path_patch(handle, mismatched, [Site(Component(0, 0), "last")])
