"""The task data: every desideratum's invariant, every positional variant, token positions under left padding,
determinism, disjoint splits, JSONL and bad input. No model runs here."""
import random
from collections import Counter

import pytest

from lib import data_gen as dg
from lib.core.tokenization import train_bpe_tokenizer

SINGLE_TOKEN_SPANS = ("object_", "label_", "query_label", "prev_query_label", "correct_object")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE (leading-space tokens) trained offline; at this size some objects stay split."""
    rng = random.Random(0)
    texts = [dg.random_entity_prompt(rng, 7).text for _ in range(300)]
    texts += [t.original.text for t in dg.vb_triples("value_dependence", 100)]
    return train_bpe_tokenizer(texts, vocab_size=400)


def _segments(prompt):
    return list(zip(prompt.meta["objects"], prompt.meta["labels"]))


def _check_entity_prompt(prompt):
    """Spans hold the words meta says they hold, and the answer is the queried box's object."""
    text, meta = prompt.text, prompt.meta
    for i, (obj, label) in enumerate(_segments(prompt)):
        assert text[slice(*prompt.spans[f"object_{i}"])] == obj
        assert text[slice(*prompt.spans[f"label_{i}"])] == label
    q = meta["query"]
    assert text[slice(*prompt.spans["query_label"])] == meta["labels"][q]
    assert prompt.spans["prev_query_label"] == prompt.spans[f"label_{q}"]
    assert prompt.spans["correct_object"] == prompt.spans[f"object_{q}"]
    assert prompt.answer == " " + meta["objects"][q]
    assert text.endswith(f"Box {meta['labels'][q]} contains the") and text[slice(*prompt.spans["last"])] == "the"
    assert len(set(meta["labels"])) == len(meta["labels"])


# ---------------------------------------------------------------------------------------------- formats


def test_prompt_formats_are_the_ones_the_toy_models_learn():
    p = dg.entity_tracking_prompt(["apple", "cup"], ["F", "Q"], 0)
    assert p.text == "The apple is in Box F, the cup is in Box Q. Box F contains the" and p.answer == " apple"
    rendered = dg.render_entity_prompt([("apple", "F"), ("cup", "Q"), ("key", "A")], "Q")
    plain = dg.entity_tracking_prompt(["apple", "cup", "key"], ["F", "Q", "A"], 1)
    assert (rendered.text, rendered.spans, rendered.answer) == (plain.text, plain.spans, plain.answer)

    v = dg.value_program({"x": 12, "y": 40, "z": 73}, "y", "-", "x")
    assert v.text == "x=12, y=40, z=73. y-x=" and v.answer == "2" and v.meta["full_answer"] == "28"
    assert v.text == dg.variable_binding_prompt({"x": 12, "y": 40, "z": 73}, "y", "-", "x").text
    names = ("left_value", "right_value", "left", "op", "right", "last")
    spans = {name: v.text[slice(*v.spans[name])] for name in names}
    assert spans == {"left_value": "40", "right_value": "12", "left": "y", "op": "-", "right": "x", "last": "="}


# ---------------------------------------------------------------------------------------------- entity desiderata


@pytest.mark.parametrize("desideratum", dg.ENTITY_DESIDERATA)
def test_entity_desideratum_invariants(desideratum):
    triples = dg.entity_triples(desideratum, 40, n_boxes=7, seed=1)
    assert len(triples) == 40 and len({t.original.text for t in triples}) == 40
    for t in triples:
        o, a = t.original, t.alternate
        _check_entity_prompt(o)
        _check_entity_prompt(a)
        assert t.desideratum == desideratum and t.target != o.answer
        alt_label = a.meta["labels"][a.meta["query"]]
        label_target = " " + o.meta["objects"][o.meta["labels"].index(alt_label)]
        position_target = " " + o.meta["objects"][a.meta["query"]]
        assert len({o.answer, a.answer, label_target, position_target}) == 4  # one run tells them apart
        if desideratum == "object":
            assert t.target == a.answer and t.target.strip() not in o.meta["objects"]
        elif desideratum == "label":
            assert t.target == label_target
            assert alt_label != o.meta["labels"][o.meta["query"]]  # a different box label is queried
        else:
            assert t.target == position_target and a.meta["query"] != o.meta["query"]


def test_noise_triples_are_random_prompts_of_the_same_shape(word_tokenizer):
    triples = dg.entity_noise_triples(30, n_boxes=5, seed=2)
    same_query = 0
    for t in triples:
        _check_entity_prompt(t.alternate)
        assert t.target == t.original.answer and t.desideratum == "noise"
        assert len(word_tokenizer(t.original.text)["input_ids"]) == len(word_tokenizer(t.alternate.text)["input_ids"])
        pos_o, pos_a = dg.token_positions(t.original, word_tokenizer), dg.token_positions(t.alternate, word_tokenizer)
        fixed = [k for k in pos_o if k not in ("prev_query_label", "correct_object")]  # these follow the query
        assert [pos_o[k] for k in fixed] == [pos_a[k] for k in fixed]
        same_query += t.alternate.text[slice(*t.alternate.spans["query_label"])] == \
            t.original.text[slice(*t.original.spans["query_label"])]
    assert same_query < 10  # the query is random, not copied


# ---------------------------------------------------------------------------------------------- Table A11 variants

N = 5


def _between(prompt, i):
    """Text between segment i's object and its label."""
    return prompt.text[prompt.spans[f"object_{i}"][1]:prompt.spans[f"label_{i}"][0]]


VARIANT_CHECKS = {
    "our_random_text_start": lambda o, a: len(a.text[:a.spans["object_0"][0]].split()) == 6,
    "our_random_text_end": lambda o, a: len(a.text[a.spans[f"label_{N - 1}"][1]:a.spans["query_label"][0]].split())
    == 7,
    "our_extra_tokens_between": lambda o, a: all(len(_between(a, i).split()) == 5 for i in range(N)),
    "our_extra_segment_start": lambda o, a: len(a.meta["objects"]) == N + 1 and a.meta["query"] >= 1,
    "our_extra_segment_end": lambda o, a: len(a.meta["objects"]) == N + 1 and a.meta["query"] < N,
    "our_extra_boxes_before": lambda o, a: len(a.meta["objects"]) == N + 2 and a.meta["query"] >= 2
    and not set(a.meta["objects"][a.meta["query"] - 2:a.meta["query"]]) & set(o.meta["objects"]),
    "our_incorrect_box_segment": lambda o, a: a.text.count(" Bag ") == 1
    and a.text[a.spans["prev_query_label"][0] - 4:a.spans["prev_query_label"][0]] == "Box ",
    "our_box_object_order": lambda o, a: all(a.spans[f"label_{i}"][0] < a.spans[f"object_{i}"][0]
                                             for i in range(N)),
    "our_altered_association": lambda o, a: all(_between(a, i) == " belongs to Box " for i in range(N)),
    "our_no_comma": lambda o, a: "," not in a.text,
    "our_extra_comma": lambda o, a: a.text.count(",") == 2 * N - 1 and _between(a, 0) == ", is in Box ",
}


def test_every_variant_has_a_check():
    assert set(VARIANT_CHECKS) == set(dg.OUR_VARIANTS) and len(dg.OUR_VARIANTS) == 11
    assert set(A11_TEXTS) == set(dg.A11_VARIANTS) and len(dg.A11_VARIANTS) == 11
    assert set(dg.VARIANTS) == set(dg.A11_VARIANTS) | set(dg.OUR_VARIANTS)


@pytest.mark.parametrize("variant", list(dg.OUR_VARIANTS))
def test_variant_invariants(variant):
    triples = dg.entity_triples("position", 10, n_boxes=N, seed=3, variant=variant)
    plain = dg.entity_triples("position", 10, n_boxes=N, seed=3)
    for t in triples:
        o, a = t.original, t.alternate
        _check_entity_prompt(o)
        _check_entity_prompt(a)
        assert o.text == dg.entity_tracking_prompt(o.meta["objects"], o.meta["labels"], o.meta["query"]).text
        assert a.meta["variant"] == variant and t.meta["variant"] == variant
        assert VARIANT_CHECKS[variant](o, a), a.text
        assert t.target == " " + o.meta["objects"][a.meta["query"]]  # position counted in the rewritten alternate
        assert len(set(t.meta["targets"].values()) | {o.answer}) == 4
    assert {t.alternate.text for t in triples}.isdisjoint(t.alternate.text for t in plain)


def _plain(a):
    """The alternate as the default prompt would have it, before the variant (its pre-insertion segments)."""
    objs, labels = list(a.meta["objects"]), list(a.meta["labels"])
    if a.meta["variant"] == "extra_segment_start":
        objs, labels = objs[1:], labels[1:]
    if a.meta["variant"] == "extra_segment_end":
        objs, labels = objs[:-1], labels[:-1]
    return dg.entity_tracking_prompt(objs, labels, a.meta["source_query"])


# the authors' texts (Nix07/finetuning), rebuilt here from the plain alternate the way their code edits it
A11_TEXTS = {
    "random_text_start": lambda p: "There are a bunch of boxes containing objects, " + p.text[0].lower() + p.text[1:],
    "random_text_end": lambda p: p.text.replace(". Box", ", these are a bunch of boxes containing objects. Box"),
    "extra_tokens_between": lambda p: p.text.replace(
        _queried_segment_of(p), _queried_segment_of(p).replace(" is in", " is contained in the")),
    "extra_segment_start": lambda p: "The apple is in Box O, " + p.text[0].lower() + p.text[1:],
    "extra_segment_end": lambda p: p.text.replace(". Box", ", the apple is in Box O. Box"),
    "extra_boxes_before": lambda p: p.text.replace(
        _queried_segment_of(p), ("there are three additional boxes, Box PP, Box BB and Box AA, "
                                 + _queried_segment_of(p)[0].lower() + _queried_segment_of(p)[1:]))
    if p.meta["query"] else "There are three additional boxes, Box PP, Box BB and Box AA, " + p.text[0].lower()
    + p.text[1:],
    "incorrect_box_segment": lambda p: p.text,
    "box_object_order": lambda p: p.text.replace(
        _queried_segment_of(p), f"Box {p.meta['labels'][p.meta['query']]} contains the "
                                f"{p.meta['objects'][p.meta['query']]}"),
    "altered_association": lambda p: p.text.replace(
        _queried_segment_of(p), _queried_segment_of(p).replace(" is in", " is not in")),
    "no_comma": lambda p: p.text.replace(", ", " "),
    "extra_comma": lambda p: p.text.replace(" is", ", is"),
}


def _queried_segment_of(plain):
    return plain.text.split(". ")[0].split(", ")[plain.meta["query"]]


@pytest.mark.parametrize("variant", list(dg.A11_VARIANTS))
def test_authors_table_a11_variants(variant):
    triples = dg.entity_triples("position", 12, n_boxes=N, seed=3, variant=variant)
    for t in triples:
        o, a = t.original, t.alternate
        _check_entity_prompt(o)
        _check_entity_prompt(a)
        plain = _plain(a)
        assert a.text == A11_TEXTS[variant](plain), (a.text, plain.text)
        assert o.text == dg.entity_tracking_prompt(o.meta["objects"], o.meta["labels"], o.meta["query"]).text
        index = (a.meta["source_query"] + 1) % N if variant == "incorrect_box_segment" else a.meta["source_query"]
        assert t.target == " " + o.meta["objects"][index]  # counted before the rewrite, as their code does
    shifted = [t for t in triples if t.alternate.meta["query"] != t.alternate.meta["source_query"]]
    assert bool(shifted) == (variant == "extra_segment_start")


def test_authors_variants_are_position_and_alternate_only():
    with pytest.raises(ValueError, match="Position desideratum only.*'our_no_comma'"):
        dg.entity_triples("label", 2, variant="no_comma")
    with pytest.raises(ValueError, match="Position desideratum only"):
        dg.entity_triples("position", 2, variant="no_comma", variant_on="original")


def test_variant_on_original_rewrites_the_original():
    for t in dg.entity_triples("label", 10, n_boxes=N, seed=4, variant="our_no_comma", variant_on="original"):
        _check_entity_prompt(t.original)
        assert "," not in t.original.text and "," in t.alternate.text
        alt_label = t.alternate.meta["labels"][t.alternate.meta["query"]]
        assert t.target == " " + t.original.meta["objects"][t.original.meta["labels"].index(alt_label)]


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid variants: random_text_start, .*extra_comma"):
        dg.entity_triples("position", 2, variant="typo")
    with pytest.raises(ValueError, match="valid variants"):
        dg.apply_variant(dg.entity_tracking_prompt(["a", "b"], ["A", "B"], 0), "typo", random.Random(0))


# ---------------------------------------------------------------------------------------------- variable binding


def test_value_dependence_invariants():
    triples = dg.vb_triples("value_dependence", 90, seed=5)
    assert Counter(t.target for t in triples) == {d: 10 for d in "123456789"}  # balanced targets
    assert Counter(t.original.meta["op"] for t in triples).keys() == {"+", "-"}
    for t in triples:
        o, a = t.original.meta, t.alternate.meta
        changed = {k for k in o["values"] if o["values"][k] != a["values"][k]}
        assert changed == {o["left"]} and (o["left"], o["op"], o["right"]) == (a["left"], a["op"], a["right"])
        assert t.target == t.alternate.answer != t.original.answer
        for meta, prompt in ((o, t.original), (a, t.alternate)):
            assert all(10 <= v <= 99 for v in meta["values"].values())
            full = int(meta["full_answer"])
            assert full >= 0 and prompt.answer == str(full)[0]
            assert full == dg.OPERATIONS[meta["op"]](meta["values"][meta["left"]], meta["values"][meta["right"]])


@pytest.mark.parametrize("desideratum,ops", [("operation_invariance", {"+", "-"}),
                                             ("operation_invariance_add_mul", {"+", "*"})])
def test_operation_invariance_invariants(desideratum, ops):
    triples = dg.vb_triples(desideratum, 45, seed=6)
    assert Counter(t.target for t in triples) == {d: 5 for d in "123456789"}
    for t in triples:
        o, a = t.original.meta, t.alternate.meta
        assert o["values"] == a["values"] and (o["left"], o["right"]) == (a["left"], a["right"])
        assert {o["op"], a["op"]} == ops
        assert t.target == t.original.answer != t.alternate.answer  # the flip would change the first digit
        assert int(o["full_answer"]) >= 0 and int(a["full_answer"]) >= 0


def test_transfer_value_dependence_on_multiplication():
    sets = dg.vb_transfer_sets(18, seed=7)
    assert set(sets) == {"value_dependence_mul", "operation_invariance_add_mul"}
    for t in sets["value_dependence_mul"]:
        assert t.original.meta["op"] == t.alternate.meta["op"] == "*"
        assert t.target == t.alternate.answer != t.original.answer
        assert t.alternate.meta["full_answer"] == str(t.alternate.meta["values"][t.alternate.meta["left"]]
                                                      * t.alternate.meta["values"][t.alternate.meta["right"]])


# ---------------------------------------------------------------------------------------------- positions, padded


def _mixed_triples():
    """Triples of different lengths: 3 and 5 boxes, two variants, programs over two and three variables."""
    return (dg.entity_triples("label", 3, n_boxes=3, seed=8)
            + dg.entity_triples("position", 3, n_boxes=5, seed=9, variant="our_extra_boxes_before")
            + dg.entity_triples("object", 2, n_boxes=4, seed=10, variant="our_box_object_order")
            + dg.vb_triples("value_dependence", 3, seed=11, names=("x", "y"))
            + dg.vb_triples("operation_invariance", 3, seed=12))


def _check_batch_positions(batch, answer_ids, prompts, tokenizer, lowercase):
    width = batch.input_ids.shape[1]
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really is padded
    for name, pos in batch.positions.items():
        for b, prompt in enumerate(prompts):
            p = int(pos[b])
            assert batch.attention_mask[b, p] == 1 and p >= width - lengths[b]
            token = tokenizer.decode([int(batch.input_ids[b, p])]).strip()
            span = prompt.text[slice(*prompt.spans[name])]
            span = span.lower() if lowercase else span
            if name.startswith(SINGLE_TOKEN_SPANS):
                assert token == span, (name, token, span)
            else:
                assert token and span.endswith(token), (name, token, span)
    for b, prompt in enumerate(prompts):
        assert tokenizer.decode([int(answer_ids[b])]).strip() == (prompt.answer.strip().lower() if lowercase
                                                                   else prompt.answer.strip())


@pytest.mark.parametrize("which", ["word", "bpe"])
def test_positions_point_at_their_tokens_in_padded_batches(which, word_tokenizer, bpe_tokenizer):
    tokenizer = word_tokenizer if which == "word" else bpe_tokenizer
    assert dg.usable_labels(tokenizer) == list(dg.LABELS)
    if which == "word":
        assert dg.usable_objects(tokenizer) == list(dg.OBJECTS)
    triples = _mixed_triples()
    if which == "bpe":  # entity data with the objects this BPE keeps whole
        objs = dg.usable_objects(bpe_tokenizer, need=10)
        assert len(objs) < len(dg.OBJECTS)  # some objects really are split by it
        triples = (dg.entity_triples("label", 3, n_boxes=3, seed=8, tokenizer=bpe_tokenizer)
                   + dg.entity_triples("position", 3, n_boxes=5, seed=9, variant="our_extra_comma",
                                     tokenizer=bpe_tokenizer)
                   + dg.entity_triples("object", 2, n_boxes=4, seed=10, variant="our_random_text_end",
                                     objects=objs)
                   + triples[-6:])
    entity_names = {"object_0", "label_2", "query_label", "prev_query_label", "correct_object", "last"}
    batches = list(dg.iter_pair_batches(triples, tokenizer, batch_size=8))
    chunks = [triples[:8], triples[8:]]
    assert [b.size for b in batches] == [8, 6]
    first = batches[0]
    assert entity_names <= set(first.original.positions)
    moved = first.alternate.to("meta")
    assert {t.device.type for t in [moved.input_ids, *moved.positions.values()]} == {"meta"}
    assert {"left_value", "right_value", "left", "op", "right", "last"} <= set(batches[1].alternate.positions)
    for batch, chunk in zip(batches, chunks):
        answers = [dg.answer_token_id(tokenizer, t.original.answer) for t in chunk]
        alt_answers = [dg.answer_token_id(tokenizer, t.alternate.answer) for t in chunk]
        _check_batch_positions(batch.original, answers, [t.original for t in chunk], tokenizer, which == "word")
        _check_batch_positions(batch.alternate, alt_answers, [t.alternate for t in chunk], tokenizer,
                               which == "word")
        assert batch.target_ids.tolist() == [dg.answer_token_id(tokenizer, t.target) for t in chunk]
        # the foil competes with the target: the original's answer, or the alternate's where they coincide (OI)
        assert batch.foil_ids.tolist() == [a if t.target != t.original.answer else b
                                           for a, b, t in zip(answers, alt_answers, chunk)]


# ---------------------------------------------------------------------------------------------- seeds, splits, JSONL


def test_same_seed_same_data_other_seed_other_data():
    def make(seed):
        return (dg.entity_triples("position", 5, n_boxes=4, seed=seed, variant="random_text_end")
                + dg.entity_noise_triples(3, n_boxes=4, seed=seed)
                + dg.vb_triples("operation_invariance", 5, seed=seed))
    assert make(0) == make(0)
    assert [t.original.text for t in make(0)] != [t.original.text for t in make(1)]


def test_splits_are_disjoint_by_original_text():
    # object and label triples of one seed share their originals: those must land in the same split
    triples = dg.entity_triples("object", 50, n_boxes=4, seed=13) + dg.entity_triples("label", 50, n_boxes=4, seed=13)
    train, val, test = dg.split_triples(triples, (0.8, 0.1, 0.1), seed=0)
    texts = [{t.original.text for t in s} for s in (train, val, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert len(train) + len(val) + len(test) == 100 and len(val) >= 10 and len(test) >= 10
    assert dg.split_triples(triples, (0.8, 0.1, 0.1), seed=0) == [train, val, test]
    # the three desiderata of one seed share their originals, so equal split calls keep them apart together
    position = dg.split_triples(dg.entity_triples("position", 50, n_boxes=4, seed=13), (40, 5, 5), seed=0)
    obj = dg.split_triples(dg.entity_triples("object", 50, n_boxes=4, seed=13), (40, 5, 5), seed=0)
    assert [[t.original for t in s] for s in position] == [[t.original for t in s] for s in obj]
    a, b = dg.split_triples(triples, (60, 20), seed=1)
    assert (len(a), len(b)) == (60, 20)
    with pytest.raises(ValueError, match="generate more"):
        dg.split_triples(triples, (90, 20))


def test_jsonl_round_trip(tmp_path):
    triples = (dg.entity_triples("label", 4, n_boxes=3, variant="our_extra_segment_start")
               + dg.vb_triples("value_dependence", 4))
    path = dg.save_triples(triples, tmp_path / "sub" / "data.jsonl")
    assert len(path.read_text().splitlines()) == 8
    assert dg.load_triples(path) == triples


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_says_what_to_change(word_tokenizer, bpe_tokenizer):
    with pytest.raises(ValueError, match=r"'computer' -> .*Remove them"):
        dg.entity_triples("object", 2, n_boxes=3, tokenizer=word_tokenizer,
                          objects=["apple", "cup", "key", "computer", "lamp", "pen", "hat"])
    split_by_bpe = r"keep \d+ of the given objects .*'clock' -> \['Ġc', 'l', 'ock'\].*Remove them"
    with pytest.raises(ValueError, match=split_by_bpe):  # split into pieces, not unknown
        dg.entity_triples("object", 2, tokenizer=bpe_tokenizer, objects=dg.OBJECTS)
    with pytest.raises(ValueError, match="objects are single tokens .* use fewer boxes"):
        dg.usable_objects(bpe_tokenizer, need=40)
    with pytest.raises(ValueError, match="4 boxes .* only 3 are available"):
        dg.entity_triples("label", 2, n_boxes=4, labels=["A", "B", "C"])
    with pytest.raises(ValueError, match="5 boxes need 5 distinct objects and labels"):
        dg.random_entity_prompt(random.Random(0), 5, labels="ABC")
    with pytest.raises(ValueError, match="at least 3 boxes"):
        dg.entity_triples("label", 2, n_boxes=2)
    with pytest.raises(ValueError, match="valid: object, label, position"):
        dg.entity_triples("colour", 2)
    with pytest.raises(ValueError, match="valid: value_dependence"):
        dg.vb_triples("value_independence", 2)
    with pytest.raises(ValueError, match="negative"):
        dg.value_program({"x": 10, "y": 20}, "x", "-", "y")
    with pytest.raises(ValueError, match="one token"):
        dg.answer_token_id(bpe_tokenizer, " computer")
