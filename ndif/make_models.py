"""Save the models a self-hosted NDIF serves, and write its deploy file (run by ndif/server.py, project venv).

- `random-llama`: lib.builtin.random_models.random_model("llama") with the word-level task tokenizer, rebuilt
  deterministically (fixed seed) into .ndif/models/random-llama on every `make ndif-up`.
- every built-in toy model saved under lib/builtin/toy_models/<name> (save_pretrained format), deployed in place.
- the planted models in PLANTED (hand-weighted, built in memory by lib.builtin.planted), saved to .ndif/models/planted-<v>,
  so that the workflows' default models (`planted:strong`, `planted:paper-base` / `planted:paper-ft`) run with
  `--remote` too.

Each model is deployed under the remote key the client computes for the same directory
(lib.core.remote.model_key), with its measured size, float32 weights and the project's CPU actor.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import yaml

from lib.builtin.random_models import random_model, task_tokenizer
from lib.core.remote import model_key

log = logging.getLogger("ndif.models")
ROOT = Path(__file__).resolve().parent.parent
TOY_DIR = ROOT / "lib" / "builtin" / "toy_models"
ACTOR_CLASS = "ndif_cpu_actor.CPUModelActor"
PLANTED = ("strong", "paper-base", "paper-ft")  # each deployed model is a Ray actor of ~0.5 GB: only the
# workflows' defaults (planted:strong, and the paper pair for the entity-tracking workflow's base and fine-tune)

# The random model the remote tests compare against a local run (tests/test_remote.py imports these).
RANDOM_NAME = "random-llama"
RANDOM_SIZE = dict(n_layers=2, n_heads=4, d_model=32, n_kv_heads=2, seed=0)


def save_random_model(out: Path) -> Path:
    tokenizer = task_tokenizer()
    model = random_model("llama", vocab_size=len(tokenizer), **RANDOM_SIZE)
    path = out / "models" / RANDOM_NAME
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_planted(out: Path, variant: str) -> Path:
    from lib.builtin import planted

    model, tokenizer = planted.build(variant)
    path = out / "models" / f"planted-{variant}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(f.stat().st_size for f in path.glob("*.bin"))


def deployment(path: Path) -> dict:
    return {
        "checkpoint": str(path),
        "model_key": model_key(str(path)),
        "task": "text-generation",
        "size_bytes": max(size_bytes(path), 1),
        "padding_bias": 64 * 1024**2,  # the default 500 MB of headroom per model is GPU-sized
        "dtype": "float32",
        "trusted": True,  # our own code: no sandbox process per request
        "pinned": True,
        "actor_class": ACTOR_CLASS,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="NDIF home (.ndif)")
    args = parser.parse_args()
    out = args.out.resolve()
    models = {RANDOM_NAME: save_random_model(out)}
    for variant in PLANTED:
        models[f"planted-{variant}"] = save_planted(out, variant)
    if TOY_DIR.is_dir():
        for config in sorted(TOY_DIR.glob("*/config.json")):
            models[f"toy-{config.parent.name}"] = config.parent.resolve()
    specs = [deployment(path) for path in models.values()]
    (out / "deploy.yaml").write_text(yaml.safe_dump({"models": specs}, sort_keys=False, width=1000))
    (out / "models.json").write_text(json.dumps(
        {name: {"path": str(path), "model_key": model_key(str(path))} for name, path in models.items()}, indent=1))
    log.info("models for NDIF: %s", ", ".join(models))


if __name__ == "__main__":
    main()
