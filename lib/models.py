"""Load a model as an nnsight model: a Hugging Face id, a local directory, an in-memory module or a built-in model.

Every method in the project takes the `ModelHandle` returned by `load_model` and opens traces and sessions
through it, so that local, sharded (`device_map="auto"`) and remote (NDIF) runs share one code path.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from nnsight.modeling.transformers import TransformersModel

from lib.architectures import Architecture

log = logging.getLogger(__name__)

BUILTIN_PREFIXES = ("toy:", "planted:")


class ModelLoadError(RuntimeError):
    """A model or its tokenizer could not be loaded; the message says what to do."""


@dataclass
class ModelHandle:
    """An nnsight model with its architecture adapter and the switch that decides where traces run."""

    lm: TransformersModel
    arch: Architecture
    name: str
    remote: bool = False
    backend: Any = None          # an explicit nnsight RemoteBackend (self-hosted NDIF), else None

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def model(self) -> Any:
        """The envoy tree to address modules through (`arch.attn_out(handle.model, layer)`)."""
        return self.lm

    def _run_kwargs(self) -> dict:
        if not self.remote or _inside_trace():  # traces inside a session ride on the session's request
            return {}
        return {"backend": self.backend} if self.backend is not None else {"remote": True}

    def trace(self, *inputs: Any, **kwargs: Any):
        """`lm.trace` that runs locally or remotely according to the handle."""
        return self.lm.trace(*inputs, **self._run_kwargs(), **kwargs)

    def session(self):
        """`lm.session`: remotely, every trace inside it travels as one request (use it as `with h.session():`)."""
        return self.lm.session(**self._run_kwargs())


def _inside_trace() -> bool:
    """True while an nnsight trace or session body runs (nnsight counts nesting per thread)."""
    from nnsight.tracing import tracer

    return getattr(tracer._local, "depth", 0) > 0


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source.rstrip(os.sep) and source.count("/") != 1


def _load_tokenizer(source: str | Path, tokenizer: Any) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(
            f"no tokenizer could be loaded for {source}: save one next to the weights "
            f"(tokenizer.save_pretrained(dir)) or pass tokenizer=... ({type(err).__name__}: {err})"
        ) from err


def _wrap(lm: TransformersModel, name: str, **handle_kwargs: Any) -> ModelHandle:
    arch = Architecture.from_config(lm.config, type(lm._module).__name__)
    return ModelHandle(lm=lm, arch=arch, name=name, **handle_kwargs)


def load_model(
    source: Any,
    *,
    tokenizer: Any = None,
    device_map: Any = None,
    dtype: str | torch.dtype | None = None,
    remote: bool = False,
    backend: Any = None,
    **load_kwargs: Any,
) -> ModelHandle:
    """Load `source` as a `ModelHandle`.

    source: a Hugging Face id ("meta-llama/Llama-2-7b-hf"), a local `save_pretrained` directory, an in-memory
        transformers model, or a built-in model ("toy:entity-base", "planted:strong", ...; see README).
    tokenizer: a tokenizer object or path; required for in-memory models, else read from the directory / hub.
    device_map: passed to transformers (e.g. "auto" to shard over GPUs with accelerate).
    dtype: "float32", "bfloat16", ... or a torch dtype.
    remote / backend: run traces on NDIF (see lib/remote.py); the weights are not loaded locally.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map

    if remote or backend is not None:  # NDIF: `backend` is a RemoteBackend or a host URL (lib/remote.py)
        if isinstance(source, torch.nn.Module):
            raise ModelLoadError("an in-memory model cannot run remotely: save_pretrained it where the NDIF server "
                                 "can load it, deploy it (docs/REMOTE.md) and pass that directory or hub id")
        from lib.remote import load_remote

        return load_remote(source, tokenizer=tokenizer, backend=backend, **load_kwargs)

    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise ModelLoadError("an in-memory model needs its tokenizer: load_model(module, tokenizer=...)")
        module = source.eval().requires_grad_(False)
        lm = TransformersModel(module, task="text-generation", tokenizer=_load_tokenizer("", tokenizer))
        return _wrap(lm, getattr(module.config, "name_or_path", "") or type(module).__name__)

    source = str(source)
    if source.startswith(BUILTIN_PREFIXES):
        from lib import builtin_models

        module, tok = builtin_models.build(source)
        handle = load_model(module, tokenizer=tok)
        handle.name = source
        return handle

    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: give a directory written by model.save_pretrained(dir)")
        name = str(path)
    elif _looks_like_path(source):
        raise ModelLoadError(f"model path {source} does not exist")
    else:
        name = source  # a hub id
    try:
        tok = _load_tokenizer(name, tokenizer)
        lm = TransformersModel(
            name, task="text-generation", tokenizer=tok, dispatch=not (remote or backend), **load_kwargs
        )
    except OSError as err:
        hint = " (HF_HUB_OFFLINE is set)" if _hub_offline() else ""
        raise ModelLoadError(
            f"could not load {source!r} from the Hugging Face hub{hint}: it is not cached here. "
            "Pass a local directory written by save_pretrained, or a built-in model (toy:..., planted:...)."
        ) from err
    except ModelLoadError as err:
        if path.exists() or not _hub_offline():
            raise
        raise ModelLoadError(
            f"could not load {source!r}: HF_HUB_OFFLINE is set and it is not cached here. "
            "Pass a local directory written by save_pretrained, or a built-in model (toy:..., planted:...)."
        ) from err
    if not (remote or backend):
        lm._module.requires_grad_(False).eval()
    return _wrap(lm, name, remote=bool(remote or backend), backend=backend)
