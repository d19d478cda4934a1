"""The shipped toy models solve their tasks as the manifest says, training is reproducible, corruption is caught."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from lib.builtin import toy, toy_train
from workflows.toy_models import evaluate

MANIFEST = toy.read_manifest()


def _tolerance(p: float, n: int) -> float:
    """0.03, widened to 3 standard errors of the difference of two independent n-task estimates where needed."""
    return max(0.03, 3 * math.sqrt(2 * p * (1 - p) / n))


@pytest.mark.parametrize("name", ["entity-base", "entity-ft"])
def test_entity_models_reach_manifest_accuracy_on_fresh_tasks(name, builtin_model):
    handle = builtin_model(f"toy:{name}")
    fresh = evaluate(handle, name, n=toy.N_EVAL, seed=toy.EVAL_SEED + 12345)
    for boxes, expected in MANIFEST[name]["accuracy"].items():
        assert abs(fresh[boxes] - expected) <= _tolerance(expected, toy.N_EVAL), (name, boxes, fresh, expected)
    assert fresh["7"] > 3 / 7  # far above chance (1/7) in any case


def test_entity_targets_base_partial_finetuned_high():
    base, ft = MANIFEST["entity-base"]["accuracy"], MANIFEST["entity-ft"]["accuracy"]
    assert 0.55 <= base["7"] <= 0.80
    assert all(ft[b] >= 0.90 for b in ("3", "5", "7"))


def test_varbind_model_reaches_manifest_accuracy_on_fresh_tasks(builtin_model):
    handle = builtin_model("toy:varbind")
    fresh = evaluate(handle, "varbind", n=toy.N_EVAL, seed=toy.EVAL_SEED + 12345)
    expected = MANIFEST["varbind"]["accuracy"]
    for ops in ("+", "-", "+-", "*"):
        assert abs(fresh[ops] - expected[ops]) <= _tolerance(expected[ops], toy.N_EVAL), (ops, fresh, expected)
    majority = MANIFEST["varbind"]["majority_baseline"]
    for ops in ("+-", "*"):  # it multiplies too: well above always answering the most common first digit
        assert fresh[ops] > majority[ops] + 0.2, (ops, fresh, majority)


def test_varbind_training_loss_covers_answers_and_only_the_first_digit_of_products():
    tok = toy.tokenizer()
    text = "x=12, y=40, z=73. y*x=480. x+y=52. z=73. x*z=876"
    row = tok(text, add_special_tokens=False)["input_ids"]
    tokens = dict(zip("0123456789.=*", tok.convert_tokens_to_ids(list("0123456789.=*"))))
    words = tok.convert_ids_to_tokens(row)

    def trained(product_digits: int) -> str:
        return "".join(w for w, m in zip(words, toy_train._answer_mask(row, tokens, product_digits)) if m)

    assert trained(1) == "4" + "52" + "73" + "8"           # 480 -> 4, 52, 73 (a value asked back), 876 -> 8
    assert trained(0) == "480" + "52" + "73" + "876"       # every digit of every answer; the context's values never


def test_short_varbind_training_run_is_deterministic(one_thread):
    tok = toy.tokenizer()
    cfg = toy_train.VarbindConfig(seed=3, max_steps=4, batch_size=8, warmup=2, product_digits=1)
    (a, _), (b, _) = [toy_train.train_varbind(tok, cfg, progress=False) for _ in range(2)]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other, _ = toy_train.train_varbind(tok, toy_train.VarbindConfig(**{**vars(cfg), "seed": 4}), progress=False)
    assert not torch.equal(other.state_dict()["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])


def test_shipped_files_are_small_and_tokenizer_splits_prompts_into_words():
    for name in toy.NAMES:
        assert (toy.MODELS_DIR / name / "model.safetensors").stat().st_size <= 5 * 2**20
    _, tok = toy.load("entity-base")
    prompt = toy.entity_tasks(2, n=1)[0]
    tokens = tok.convert_ids_to_tokens(tok(prompt.text)["input_ids"])
    assert tokens[:7] == ["the", *prompt.meta["objects"][:1], "is", "in", "box", prompt.meta["labels"][0].lower(), ","]
    assert "<unk>" not in tokens


@pytest.fixture
def one_thread():
    """Training runs with the thread count `python workflows/toy_models.py train` uses (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(toy.TRAIN_THREADS)
    yield
    torch.set_num_threads(before)


def test_short_training_run_is_deterministic(one_thread):
    tok = toy.tokenizer()
    # advance_acc=0: the curriculum moves on every few batches, so 30 small steps cross every stage and the growth
    cfg = toy_train.TrainConfig(seed=3, max_steps=30, batch_size=8, warmup=10, advance_window=3, advance_acc=0.0,
                                max_boxes=3)
    runs = [toy_train.train_entity(tok, cfg, progress=False) for _ in range(2)]
    (a, info_a), (b, info_b) = runs
    assert info_a["grew_at_step"] and len(info_a["stage_steps"]) >= 5  # it moved through stages and grew
    assert info_a["stage_steps"] == info_b["stage_steps"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other, _ = toy_train.train_entity(tok, toy_train.TrainConfig(**{**vars(cfg), "seed": 4}), progress=False)
    assert not torch.equal(other.state_dict()["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])


def test_corrupted_checksum_gives_regeneration_command(tmp_path, monkeypatch):
    copy = tmp_path / "toy_models"
    shutil.copytree(toy.MODELS_DIR / "entity-base", copy / "entity-base")
    shutil.copy(toy.MANIFEST, copy / "manifest.json")
    weights = copy / "entity-base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(toy, "MODELS_DIR", copy)
    monkeypatch.setattr(toy, "MANIFEST", copy / "manifest.json")
    with pytest.raises(toy.ToyModelError, match=r"checksum mismatch.*python workflows/toy_models\.py train entity-base"):
        toy.load("entity-base")
