"""Command-line pieces every workflow shares: model / placement flags, DCM flags, and opening a run."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lib.mask_intervention import DCMConfig
from lib.models import ModelHandle, load_model
from lib.types import INITS, PARAMETERIZATIONS


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


def start_run(args: argparse.Namespace) -> tuple[ModelHandle, Path, float]:
    """Logging, output directory and the model: what every workflow does first."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    handle = load_model(args.model, device_map=args.device_map, dtype=args.dtype, remote=args.remote)
    return handle, out, started
