"""Command-line pieces every workflow shares: model / placement flags, DCM flags, and opening a run."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lib import report
from lib.core.remote import TRAFFIC_KEYS
from lib.mask_intervention import DCMConfig
from lib.models import ModelHandle, is_lora_adapter, load_model, lora_base, model_sizes, same_model
from lib.types import INITS, PARAMETERIZATIONS

log = logging.getLogger("workflow")


def add_model_args(p: argparse.ArgumentParser, default_model: str, examples: str) -> None:
    """--model, --remote, --device-map, --dtype."""
    p.add_argument("--model", default=default_model,
                   help=f"HF id, local save_pretrained dir, or a built-in model ({examples})")
    p.add_argument("--remote", action="store_true", help="run every trace on NDIF (NDIF_HOST, NDIF_API_KEY)")
    p.add_argument("--device-map", default=None, help='e.g. "auto" to shard over local GPUs with accelerate')
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16")


def add_template_arg(p: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """--template: the prompts' wording as a JSON file of template fields (README, "Prompt templates")."""
    p.add_argument("--template", default=default,
                   help=f"{what} (JSON file of template fields; see README 'Prompt templates')")


def no_correct_triples(name: str, n: int, answered: int = 0) -> str:
    """The message a workflow reports when the model answers none (or too few) of a desideratum's triples."""
    if answered:
        return (f"the model answers only {answered} of the {n} {name} triples correctly (original and alternate), "
                "too few for both the training and the held-out set: nothing is patched or trained for it")
    return (f"the model answers none of the {n} {name} triples correctly (original and alternate): accuracy 0.00, "
            "so nothing is patched or trained for it (a model that cannot do the task has no mechanism to find)")


def add_dcm_args(p: argparse.ArgumentParser, *, lam: float, lam_help: str, epochs: int = 4, lr: float = 0.05,
                 init: str = "ones") -> None:
    """--batch-size, --epochs, --lambda, --lr, --parameterization, --init, --seed."""
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=epochs, help="DCM epochs over the training triples")
    p.add_argument("--lambda", dest="lam", type=float, default=lam, help=f"DCM sparsity strength ({lam_help})")
    p.add_argument("--lr", type=float, default=lr, help="DCM Adam learning rate (papers: 0.01 over more steps)")
    p.add_argument("--parameterization", default="clamp", choices=PARAMETERIZATIONS,
                   help="clamp = the papers' recipe; the others learn where its gradients vanish")
    p.add_argument("--init", default=init, choices=INITS,
                   help="initial mask weights; 'ones' is the papers' (nothing patched at the start)")
    p.add_argument("--seed", type=int, default=0)


def dcm_config(args: argparse.Namespace, **overrides) -> DCMConfig:
    """The DCMConfig the shared flags describe; a workflow adds its own fields (loss, penalty...)."""
    return DCMConfig(lam=args.lam, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                     parameterization=args.parameterization, init=args.init, seed=args.seed, **overrides)


def is_adapter(source: str) -> bool:
    """Whether a --fine-tuned value is a PEFT adapter directory (loaded over --model)."""
    return is_lora_adapter(source)


def check_pair(model: str, fine_tuned: str) -> None:
    """Raise ValueError unless `fine_tuned` can be patched into `model`: the same architecture sizes, or a LoRA
    adapter of `model`. Reads configs only (no weights), so a mismatch is reported before any model loads."""
    if is_lora_adapter(fine_tuned):
        trained_on = lora_base(fine_tuned)
        if trained_on is not None and not same_model(model, trained_on):
            raise ValueError(f"--fine-tuned {fine_tuned} is a LoRA adapter of {trained_on}, not of --model {model}: "
                             f"pass --model {trained_on}")
        return
    sizes = {}
    for flag, source in (("--model", model), ("--fine-tuned", fine_tuned)):
        try:
            sizes[flag] = model_sizes(source)
        except (OSError, ValueError) as err:
            raise ValueError(f"{flag} {source}: {err}") from None
    if sizes["--model"] != sizes["--fine-tuned"]:
        diff = "; ".join(f"{k}: {sizes['--model'][k]} vs {sizes['--fine-tuned'][k]}" for k in sizes["--model"]
                         if sizes["--model"][k] != sizes["--fine-tuned"][k])
        raise ValueError(f"--fine-tuned {fine_tuned} cannot be patched into --model {model}: their architectures "
                         f"differ ({diff}); CMAP needs a model and its fine-tune")


def start_run(args: argparse.Namespace) -> tuple[ModelHandle, Path, float]:
    """Logging, output directory and the model: what every workflow does first."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    handle = load_model(args.model, device_map=args.device_map, dtype=args.dtype, remote=args.remote)
    return handle, out, started


# ---- command-line errors and resumable runs ---------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors as one line (`prog: error: ...`) and exit status 2, no usage dump, no traceback."""

    def error(self, message: str):  # noqa: D401 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message}\n")


def csv_choice(value: str, choices: Sequence[str], flag: str) -> list[str]:
    """A comma-separated subset of `choices` in the order given; an unknown entry names the valid ones."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in choices]
    if unknown:
        raise argparse.ArgumentTypeError(f"{flag}: unknown {', '.join(map(repr, unknown))}; "
                                         f"choose from {','.join(choices)}")
    if not items:
        raise argparse.ArgumentTypeError(f"{flag}: give at least one of {','.join(choices)}")
    return items


def positive(kind: type, flag: str, allow_zero: bool = False):
    """An argparse type: a number > 0 (>= 0 with allow_zero) of `kind`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return value
    return parse


class Run:
    """A workflow run's output directory, step by step: each finished step's result is one JSON file under
    steps/, written atomically, so a run killed mid-step loses only that step and `--resume` skips the rest.

    run.json records the settings; resuming with other settings is refused (the finished steps would not
    belong to the new ones).
    """

    def __init__(self, out: Path, config: dict, resume: bool):
        self.out = Path(out)
        self.steps_dir = self.out / "steps"
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.skipped: list[str] = []
        self.seconds: dict[str, float] = {}
        self.requests: dict[str, dict[str, int]] = {}
        self._backends: list = []
        record = self.out / "run.json"
        if resume and record.exists():
            before = json.loads(record.read_text())["config"]
            changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
            if changed:
                raise SystemExit(f"--resume: {self.out} was run with other settings ({', '.join(changed)}); use "
                                 "another --out or the same flags")
        elif not resume:
            for old in self.steps_dir.glob("*.json"):
                old.unlink()
        write_json_atomic(record, {"config": config})

    def count_traffic(self, handles: Sequence[ModelHandle]) -> None:
        """Record each later step's NDIF traffic (requests, bytes sent and received) of the remote `handles`."""
        self._backends = [h.backend for h in handles if h.remote and hasattr(h.backend, "traffic")]

    def _traffic(self) -> dict[str, int]:
        return {k: sum(b.traffic[k] for b in self._backends) for k in TRAFFIC_KEYS}

    def record(self) -> dict:
        """What results.json says of the run itself: the steps read back, each step's seconds, and on a remote
        run each step's NDIF traffic."""
        record = {"skipped_steps": self.skipped, "step_seconds": self.seconds}
        if self.requests:
            record["step_requests"] = self.requests
        return record

    def done(self, name: str) -> bool:
        return (self.steps_dir / f"{name}.json").exists()

    def step(self, name: str, compute: Callable[[], dict]) -> dict:
        """The step's result: read back when --resume finds it finished, else computed and written."""
        path = self.steps_dir / f"{name}.json"
        if self.resume and path.exists():
            log.info("step %s: finished in an earlier run, skipped (--resume)", name)
            self.skipped.append(name)
            return json.loads(path.read_text())
        started, traffic = time.time(), self._traffic()
        result = json.loads(json.dumps(compute(), default=report.jsonable))  # as a resumed run reads it back
        self.seconds[name] = round(time.time() - started, 1)
        if self._backends:
            self.requests[name] = {k: v - traffic[k] for k, v in self._traffic().items()}
            log.info("step %s: %d NDIF requests", name, self.requests[name]["requests"])
        write_json_atomic(path, result)
        log.info("step %s done in %.1f s", name, self.seconds[name])
        return result


def requests_lines(results: dict) -> list[str]:
    """The report's line on a remote run's NDIF traffic per step (nothing for a local run)."""
    if not results.get("step_requests"):
        return []
    return ["", "NDIF requests per step (bytes sent / received): " + ", ".join(
        f"{k} {v['requests']} ({v['bytes_sent']:,} / {v['bytes_received']:,})"
        for k, v in results["step_requests"].items()) + ".", ""]


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it into place (no half-written results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=report.jsonable))
    os.replace(tmp, path)
    return path
