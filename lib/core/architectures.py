"""The architecture adapter: where each supported decoder keeps its per-head outputs, MLPs, norm and unembedding.

A head's output is the slice [h*D:(h+1)*D] of the *input* of the attention output projection (one slice per
query head, also under grouped-query attention); an MLP's output is the MLP module's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths (relative to the model root) for one family of decoders."""

    layers: str        # the list of decoder blocks
    attn: str          # the attention module, relative to a block
    attn_out: str      # attention output projection, relative to a block; its input holds the head outputs
    mlp: str           # the MLP, relative to a block; its output is the MLP's contribution
    final_norm: str
    unembed: str
    embed: str


_LLAMA_LIKE = ArchitectureSpec("model.layers", "self_attn", "self_attn.o_proj", "mlp", "model.norm", "lm_head",
                               "model.embed_tokens")

SPECS: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt2": ArchitectureSpec("transformer.h", "attn", "attn.c_proj", "mlp", "transformer.ln_f", "lm_head",
                             "transformer.wte"),
    "gptj": ArchitectureSpec("transformer.h", "attn", "attn.out_proj", "mlp", "transformer.ln_f", "lm_head",
                             "transformer.wte"),
    "gpt_neox": ArchitectureSpec("gpt_neox.layers", "attention", "attention.dense", "mlp",
                                 "gpt_neox.final_layer_norm", "lm_head", "gpt_neox.embed_in"),
}

_N_LAYERS = ("num_hidden_layers", "n_layer")
_N_HEADS = ("num_attention_heads", "n_head")
_HIDDEN = ("hidden_size", "n_embd")


class UnsupportedArchitecture(ValueError):
    """The model's architecture is not in the adapter."""


def resolve(root: Any, path: str) -> Any:
    """Follow a dotted path of attributes (digits index into module lists)."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _first_attr(config: Any, names: tuple[str, ...], what: str, model_type: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise UnsupportedArchitecture(f"config of model_type {model_type!r} has no {what} (looked for {', '.join(names)})")


@dataclass(frozen=True)
class Architecture:
    """Sizes and module paths of one loaded model; the single place that knows architecture differences."""

    model_type: str
    spec: ArchitectureSpec
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int

    @classmethod
    def from_config(cls, config: Any, model_class: str = "") -> "Architecture":
        model_type = getattr(config, "model_type", None)
        if model_type not in SPECS:
            raise UnsupportedArchitecture(
                f"{model_class or 'this model'} (model_type={model_type!r}) is not supported by the architecture "
                f"adapter; supported: {', '.join(sorted(SPECS))}. To add it, map its decoder blocks, attention module, attention "
                "output projection, MLP, final norm and unembedding in lib/core/architectures.py:SPECS."
            )
        n_heads = _first_attr(config, _N_HEADS, "number of attention heads", model_type)
        d_model = _first_attr(config, _HIDDEN, "hidden size", model_type)
        head_dim = getattr(config, "head_dim", None) or d_model // n_heads
        return cls(
            model_type=model_type,
            spec=SPECS[model_type],
            n_layers=_first_attr(config, _N_LAYERS, "number of layers", model_type),
            n_heads=n_heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            head_dim=int(head_dim),
            d_model=d_model,
        )

    # Module accessors: work on a plain torch model and on an nnsight model (its envoys mirror the tree).
    def layer(self, model: Any, layer: int) -> Any:
        return resolve(model, self.spec.layers)[layer]

    def attn(self, model: Any, layer: int) -> Any:
        """The attention module of a block (its output[1] holds the weights under eager attention)."""
        return resolve(self.layer(model, layer), self.spec.attn)

    def attn_out(self, model: Any, layer: int) -> Any:
        return resolve(self.layer(model, layer), self.spec.attn_out)

    def mlp(self, model: Any, layer: int) -> Any:
        return resolve(self.layer(model, layer), self.spec.mlp)

    def final_norm(self, model: Any) -> Any:
        return resolve(model, self.spec.final_norm)

    def unembed(self, model: Any) -> Any:
        return resolve(model, self.spec.unembed)

    def embed(self, model: Any) -> Any:
        return resolve(model, self.spec.embed)

    def head_slice(self, head: int) -> slice:
        """Columns of the output projection's input that carry this query head's output."""
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} heads per layer")
        return slice(head * self.head_dim, (head + 1) * self.head_dim)
