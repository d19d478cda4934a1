"""The built-in toy models: small Llama models trained here that really solve the two papers' tasks.

No weights can be downloaded, so the workflows default to models that this project trains itself and ships in
lib/builtin/toy_models/<name>/ (safetensors + tokenizer) with a manifest (accuracy per box count, training
command, seed, checksum). `load(name)` checks the checksum; `python workflows/toy_models.py train` regenerates
them (lib.builtin.toy_train has the recipes; docs/TOY_MODELS.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from lib.core.tokenization import word_level_tokenizer
from lib.data.entity import LABELS, OBJECTS, random_entity_prompt
from lib.data.varbind import random_value_program
from lib.types import Prompt

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
    return word_level_tokenizer(VOCAB)


def checksum(model_dir: Path) -> str:
    """sha256 over the weights and the tokenizer (the files that decide the model's outputs)."""
    digest = hashlib.sha256()
    for name in CHECKED_FILES:
        digest.update(name.encode())
        digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()


def read_manifest() -> dict:
    """The shipped manifest (accuracies, commands, seeds, checksums) as a dict."""
    if not MANIFEST.exists():
        raise ToyModelError(f"{MANIFEST} is missing: regenerate the toy models with "
                            f"`{regenerate_command('all')}`")
    return json.loads(MANIFEST.read_text())


def regenerate_command(name: str) -> str:
    """The command that retrains a toy model (and rewrites its manifest entry)."""
    return f"python workflows/toy_models.py train {name}"


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
            f"(`git checkout -- {model_dir}`) or regenerate them with "
            f"`{regenerate_command(name)}`"
        )
    model = LlamaForCausalLM.from_pretrained(model_dir).eval().requires_grad_(False)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return model, tok


# ---------------------------------------------------------------- held-out tasks and accuracy
def entity_tasks(n_boxes: int, n: int = N_EVAL, seed: int = EVAL_SEED) -> list[Prompt]:
    """Held-out entity-tracking prompts (the manifest's evaluation set for `seed`)."""
    rng = random.Random(seed + n_boxes)
    return [random_entity_prompt(rng, n_boxes) for _ in range(n)]


def varbind_tasks(ops: str, n: int = N_EVAL, seed: int = EVAL_SEED) -> list[Prompt]:
    """Held-out programs as the workflow makes them ("x=12, y=40, z=73. y-x="), operations drawn from `ops`."""
    rng = random.Random(seed + sum(map(ord, ops)))
    return [random_value_program(rng, rng.choice(ops)) for _ in range(n)]


def write_model(name: str, model: torch.nn.Module, tok: Any, entry: dict) -> dict:
    """Save a trained toy model and its manifest entry (`entry` gets the checksum and size added)."""
    model_dir = MODELS_DIR / name
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    entry = {**entry, "checksum": checksum(model_dir), "size_bytes": (model_dir / "model.safetensors").stat().st_size}
    manifest = read_manifest() if MANIFEST.exists() else {}
    manifest[name] = entry
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("%s saved to %s", name, model_dir)
    return entry
