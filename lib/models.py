"""Load any model as a `ModelHandle`: a Hugging Face id, a local directory, an in-memory module, or a built-in
model by name ("toy:entity-base", "planted:strong"; lib.builtin).
"""
from __future__ import annotations

from typing import Any

import torch

from lib import builtin
from lib.core.handle import ModelHandle, ModelLoadError, load_pretrained

__all__ = ["ModelHandle", "ModelLoadError", "load_model"]


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
    """Load `source` as a `ModelHandle` (see lib.core.handle.load_pretrained for every argument).

    Args:
        source: a Hugging Face id ("meta-llama/Llama-2-7b-hf"), a local `save_pretrained` directory, an in-memory
            transformers model, or a built-in model ("toy:entity-base", "planted:strong", ...; see README).
        tokenizer: a tokenizer object or path; required for in-memory models.
        device_map, dtype: placement and precision ("auto", "bfloat16").
        remote / backend: run traces on NDIF; a built-in model is then served from its saved directory.

    Returns:
        ModelHandle named after `source`.
    """
    if builtin.is_builtin(source):
        if remote or backend is not None:
            return load_pretrained(str(builtin.saved_dir(source)), tokenizer=tokenizer, dtype=dtype, remote=remote,
                                   backend=backend, name=source, **load_kwargs)
        module, tok = builtin.build(source)
        if dtype is not None:
            module = module.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return load_pretrained(module, tokenizer=tok, name=source)
    return load_pretrained(source, tokenizer=tokenizer, device_map=device_map, dtype=dtype, remote=remote,
                           backend=backend, **load_kwargs)
