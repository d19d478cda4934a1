"""Real tokenizers of four model families (tests/fixtures/tokenizers: Mistral, GPT-4o, Qwen, Gemma 3): every named
position points at its token, every answer is the model's natural next token, the first-digit rule holds where
digits merge, and both workflows run end to end on a random-weight model of the family with that tokenizer."""
import json

import pytest

from lib import data_gen as dg
from lib.builtin.random_models import random_model
from lib.scores import first_digit_classes
from tests.fixtures.tokenizers import ARCHITECTURE, FAMILIES, load_tokenizer, write_tokenizer_dir
from workflows import entity_tracking, variable_binding

ENTITY_NAMES = ("object_0", "label_0", "object_2", "label_2", "query_label", "prev_query_label", "correct_object")
VB_NAMES = ("value_x", "value_y", "left", "op", "right")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """tokenizers(family) -> the family's tokenizer, loaded once per module (a second or four each)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_tokenizer(family, tmp_path_factory.mktemp(family))
        return cache[family]
    return get


def _piece(tokenizer, side, b, name):
    return tokenizer.decode([int(side.input_ids[b, side.positions[name][b]])]).strip()


def _natural_next(tokenizer, prompt, answer):
    """The first token of prompt + answer beyond the prompt's own tokens, computed here independently."""
    alone = tokenizer(prompt.text)["input_ids"]
    joined = tokenizer(prompt.text + answer)["input_ids"]
    assert joined[:len(alone)] == alone
    return joined[len(alone)]


@pytest.mark.parametrize("family", FAMILIES)
def test_entity_positions_and_answers(family, tokenizers):
    tok = tokenizers(family)
    triples = [t for d, n in (("object", 4), ("label", 3), ("position", 4), ("structure", 3))
               for t in dg.entity_triples(d, 4, n_boxes=n, seed=1, tokenizer=tok)]
    batch = dg.encode_pairs(triples, tok)
    assert len(set(batch.original.attention_mask.sum(1).tolist())) > 1   # left-padded
    for b, t in enumerate(triples):
        for side, prompt in ((batch.original, t.original), (batch.alternate, t.alternate)):
            for name in ENTITY_NAMES:
                assert _piece(tok, side, b, name) == prompt.text[slice(*prompt.spans[name])], (family, name)
            assert int(side.positions["last"][b]) == side.width - 1 and _piece(tok, side, b, "last") == "the"
        assert int(batch.target_ids[b]) == _natural_next(tok, t.original, t.target)
        assert tok.decode([int(batch.target_ids[b])]).strip() == t.target.strip()
    assert {f"label_{i}" for i in range(3)} <= set(batch.original.positions)   # Structure's positions


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["default", "authors"])
def test_variable_binding_positions_and_first_digits(family, template, tokenizers):
    tok = tokenizers(family)
    triples = dg.vb_triples("value_dependence", 9, seed=2, template=template, names=("x", "y"))
    batch = dg.encode_pairs(triples, tok)
    classes = first_digit_classes(tok)
    merged, long_answers = 0, 0
    for b, t in enumerate(triples):
        o = t.original
        for name in VB_NAMES:
            piece, span = _piece(tok, batch.original, b, name), o.text[slice(*o.spans[name])]
            assert piece and (piece in span or span in piece), (family, name, piece, span)  # "+y" is one token
        assert int(batch.target_ids[b]) == _natural_next(tok, o, t.target)
        assert int(classes[batch.target_ids[b]]) == int(t.target)
        # the model's natural next token for the whole number: one merged token where the tokenizer merges digits
        natural = _natural_next(tok, o, o.meta["full_answer"])
        assert int(classes[natural]) == int(o.meta["full_answer"][0])   # the first-digit rule counts it
        merged += len(tok.decode([natural]).strip()) > 1
        long_answers += len(o.meta["full_answer"]) > 1
    assert long_answers > 0 and merged == (long_answers if family == "gpt4o" else 0)


def _model_dir(family, tmp_path, tokenizers):
    tok = tokenizers(family)
    path = tmp_path / "model"
    random_model(ARCHITECTURE[family], vocab_size=len(tok), n_layers=1, n_heads=2, d_model=16,
                 seed=0).save_pretrained(path)
    write_tokenizer_dir(family, path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_both_workflows_run_on_a_random_model_of_the_family(family, tmp_path, tokenizers, one_thread):
    model = _model_dir(family, tmp_path, tokenizers)
    template = tmp_path / "wording.json"
    template.write_text(json.dumps({"separator": "; ", "name": "semicolons"}))
    out = tmp_path / "et"
    results = entity_tracking.main(["--model", str(model), "--fine-tuned", "none", "--template", str(template),
                                    "--n-boxes", "3", "--n-train", "1", "--n-eval", "4", "--n-patch", "4",
                                    "--epochs", "1", "--batch-size", "4", "--steps", "evaluate,circuit,dcm",
                                    "--out", str(out)])
    assert results["evaluate"]["base"]["accuracy"] == 0.0 and results["config"]["template"] == str(template)
    assert "answers none of the 4 path-patching prompts correctly" in results["circuit_empty"]
    assert "dcm" not in results
    report = (out / "report.md").read_text()
    assert "No circuit" in report and "accuracy 0.00" in report

    out = tmp_path / "vb"
    results = variable_binding.main(["--model", str(model), "--template", "authors", "--n-train", "2",
                                     "--n-eval", "2", "--n-val", "2", "--epochs", "1", "--batch-size", "4",
                                     "--out", str(out)])
    assert set(results["table1"]) == {"original"} and results["template"] == "authors"
    assert all(results["table1"]["original"][d] == 0.0 for d in variable_binding.COLUMNS)
    report = (out / "report.md").read_text()
    assert "first-digit rule" in report and "No DCM with value_dependence" in report
    # gemma2's post-norms leave its heads and MLPs without direct logits: the lens reads the residual stream alone
    assert ("residual stream only: gemma2" in report) == (family == "gemma")
