"""Path patching recovers the planted circuits (lib.builtin.planted.ground_truth): iteration by iteration, and each
edge through the receiver input it really uses (q, k or v)."""
from __future__ import annotations

import pytest
import torch

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


# ---- receivers by input: q / k / v ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def positional(builtin_model):
    handle = builtin_model("planted:positional")
    triples = entity_noise_triples(12, n_boxes=3, seed=4, tokenizer=handle.tokenizer)
    return handle, encode_pairs(triples, handle.tokenizer)


def _inputs(handle, batch, senders, receiver, positions):
    """{input: scores} of the senders' paths into the receiver head's q at `positions["q"]`, k and v at theirs."""
    return {kind: path_patch(handle, batch, senders, [Site(receiver, positions[kind])], receiver_input=kind)
            for kind in ("q", "k", "v")}


def test_each_planted_edge_reaches_the_value_fetcher_through_the_right_input(strong):
    """The mover writes the queried label where the fetcher queries (Q at last); the binder writes the object
    where the fetcher reads values (V at the queried label's box). Its K there is the label and the 'filled' flag:
    the noise prompt's binder writes a flag at that token too, so the K path changes nothing."""
    handle, batch = strong
    mover, binder = Site(planted.MOVER, "last"), Site(planted.BINDER, "prev_query_label")
    senders = candidate_senders(handle, ("last", "prev_query_label"), [Site(planted.FETCHER, "last")])
    into = _inputs(handle, batch, senders, planted.FETCHER, {"q": "last", "k": "prev_query_label",
                                                             "v": "prev_query_label"})
    assert into["q"][mover] < -0.5 and into["v"][binder] < -0.5
    assert abs(into["k"][binder]) < 0.01 and abs(into["q"][binder]) < 0.01
    assert abs(into["k"][mover]) < 0.01 and abs(into["v"][mover]) < 0.01   # last comes after the box label
    for kind, scores in into.items():
        rest = [v for s, v in scores.items() if s not in (mover, binder)]
        assert max(abs(v) for v in rest) < 0.01, kind   # the distractors reach no input


def test_the_position_detector_reaches_the_transmitter_through_its_value(positional):
    """planted:positional: the detector writes a pointer at the query label, the transmitter reads it as a value
    (its key there is the embedding's position code); the transmitter reaches the fetcher through its query."""
    handle, batch = positional
    detector, transmitter = Site(planted.POSITION_DETECTOR, "query_label"), Site(planted.POSITION_TRANSMITTER, "last")
    senders = candidate_senders(handle, ("query_label",), [Site(planted.POSITION_TRANSMITTER, "last")])
    into = _inputs(handle, batch, senders, planted.POSITION_TRANSMITTER,
                   {"q": "last", "k": "query_label", "v": "query_label"})
    assert into["v"][detector] < -0.5
    assert abs(into["k"][detector]) < 0.01 and abs(into["q"][detector]) < 0.01
    fetcher_q = path_patch(handle, batch, candidate_senders(handle, ("last",), [Site(planted.FETCHER, "last")]),
                           [Site(planted.FETCHER, "last")], receiver_input="q")
    assert fetcher_q[transmitter] < -0.5
    assert max(abs(v) for s, v in fetcher_q.items() if s != transmitter) < 0.01


def test_identical_clean_and_noise_prompts_change_nothing(strong):
    handle, batch = strong
    same = type(batch)(batch.original, batch.original, batch.target_ids).select(torch.arange(6))
    senders = [Site(planted.MOVER, "last"), Site(planted.BINDER, "prev_query_label"), Site(Component(0, 3), "last")]
    fetcher = Site(planted.FETCHER, "last")
    for kind, receivers in [("out", None), ("out", [fetcher]), ("q", [fetcher]),
                            ("k", [Site(planted.FETCHER, "prev_query_label")]),
                            ("v", [Site(planted.FETCHER, "prev_query_label")])]:
        scores = path_patch(handle, same, senders, receivers, receiver_input=kind)
        assert max(abs(v) for v in scores.values()) < 1e-5, (kind, receivers)


def test_batched_senders_equal_one_sender_per_pass(strong):
    handle, batch = strong
    batch = batch.select(torch.arange(6))
    for kind, position in [("out", None), ("q", "last"), ("v", "prev_query_label")]:
        # receivers in several layers, some below some senders (their values are recorded clean)
        receivers = None if position is None else [Site(planted.FETCHER, position), Site(Component(0, 2), position),
                                                   Site(Component(1, 3), position)]
        senders = [Site(planted.MOVER, "last"), Site(planted.BINDER, "prev_query_label"), Site(Component(0, 0), "last"),
                   Site(Component(0, 3), "prev_query_label"), Site(Component(1, 1), "last"),
                   Site(Component(1, 0), "prev_query_label"), Site(Component(0, 2), "last")]
        if receivers is None:
            senders.append(Site(planted.FETCHER, "last"))
        one = path_patch(handle, batch, senders, receivers, receiver_input=kind, senders_per_pass=1,
                         reuse_prefix=False)
        assert min(one.values()) < -0.5   # some path matters: equality is not trivial
        options = [{"senders_per_pass": 3}]   # stacked, with the clean prefix reused
        if kind == "q":
            options += [{"senders_per_pass": 8, "reuse_prefix": False},
                        {"senders_per_pass": 4, "batching": "invokes", "reuse_prefix": False}]
        for option in options:
            batched = path_patch(handle, batch, senders, receivers, receiver_input=kind, **option)
            assert max(abs(one[s] - batched[s]) for s in senders) < 1e-5, (kind, option)


def test_bad_receiver_inputs_are_refused(strong):
    handle, batch = strong
    fetcher, sender = Site(planted.FETCHER, "last"), [Site(planted.MOVER, "last")]
    with pytest.raises(ValueError, match="unknown receiver input 'z'"):
        path_patch(handle, batch, sender, [fetcher], receiver_input="z")
    with pytest.raises(ValueError, match="needs receivers"):
        path_patch(handle, batch, sender, None, receiver_input="q")
    with pytest.raises(ValueError, match="not MLPs"):
        path_patch(handle, batch, [Site(Component(0), "last")], [fetcher])
    with pytest.raises(ValueError, match="reuse_prefix needs batching='stack'"):
        path_patch(handle, batch, sender, [fetcher], batching="invokes")
    with pytest.raises(ValueError, match="senders_per_pass must be at least 1"):
        path_patch(handle, batch, sender, [fetcher], senders_per_pass=0)


def test_forward_passes_count_the_traces(strong):
    """forward_passes (the bench's count for a Llama-7B-shaped model) is the number of traces a call opens."""
    from lib.path_patching import forward_passes

    handle, batch = strong
    batch = batch.select(torch.arange(4))
    senders = candidate_senders(handle, ("last",))
    opened = []
    trace = handle.trace

    def counting(*args, **kwargs):
        opened.append(1)
        return trace(*args, **kwargs)

    try:
        handle.trace = counting
        path_patch(handle, batch, senders, senders_per_pass=5)
        direct = len(opened)
        opened.clear()
        path_patch(handle, batch, senders[:8], [Site(planted.FETCHER, "last")], receiver_input="q", senders_per_pass=3)
    finally:
        del handle.trace   # the instance attribute; the class's method is back
    assert direct == forward_passes(len(senders), 5, receivers=False)
    assert len(opened) == forward_passes(8, 3, receivers=True)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt_neox", "gptj"])
def test_prefix_reuse_equals_the_full_run_on_other_architectures(kind, word_tokenizer):
    """The clean prefix's keys and values (a one-buffer cache layer; gemma2's sliding-window layers keep
    transformers' own) give the full run's scores, with rotary embeddings and grouped-query attention."""
    from lib.builtin.random_models import random_model
    from lib.models import load_model

    module = random_model(kind, vocab_size=len(word_tokenizer), n_layers=2, n_heads=4, d_model=32,
                          n_kv_heads=2 if kind in ("llama", "gemma2") else None, seed=5)
    with torch.no_grad():   # larger weights: sharper attention, so the paths move p by more than the tolerance
        for p in module.parameters():
            p.mul_(3)
    handle = load_model(module.double(), tokenizer=word_tokenizer)   # float64: the comparison sees only the method
    batch = encode_pairs(entity_noise_triples(4, n_boxes=3, seed=8, tokenizer=word_tokenizer), word_tokenizer)
    senders = [Site(Component(0, h), p) for h in range(4) for p in ("query_label", "last")]
    for kind_, receivers in [("out", None), ("v", [Site(Component(1, 1), "query_label")])]:
        full = path_patch(handle, batch, senders, receivers, receiver_input=kind_, reuse_prefix=False)
        reused = path_patch(handle, batch, senders, receivers, receiver_input=kind_, senders_per_pass=3)
        assert max(abs(v) for v in full.values()) > 1e-4   # the paths move p: equality is not trivial
        # float64, except GPT-J's attention scores (float32 by construction): 1e-7 there
        assert max(abs(full[s] - reused[s]) for s in senders) < 1e-6, kind_
