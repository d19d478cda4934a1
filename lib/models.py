"""Load any model as a `ModelHandle`: a Hugging Face id, a local directory, an in-memory module, a built-in model
by name ("toy:entity-base", "planted:strong"; lib.builtin), or a PEFT (LoRA) adapter over one of those.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lib import builtin
from lib.core.handle import ModelHandle, ModelLoadError, load_pretrained

__all__ = ["ModelHandle", "ModelLoadError", "is_lora_adapter", "load_model", "lora_base", "model_sizes", "same_model"]


def is_lora_adapter(source: Any) -> bool:
    """Whether `source` is a directory holding a PEFT adapter (adapter_config.json) rather than a model."""
    return isinstance(source, (str, Path)) and (Path(source).expanduser() / "adapter_config.json").is_file()


def lora_base(adapter: str | Path) -> str | None:
    """The base model an adapter was trained on (its adapter_config.json's base_model_name_or_path)."""
    config = json.loads((Path(adapter).expanduser() / "adapter_config.json").read_text())
    return config.get("base_model_name_or_path") or None


def same_model(a: str, b: str) -> bool:
    """Two spellings of one model: equal names, or paths to one directory (a built-in's saved copy included)."""
    if a == b:
        return True

    def where(name: str) -> Path | None:
        if builtin.is_builtin(name):
            try:
                return builtin.saved_dir(name).resolve()
            except ValueError:
                return None
        path = Path(name).expanduser()
        return path.resolve() if path.exists() else None

    pa, pb = where(a), where(b)
    return pa is not None and pa == pb


def model_sizes(source: str) -> dict:
    """The architecture sizes of a model from its config alone (no weights): model_type, n_layers, n_heads,
    n_kv_heads, head_dim, d_model, vocab_size. A LoRA adapter has its base's sizes."""
    from transformers import AutoConfig

    from lib.core.architectures import Architecture

    if is_lora_adapter(source):
        base = lora_base(source)
        if base is None:
            raise ValueError(f"the LoRA adapter {source} names no base model")
        return model_sizes(base)
    if builtin.is_builtin(source):
        config = builtin.config(source)
    else:
        path = Path(source).expanduser()
        if not path.exists() and (str(source).startswith((".", "/", "~")) or str(source).count("/") > 1):
            raise ValueError(f"model path {source} does not exist")
        try:
            config = AutoConfig.from_pretrained(str(path) if path.exists() else source)
        except OSError as err:
            raise ValueError(f"no config could be read for {source} (not a local directory, and the hub has no "
                             f"copy here: {type(err).__name__})") from None
    arch = Architecture.from_config(config)
    return {"model_type": arch.model_type, "n_layers": arch.n_layers, "n_heads": arch.n_heads,
            "n_kv_heads": arch.n_kv_heads, "head_dim": arch.head_dim, "d_model": arch.d_model,
            "vocab_size": getattr(config, "vocab_size", None)}


def load_model(
    source: Any,
    *,
    base: str | None = None,
    tokenizer: Any = None,
    device_map: Any = None,
    dtype: str | torch.dtype | None = None,
    remote: bool = False,
    backend: Any = None,
    **load_kwargs: Any,
) -> ModelHandle:
    """Load `source` as a `ModelHandle` (see lib.core.handle.load_pretrained for every argument).

    Args:
        source: a Hugging Face id ("meta-llama/Llama-2-7b-hf"), a local `save_pretrained` directory, an in-memory
            transformers model, a built-in model ("toy:entity-base", "planted:strong", ...; see README), or a
            directory holding a PEFT LoRA adapter (adapter_config.json), loaded over its base, unmerged.
        base: for an adapter, the base model to attach it to (default: the adapter's base_model_name_or_path);
            an adapter trained on another base is refused.
        tokenizer: a tokenizer object or path; required for in-memory models.
        device_map, dtype: placement and precision ("auto", "bfloat16").
        remote / backend: run traces on NDIF; a built-in model is then served from its saved directory.

    Returns:
        ModelHandle named after `source`.
    """
    common = dict(tokenizer=tokenizer, device_map=device_map, dtype=dtype, remote=remote, backend=backend)
    if is_lora_adapter(source):
        adapter = str(Path(source).expanduser().resolve())
        trained_on = lora_base(adapter)
        base = base or trained_on
        if base is None:
            raise ModelLoadError(f"the LoRA adapter {source} names no base model (base_model_name_or_path): pass "
                                 "the model it was trained on as --model / base=")
        if trained_on is not None and not same_model(str(base), trained_on):
            raise ModelLoadError(f"the LoRA adapter {source} was trained on {trained_on}, not on {base}: pass "
                                 f"--model {trained_on} (or an adapter of {base})")
        return load_model(base, peft=adapter, name=f"{base} + LoRA {Path(adapter).name}", **common, **load_kwargs)
    if builtin.is_builtin(source):
        name = load_kwargs.pop("name", source)
        if remote or backend is not None:
            return load_pretrained(str(builtin.saved_dir(source)), tokenizer=tokenizer, dtype=dtype, remote=remote,
                                   backend=backend, name=name, **load_kwargs)
        module, tok = builtin.build(source)
        if dtype is not None:
            module = module.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return load_pretrained(module, tokenizer=tok, name=name, **load_kwargs)
    return load_pretrained(source, **common, **load_kwargs)
