"""Templates, desiderata as data, answers in context, the first-digit rule and their error messages. No model runs."""
import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from lib import data_gen as dg
from lib.core.tokenization import train_bpe_tokenizer, word_level_tokenizer
from lib.mask_intervention import task_loss
from lib.scores import FirstDigit, digit_logits, first_digit_classes, target_hit
from lib.types import PairBatch
from tests.conftest import TASK_WORDS

# a lower-case format with spaced punctuation, as a user's model might read it
SPACED = dg.EntityTemplate(segment="the {object} is in box {label}", separator=" , ", context_end=" .",
                           query=" box {label} contains the", capitalize=False, labels=tuple("abcdefghij"),
                           name="spaced")


@pytest.fixture(scope="module")
def case_tokenizer():
    """Word-level, case-sensitive: knows the spaced format's lower-case words, not "The" or "Box"."""
    return word_level_tokenizer([*TASK_WORDS, "box"], lowercase=False)


def _token(tokenizer, batch_side, b, name):
    return tokenizer.decode([int(batch_side.input_ids[b, batch_side.positions[name][b]])]).strip()


def test_a_template_words_the_prompt_and_the_positions_follow_it(case_tokenizer):
    triples = dg.entity_triples("label", 6, n_boxes=4, seed=1, tokenizer=case_tokenizer, template=SPACED)
    for t in triples:
        o = t.original
        assert o.text.startswith("the ") and " , the " in o.text and " . box " in o.text
        assert o.text.endswith(f"box {o.meta['labels'][o.meta['query']]} contains the")
        assert set(o.meta["labels"]) <= set("abcdefghij") and o.meta["template"] == "spaced"
    batch = dg.encode_pairs(triples, case_tokenizer)
    for b, t in enumerate(triples):
        o, q = t.original, t.original.meta["query"]
        assert _token(case_tokenizer, batch.original, b, "query_label") == o.meta["labels"][q]
        assert _token(case_tokenizer, batch.original, b, "prev_query_label") == o.meta["labels"][q]
        assert _token(case_tokenizer, batch.original, b, "correct_object") == o.meta["objects"][q]
        assert _token(case_tokenizer, batch.original, b, "label_2") == o.meta["labels"][2]
        assert _token(case_tokenizer, batch.original, b, "last") == "the"
        assert case_tokenizer.decode([int(batch.target_ids[b])]) == t.target.strip()


def test_templates_load_from_json_and_round_trip(tmp_path):
    path = tmp_path / "fmt.json"
    path.write_text(json.dumps(dg.template_to_dict(SPACED)))
    assert dg.load_entity_template(path) == SPACED
    assert dg.load_entity_template(None) == dg.EntityTemplate() == dg.load_entity_template("default")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"separator": " ; "}))
    loaded = dg.load_entity_template(plain)
    assert loaded.name == "plain" and loaded.separator == " ; " and loaded.segment == dg.SEGMENT
    assert "Box F ; the cup" in dg.entity_tracking_prompt(["apple", "cup"], ["F", "Q"], 0, loaded).text
    assert dg.load_vb_template("authors") is dg.VB_TEMPLATES["authors"]


def test_the_authors_program_format():
    v = dg.value_program({"x": 12, "y": 40}, "x", "+", "y", dg.VB_TEMPLATES["authors"])
    assert v.text == "x = 12\ny = 40\nx + y = " and v.answer == "5"
    spans = {k: v.text[slice(*s)] for k, s in v.spans.items()}
    assert spans == {"var_x": "x", "value_x": "12", "var_y": "y", "value_y": "40", "left": "x", "op": "+",
                     "right": "y", "last": " ", "left_value": "12", "right_value": "40"}
    triples = dg.vb_triples("value_dependence", 18, seed=2, template="authors")
    assert all(t.original.text.count("\n") == 2 and t.original.text.endswith(" = ") for t in triples)
    assert sorted(t.target for t in triples) == sorted("123456789" * 2)


def test_template_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"segment=.* must contain \{label\} exactly once"):
        dg.EntityTemplate(segment="the {object} is here")
    with pytest.raises(ValueError, match=r"query=.* unknown placeholder\(s\) \['box'\]"):
        dg.EntityTemplate(query=" {box} {label} holds the")
    with pytest.raises(ValueError, match=r"query=.* must contain \{op\} exactly once"):
        dg.VarBindTemplate(query="{left}+{right}=")
    with pytest.raises(ValueError, match="at least two distinct variable names"):
        dg.VarBindTemplate(names=("x",))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"segmnt": "the {object} is in Box {label}"}))
    with pytest.raises(ValueError, match=r"unknown EntityTemplate field\(s\) \['segmnt'\]; valid fields: segment"):
        dg.load_entity_template(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        dg.load_entity_template(bad)
    with pytest.raises(ValueError, match="does not exist"):
        dg.load_entity_template(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="neither a built-in variable-binding template .default, authors."):
        dg.load_vb_template("author")
    with pytest.raises(ValueError, match="is not defined for the custom template 'spaced'"):
        dg.entity_triples("position", 2, template=SPACED, variant="our_no_comma")


# ---------------------------------------------------------------------------------------------- desiderata as data


def test_structure_desideratum_patches_every_label_and_targets_the_alternates_slot():
    triples = dg.entity_triples("structure", 30, n_boxes=5, seed=3)
    for t in triples:
        o, a = t.original, t.alternate
        assert t.desideratum == "structure" and t.target == " " + a.meta["objects"][o.meta["query"]]
        assert len({o.answer, *t.meta["targets"].values()}) == 5  # differs from the paper's three targets too
    spec = dg.DESIDERATA["structure"]
    assert spec.position_names(triples[0].original) == [f"label_{i}" for i in range(5)]
    batch = dg.encode_pairs(triples[:4], word_level_tokenizer(TASK_WORDS))
    assert {f"label_{i}" for i in range(5)} <= set(batch.original.positions)


def test_a_desideratum_defined_outside_lib():
    def first_box(original, alternate):  # the original's object in its first segment
        return dg.as_answer(original, original.meta["objects"][0])

    mine = dg.Desideratum("first_box", first_box, positions=("label_0",))
    triples = dg.entity_triples(mine, 12, n_boxes=4, seed=4)
    assert all(t.desideratum == "first_box" and t.target == " " + t.original.meta["objects"][0] for t in triples)
    assert all(t.original.meta["query"] != 0 for t in triples)  # distinct from the original's answer
    batch = dg.encode_pairs(triples, word_level_tokenizer(TASK_WORDS))
    assert batch.desideratum == "first_box" and batch.target_ids.shape == (12,)
    with pytest.raises(ValueError, match="valid: object, label, position, structure"):
        dg.entity_triples("colour", 2)


# ---------------------------------------------------------------------------------------------- answers, errors


def test_answers_are_tokenized_in_context():
    bpe = train_bpe_tokenizer([dg.random_entity_prompt(__import__("random").Random(0), 5).text + " apple"] * 50)
    prompt = dg.entity_tracking_prompt(["apple", "cup"], ["F", "Q"], 0)
    in_context = dg.answer_token_id(bpe, " apple", prompt)
    assert bpe.decode([in_context]) == " apple"
    joined = bpe(prompt.text + " apple", add_special_tokens=False)["input_ids"]
    assert joined[-1] == in_context
    with pytest.raises(ValueError, match=r"merges with the end of the prompt .*Move the boundary"):
        dg.answer_token_id(bpe, "apple", prompt.text + " ")   # the space belongs to the answer's token
    with pytest.raises(ValueError, match=r"target ' cupcake' is \d+ tokens after its prompt"):
        dg.answer_token_id(bpe, " cupcake", prompt)


def test_unknown_words_in_a_prompt_are_an_error_naming_them(case_tokenizer):
    prompt = dg.entity_tracking_prompt(["apple", "cup"], ["F", "Q"], 0)   # "The", "Box" are unknown here
    with pytest.raises(ValueError, match=r"1 of 1 prompts have words this tokenizer does not know \(<unk>\): "
                                         r"\['The', 'Box'\]"):
        dg.encode_prompts([prompt], case_tokenizer)


def test_word_filters_name_the_template_not_the_box_count(case_tokenizer):
    # the case: the default wording for a model whose format is lower case
    with pytest.raises(ValueError, match=r"template's own words \['The', 'Box'\] are unknown .*--template FILE"):
        dg.entity_triples("label", 4, n_boxes=3, tokenizer=case_tokenizer)
    # the template is fine but its labels are not one token there: the filter says so, naming the context
    upper = dg.EntityTemplate(segment="the {object} is in box {label}", query=" box {label} contains the",
                              capitalize=False, labels=("AB", "CD", "EF"), name="upper")
    with pytest.raises(ValueError, match=r"does not keep 3 of the given labels as one known token in the "
                                         r"template's segment 'the \{object\} is in box \{label\}'"):
        dg.entity_triples("label", 4, n_boxes=3, tokenizer=case_tokenizer, template=upper)
    with pytest.raises(ValueError, match=r"only 0 of 3 labels are single tokens for this tokenizer in the template's"
                                         r" segment .* but 3 are needed"):
        dg.usable_labels(case_tokenizer, ["AB", "CD", "EF"], need=3, template=upper)


def test_a_tokenizer_without_pad_token_pads_with_eos_and_is_not_changed():
    base = word_level_tokenizer(TASK_WORDS)
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token is None
    prompts = [dg.entity_tracking_prompt(["apple", "cup", "key"], ["F", "Q", "A"], 0),
               dg.entity_tracking_prompt(["apple", "cup"], ["F", "Q"], 1)]
    batch = dg.encode_answers(prompts, tok)
    assert batch.original.input_ids[1, 0] == tok.eos_token_id and batch.original.attention_mask[1, 0] == 0
    assert tok.pad_token is None and tok.pad_token_id is None


# ---------------------------------------------------------------------------------------------- the first-digit rule


@pytest.fixture(scope="module")
def merging():
    """A vocabulary with multi-digit tokens ("52", " 73") beside single digits, as Llama-3 / GPT-4o have."""
    return word_level_tokenizer(["5", "7", "2", "52", "73", "apple"], lowercase=False)


def test_first_digit_rule_counts_every_token_starting_with_the_digit(merging):
    classes = first_digit_classes(merging)
    ids = merging.convert_tokens_to_ids(["5", "52", "7", "73", "2", "apple"])
    assert classes[ids].tolist() == [5, 5, 7, 7, 2, -1]
    logits = torch.full((2, len(merging)), -5.0)
    logits[0, ids[1]] = 3.0     # top token "52": its first digit is the target "5"
    logits[1, ids[5]] = 3.0     # top token "apple": no digit
    batch = PairBatch(None, target_ids=torch.tensor([ids[0], ids[0]]), foil_ids=torch.tensor([ids[2], ids[2]]))
    assert FirstDigit(classes, "hit")(logits, batch).tolist() == [1.0, 0.0]
    assert target_hit(logits, batch).tolist() == [0.0, 0.0]   # the exact-token rule misses the merged answer
    grouped = digit_logits(logits, classes)
    assert torch.allclose(grouped[0, 5], torch.logsumexp(logits[0, [ids[0], ids[1]]], 0))
    probs = FirstDigit(classes, "prob")(logits, batch)
    assert torch.allclose(probs[0], logits[0].softmax(-1)[[ids[0], ids[1]]].sum())
    diff = FirstDigit(classes, "logit_diff")(logits, batch)
    assert torch.allclose(diff, grouped[:, 5] - grouped[:, 7])
    loss = task_loss("logit_diff", logits, batch.target_ids, batch.foil_ids, classes)
    assert torch.allclose(loss, -diff.mean())


def test_first_digit_rule_equals_the_token_rule_on_word_level_tokenizers(word_tokenizer):
    classes = first_digit_classes(word_tokenizer)
    digits = word_tokenizer.convert_tokens_to_ids(list("0123456789"))
    assert sorted(classes[classes >= 0].tolist()) == list(range(10))  # only the digits themselves
    logits = torch.randn(64, len(word_tokenizer), generator=torch.Generator().manual_seed(0))
    logits[:32, digits] += 6
    targets = torch.tensor(digits)[torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))]
    batch = PairBatch(None, target_ids=targets, foil_ids=torch.roll(targets, 1))
    assert torch.equal(FirstDigit(classes, "hit")(logits, batch), target_hit(logits, batch))
    assert torch.allclose(task_loss("logit_diff", logits, targets, batch.foil_ids, classes),
                          task_loss("logit_diff", logits, targets, batch.foil_ids))
    with pytest.raises(ValueError, match="needs targets that start with a digit"):
        FirstDigit(classes)(logits, PairBatch(None, target_ids=torch.full((64,), 5)))
    with pytest.raises(ValueError, match="FirstDigit kind 'top'"):
        FirstDigit(classes, "top")


def test_more_bad_input_names_its_cause(tmp_path, word_tokenizer):
    from lib.mask_intervention import DCMConfig
    from lib.scores import answer_metric

    with pytest.raises(ValueError, match="EntityTemplate.labels must be a non-empty list of non-empty words"):
        dg.EntityTemplate(labels=())
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="an EntityTemplate is a JSON object of fields, got list"):
        dg.load_entity_template(listed)
    with pytest.raises(ValueError, match=r"DCMConfig.answer_rule='digit'; choose one of token, first_digit"):
        DCMConfig(answer_rule="digit").check()
    with pytest.raises(ValueError, match="answer rule 'digit'; choose one of token, first_digit"):
        answer_metric("digit", word_tokenizer)
    classes = first_digit_classes(word_tokenizer)
    five = word_tokenizer.convert_tokens_to_ids("5")
    with pytest.raises(ValueError, match=r"FirstDigit\('logit_diff'\) needs foil tokens"):
        FirstDigit(classes, "logit_diff")(torch.zeros(1, len(word_tokenizer)),
                                          PairBatch(None, target_ids=torch.tensor([five])))
