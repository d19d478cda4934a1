"""The built-in toy models: small Llama models trained here that really solve the two papers' tasks.

No weights can be downloaded, so the workflows default to models that this project trains itself and ships in
lib/toy_models/<name>/ (safetensors + tokenizer) with a manifest (accuracy per box count, training command,
seed, checksum). `load(name)` checks the checksum; `python -m lib.toy train` regenerates them
(see docs/TOY_MODELS.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lib.data_gen import LABELS, OBJECTS, answers_correct, encode_batch, random_entity_prompt
from lib.patching import clean_logits

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "toy_models"
MANIFEST = MODELS_DIR / "manifest.json"
NAMES = ("entity-base", "entity-ft", "varbind")
BOX_COUNTS = (3, 5, 7)
N_EVAL = 500
EVAL_SEED = 1_000_000  # held-out tasks: a seeded stream of its own (training uses Random(seed), seed ~0)
TRAIN_THREADS = 1
CHECKED_FILES = ("model.safetensors", "tokenizer.json")
VOCAB = [*OBJECTS, *LABELS, "the", "is", "in", "box", "contains", ",", ".", "=", "+", "-", "*", *"0123456789"]


class ToyModelError(RuntimeError):
    """A shipped toy model is missing or does not match its manifest; the message says how to regenerate."""


def tokenizer():
    """The word-level tokenizer of every toy model (objects, box labels = variable names, digits, punctuation)."""
    from lib.tokenization import word_level_tokenizer

    return word_level_tokenizer(VOCAB)


def checksum(model_dir: Path) -> str:
    """sha256 over the weights and the tokenizer (the files that decide the model's outputs)."""
    digest = hashlib.sha256()
    for name in CHECKED_FILES:
        digest.update(name.encode())
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()


def read_manifest() -> dict:
    if not MANIFEST.exists():
        raise ToyModelError(f"{MANIFEST} is missing: regenerate the toy models with `python -m lib.toy train all`")
    return json.loads(MANIFEST.read_text())


def regenerate_command(name: str) -> str:
    return f"python -m lib.toy train {name}"


def load(name: str) -> tuple[torch.nn.Module, Any]:
    """(LlamaForCausalLM in eval mode, tokenizer) of a shipped toy model, after checking its checksum."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    if name not in NAMES:
        raise ValueError(f"unknown toy model {name!r}; the built-in ones are {', '.join(NAMES)}")
    entry = read_manifest().get(name)
    model_dir = MODELS_DIR / name
    if entry is None or not all((model_dir / f).exists() for f in CHECKED_FILES):
        raise ToyModelError(f"toy model {name!r} is not in {MODELS_DIR}: regenerate it with "
                            f"`{regenerate_command(name)}`")
    found = checksum(model_dir)
    if found != entry["checksum"]:
        raise ToyModelError(
            f"checksum mismatch for toy model {name!r} in {model_dir} (manifest {entry['checksum'][:12]}..., files "
            f"{found[:12]}...): the files were changed or corrupted. Restore them from git "
            f"(`git checkout -- {model_dir.relative_to(MODELS_DIR.parent.parent)}`) or regenerate them with "
            f"`{regenerate_command(name)}`"
        )
    model = LlamaForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return model, tok


# ---------------------------------------------------------------- held-out tasks and accuracy
def entity_tasks(n_boxes: int, n: int = N_EVAL, seed: int = EVAL_SEED) -> list:
    rng = random.Random(seed + n_boxes)
    return [random_entity_prompt(rng, n_boxes) for _ in range(n)]


def varbind_tasks(ops: str, n: int = N_EVAL, seed: int = EVAL_SEED) -> list:
    """Held-out programs as the workflow makes them ("x=12, y=40, z=73. y-x="), operations drawn from `ops`."""
    from lib.data_gen_vb import random_value_program

    rng = random.Random(seed + sum(map(ord, ops)))
    return [random_value_program(rng, rng.choice(ops)) for _ in range(n)]


def accuracy(handle, prompts: list, batch_size: int = 250) -> float:
    """Share of prompts whose last-position argmax is the answer token, measured with nnsight traces."""
    correct = answers_correct(handle, prompts, batch_size=batch_size)
    return sum(correct) / len(correct)


def evaluate(handle, name: str, n: int = N_EVAL, seed: int = EVAL_SEED) -> dict[str, float]:
    """The manifest's accuracies: per box count for the entity models, per operation set for varbind."""
    if name.startswith("entity"):
        return {str(b): accuracy(handle, entity_tasks(b, n, seed)) for b in BOX_COUNTS}
    return {ops: accuracy(handle, varbind_tasks(ops, n, seed)) for ops in ("+", "-", "+-", "*")}


def majority_baseline(prompts: list) -> float:
    """Accuracy of always answering the most common answer (the first digit "1" is common: sums >= 100)."""
    answers = [p.answer for p in prompts]
    return max(answers.count(a) for a in set(answers)) / len(answers)


def varbind_table1(handle, n: int = N_EVAL, seed: int = EVAL_SEED) -> dict[str, float]:
    """The original model's row of Davies et al.'s Table 1 on lib.data_gen_vb's desiderata (targets balanced
    over the digits 1-9): the share of triples where the unpatched model already outputs the target (for VD the
    alternate's answer, so low is right; for OI the original's answer, so it is the model's accuracy)."""
    from lib.data_gen_vb import VB_DESIDERATA, vb_triples

    row = {}
    for desideratum in VB_DESIDERATA:
        triples = vb_triples(desideratum, n, seed=seed)
        batch = encode_batch([t.original for t in triples], handle.tokenizer, answers=[t.target for t in triples])
        row[desideratum] = float((clean_logits(handle, batch).argmax(-1) == batch.answer_ids).float().mean())
    return row


# ---------------------------------------------------------------- command line
def _save(name: str, model, tok, info: dict, command: str) -> dict:
    from lib.models import load_model

    model_dir = MODELS_DIR / name
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    handle = load_model(model, tokenizer=tok)
    entry = {
        "accuracy": evaluate(handle, name),
        "n_eval": N_EVAL,
        "eval_seed": EVAL_SEED,
        "command": command,
        "seed": info["seed"],
        "checksum": checksum(model_dir),
        "size_bytes": (model_dir / "model.safetensors").stat().st_size,
        "architecture": {k: getattr(model.config, k) for k in
                         ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")},
        "training": info,
    }
    if name == "varbind":
        entry["table1_original_model"] = varbind_table1(handle)
        entry["majority_baseline"] = {ops: majority_baseline(varbind_tasks(ops)) for ops in entry["accuracy"]}
    manifest = read_manifest() if MANIFEST.exists() else {}
    manifest[name] = entry
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("%s: accuracy %s, saved to %s", name, entry["accuracy"], model_dir)
    return entry


def main(argv: list[str] | None = None) -> None:
    from lib import toy_train

    parser = argparse.ArgumentParser(prog="python -m lib.toy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train", help="train toy models deterministically and write them with the manifest")
    train.add_argument("names", nargs="+", choices=[*NAMES, "all"],
                       help="which models; entity-ft continues from the entity-base run of the same seed")
    train.add_argument("--seed", type=int, default=0, help="seed of weights and training data (default 0)")
    evaluate_p = sub.add_parser("eval", help="re-measure the shipped models' accuracies on held-out tasks")
    evaluate_p.add_argument("names", nargs="+", choices=NAMES)
    evaluate_p.add_argument("--n", type=int, default=N_EVAL, help="held-out tasks per box count / operation")
    evaluate_p.add_argument("--seed", type=int, default=EVAL_SEED + 1, help="seed of the held-out tasks")
    attention = sub.add_parser("attention", help="print where each head attends (markdown, docs/TOY_MODELS.md)")
    attention.add_argument("names", nargs="+", choices=NAMES)
    attention.add_argument("--boxes", type=int, default=7, help="box count of the entity prompts (default 7)")
    attention.add_argument("--n", type=int, default=200, help="held-out prompts to average over")
    attention.add_argument("--threshold", type=float, default=0.15, help="list keys with at least this weight")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # A fixed thread count makes training bitwise reproducible; one thread is also the fastest on a shared
    # 2-core machine (two threads ran 10x slower there under load). Regenerate with the same count.
    torch.set_num_threads(TRAIN_THREADS)

    if args.cmd == "attention":
        from lib import toy_attention
        from lib.models import load_model

        for name in args.names:
            handle = load_model(f"toy:{name}")
            if name == "varbind":
                table = toy_attention.varbind_table(handle, varbind_tasks("+-", args.n, EVAL_SEED + 2))
            else:
                table = toy_attention.entity_table(handle, entity_tasks(args.boxes, args.n, EVAL_SEED + 2))
            print(f"## {name}\n")
            print(toy_attention.format_table(table, handle.arch.n_layers, handle.arch.n_heads, args.threshold))
        return
    if args.cmd == "eval":
        from lib.models import load_model

        for name in args.names:
            print(name, json.dumps(evaluate(load_model(f"toy:{name}"), name, args.n, args.seed)))
        return
    names = list(NAMES) if "all" in args.names else list(dict.fromkeys(args.names))
    tok = tokenizer()
    base = None
    for name in names:
        start = time.time()
        if name == "varbind":
            model, info = toy_train.train_varbind_recipe(tok, args.seed)
        elif name == "entity-base" or base is None:  # entity-ft continues from the base of the same seed
            base, info = toy_train.train_entity_base(tok, args.seed)
            model = base
        if name == "entity-ft":
            model, info = toy_train.train_entity_ft(tok, base, args.seed)
        info = {**info, "seed": args.seed, "seconds": round(time.time() - start, 1)}
        _save(name, model, tok, info, f"python -m lib.toy train {name} --seed {args.seed}")


if __name__ == "__main__":
    main(sys.argv[1:])
