"""A model as nnsight sees it, with its architecture adapter and the switch that decides where traces run.

Every method in the project takes a `ModelHandle` and opens traces and sessions through it, so local, sharded
(`device_map="auto"`) and remote (NDIF) runs share one code path. `load_pretrained` makes one from a Hugging Face
id, a local `save_pretrained` directory or an in-memory module; lib.models.load_model adds the built-in names.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nnsight
import torch
from nnsight.modeling.transformers import TransformersModel

from lib.core.architectures import Architecture
from lib.core.remote import is_model_key, key_for, make_backend, parse_model_key

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model or its tokenizer could not be loaded; the message says what to do."""


@dataclass
class ModelHandle:
    """An nnsight model with its architecture adapter and the switch that decides where traces run.

    A remote handle holds no weights (a meta-device copy for tracing): its traces and sessions are sent to NDIF.
    Inside a session's body, which runs on the server next to the weights, the same handle's traces run in place
    and join the session's request.
    """

    lm: TransformersModel
    arch: Architecture
    name: str
    remote: bool = False
    backend: Any = None          # an explicit nnsight RemoteBackend (self-hosted NDIF), else None

    @property
    def tokenizer(self):
        """The model's tokenizer (the one every data function is given)."""
        return self.lm.tokenizer

    @property
    def model(self) -> Any:
        """The envoy tree to address modules through (`arch.attn_out(handle.model, layer)`)."""
        return self.lm

    def _sends_requests(self) -> bool:
        """Remote and without weights here: on the server (a session body) the module has its real weights."""
        if not self.remote:
            return False
        first = next(iter(self.lm._module.parameters()), None)
        return first is None or first.device.type == "meta"

    def _run_kwargs(self) -> dict:
        if not self._sends_requests():
            return {}
        return {"backend": self.backend} if self.backend is not None else {"remote": True}

    def input_device(self) -> torch.device | None:
        """Where token inputs must be for a local run: the input embeddings' device when it is an accelerator, else
        None (CPU, and remote handles, whose meta copy only traces). transformers puts a single-device model there
        with no accelerate hook to move the inputs, and nnsight moves only the text it tokenizes itself."""
        if self._sends_requests():
            return None
        embeddings = self.lm._module.get_input_embeddings()
        weight = embeddings.weight if embeddings is not None else next(self.lm._module.parameters())
        device = weight.device
        return None if device.type in ("cpu", "meta") else device

    def trace(self, *inputs: Any, **kwargs: Any):
        """`lm.trace` that runs locally or remotely according to the handle; tensor inputs (input_ids, attention
        mask) are moved to the model's input device first (`input_device`)."""
        device = self.input_device()
        if device is not None:
            inputs = tuple(_to_device(x, device) for x in inputs)
            kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
        return self.lm.trace(*inputs, **self._run_kwargs(), **kwargs)

    def session(self):
        """`lm.session`: remotely, every trace inside it travels as one request (use it as `with h.session():`)."""
        return self.lm.session(**self._run_kwargs())

    def in_one_request(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(handle, *args, **kwargs)` with every trace it opens in one request.

        Remotely the call runs inside one session on the server and only its return value comes back (an
        optimisation loop, a scan over many patches: one NDIF request); locally it is a plain call.
        """
        if not self._sends_requests():
            return fn(self, *args, **kwargs)
        with self.session():
            result = nnsight.save(fn(self, *args, **kwargs))
        return result


def _to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or a dict of them (tokenizer output), on `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source.rstrip(os.sep) and source.count("/") != 1


def load_tokenizer(source: str | Path, tokenizer: Any = None) -> Any:
    """`tokenizer` itself, or loaded from a path / id, or the one saved with the model at `source`."""
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


def wrap(lm: TransformersModel, name: str, **handle_kwargs: Any) -> ModelHandle:
    """A handle around an nnsight model (the architecture is read from its config)."""
    arch = Architecture.from_config(lm.config, type(lm._module).__name__)
    return ModelHandle(lm=lm, arch=arch, name=name, **handle_kwargs)


def load_pretrained(
    source: Any,
    *,
    tokenizer: Any = None,
    device_map: Any = None,
    dtype: str | torch.dtype | None = None,
    remote: bool = False,
    backend: Any = None,
    name: str | None = None,
    peft: str | None = None,
    **load_kwargs: Any,
) -> ModelHandle:
    """A `ModelHandle` for a Hugging Face id, a local `save_pretrained` directory or an in-memory module.

    Args:
        source: "meta-llama/Llama-2-7b-hf", a directory, an nnsight model key, or a transformers module.
        tokenizer: a tokenizer object or path; required for in-memory modules, else read from the directory / hub.
        device_map: passed to transformers ("auto" shards over GPUs with accelerate).
        dtype: "float32", "bfloat16", ... or a torch dtype.
        remote / backend: run traces on NDIF (lib.core.remote): the weights stay on the server and the client
            keeps a meta-device copy for tracing. `backend` is a RemoteBackend or a host URL.
        name: what the handle is called in logs and results (default: the source).
        peft: a PEFT (LoRA) adapter directory or hub id attached to the model, unmerged, in place: every module keeps
            its path (nnsight's `peft=`); remotely the server attaches it per request.

    Returns:
        ModelHandle; local models are frozen (`requires_grad_(False)`) and in eval mode.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    if peft is not None:
        peft = str(peft)
        load_kwargs["peft"] = peft
    if remote or backend is not None:
        if isinstance(source, torch.nn.Module):
            raise ModelLoadError("an in-memory model cannot run remotely: save_pretrained it where the NDIF server "
                                 "can load it, deploy it (docs/REMOTE.md) and pass that directory or hub id")
        return _load_remote(str(source), tokenizer=tokenizer, backend=backend, name=name, **load_kwargs)
    if device_map is not None:
        load_kwargs["device_map"] = device_map

    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise ModelLoadError("an in-memory model needs its tokenizer: load_model(module, tokenizer=...)")
        module = source.eval().requires_grad_(False)
        try:
            lm = TransformersModel(module, task="text-generation", tokenizer=load_tokenizer("", tokenizer),
                                   **({"peft": peft} if peft is not None else {}))
        except ValueError as err:  # nnsight refuses an adapter whose weights do not land
            raise ModelLoadError(f"could not attach {peft}: {err}") from err
        lm._module.requires_grad_(False).eval()
        return wrap(lm, name or getattr(module.config, "name_or_path", "") or type(module).__name__)

    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: give a directory written by model.save_pretrained(dir)")
        where = str(path)
    elif _looks_like_path(source):
        raise ModelLoadError(f"model path {source} does not exist")
    else:
        where = source  # a hub id
    try:
        tok = load_tokenizer(where, tokenizer)
        lm = TransformersModel(where, task="text-generation", tokenizer=tok, dispatch=True, **load_kwargs)
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
    lm._module.requires_grad_(False).eval()
    return wrap(lm, name or where)


def _load_remote(source: str, *, tokenizer: Any, backend: Any, name: str | None, **load_kwargs: Any) -> ModelHandle:
    """A meta-device model for tracing, bound to the server's copy (see lib.core.remote for host, key, errors)."""
    name = name or source
    key = None
    if is_model_key(source):
        key, source = source, parse_model_key(source)["repo_id"]
    path = Path(source).expanduser()
    if path.exists():
        source = str(path.resolve())
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: give a directory written by save_pretrained")
    try:
        tok = load_tokenizer(source, tokenizer)
        lm = TransformersModel(source, task="text-generation", tokenizer=tok, dispatch=False, **load_kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"could not read the config of {source!r} to trace it remotely: it is neither a local directory "
            "nor reachable on the Hugging Face hub. Pass a local save_pretrained directory or a hub id.") from err
    key = key or key_for(lm)
    handle = wrap(lm, name, remote=True, backend=make_backend(key, backend, lm=lm))
    log.info("remote model %s via %s", key, handle.backend.host)
    return handle
