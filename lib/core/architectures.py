"""The architecture adapter: where each supported decoder keeps its per-head outputs, per-head query / key / value
inputs, MLPs, norm and unembedding.

A head's output is the slice [h*D:(h+1)*D] of the *input* of the attention output projection (one slice per
query head, also under grouped-query attention); an MLP's output is the MLP module's output.

A head's query, key and value inputs are column slices of the *output* of the projection(s) that make them,
before any rotary embedding or per-head norm (Qwen3's q_norm / k_norm) is applied, i.e. what the authors of
Prakash et al. (2024) patch (`q_proj` / `v_proj` outputs). Three layouts:

- "separate" (Llama, Mistral, Qwen, Gemma, GPT-J): `q_proj`, `k_proj`, `v_proj`, each head's D columns side by
  side (head h at [h*D, (h+1)*D)).
- "stacked" (GPT-2's fused `c_attn`): one output [q of every head | k of every head | v of every head].
- "per_head" (GPT-NeoX's fused `query_key_value`): one output, per head [q_h | k_h | v_h] (3D columns each).

Grouped-query attention: the k and v of query head h are those of its key/value head h // (n_heads / n_kv_heads),
shared by every query head of that group. Patching "the V of head h" therefore writes the value vector of h's
key/value head and changes the input of every query head in h's group (there is no per-query-head copy of it in
the model before the attention function repeats it); the query of head h is its own.
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
    qkv: tuple[str, str, str]  # modules whose outputs hold the queries, keys, values (relative to a block)
    qkv_layout: str            # "separate", "stacked" or "per_head" (see the module docstring)


QKV_KINDS = ("q", "k", "v")
QKV_LAYOUTS = ("separate", "stacked", "per_head")

_LLAMA_LIKE = ArchitectureSpec("model.layers", "self_attn", "self_attn.o_proj", "mlp", "model.norm", "lm_head",
                               "model.embed_tokens",
                               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "separate")

SPECS: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt2": ArchitectureSpec("transformer.h", "attn", "attn.c_proj", "mlp", "transformer.ln_f", "lm_head",
                             "transformer.wte", ("attn.c_attn",) * 3, "stacked"),
    "gptj": ArchitectureSpec("transformer.h", "attn", "attn.out_proj", "mlp", "transformer.ln_f", "lm_head",
                             "transformer.wte", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "separate"),
    "gpt_neox": ArchitectureSpec("gpt_neox.layers", "attention", "attention.dense", "mlp",
                                 "gpt_neox.final_layer_norm", "lm_head", "gpt_neox.embed_in",
                                 ("attention.query_key_value",) * 3, "per_head"),
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
        """Sizes and module paths from a transformers config; UnsupportedArchitecture names what to map."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SPECS:
            raise UnsupportedArchitecture(
                f"{model_class or 'this model'} (model_type={model_type!r}) is not supported by the architecture "
                f"adapter; supported: {', '.join(sorted(SPECS))}. To add it, map its decoder blocks, attention "
                "module, attention output projection, MLP, final norm, unembedding, embedding and query/key/value "
                "projections in lib/core/architectures.py:SPECS."
            )
        n_heads = _first_attr(config, _N_HEADS, "number of attention heads", model_type)
        d_model = _first_attr(config, _HIDDEN, "hidden size", model_type)
        head_dim = getattr(config, "head_dim", None) or d_model // n_heads
        n_kv_heads = int(getattr(config, "num_key_value_heads", None) or n_heads)
        if n_heads % n_kv_heads:
            raise UnsupportedArchitecture(f"{model_type}: {n_heads} query heads do not split evenly over "
                                          f"{n_kv_heads} key/value heads")
        return cls(
            model_type=model_type,
            spec=SPECS[model_type],
            n_layers=_first_attr(config, _N_LAYERS, "number of layers", model_type),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=int(head_dim),
            d_model=d_model,
        )

    # Module accessors: work on a plain torch model and on an nnsight model (its envoys mirror the tree).
    def layer(self, model: Any, layer: int) -> Any:
        """The decoder block `layer`."""
        return resolve(model, self.spec.layers)[layer]

    def attn(self, model: Any, layer: int) -> Any:
        """The attention module of a block (its output[1] holds the weights under eager attention)."""
        return resolve(self.layer(model, layer), self.spec.attn)

    def attn_out(self, model: Any, layer: int) -> Any:
        """The attention output projection of a block: its input holds every head's output."""
        return resolve(self.layer(model, layer), self.spec.attn_out)

    def mlp(self, model: Any, layer: int) -> Any:
        """The MLP of a block: its output is the MLP's contribution."""
        return resolve(self.layer(model, layer), self.spec.mlp)

    def final_norm(self, model: Any) -> Any:
        """The norm before the unembedding."""
        return resolve(model, self.spec.final_norm)

    def unembed(self, model: Any) -> Any:
        """The unembedding (its output: the logits)."""
        return resolve(model, self.spec.unembed)

    def embed(self, model: Any) -> Any:
        """The token embedding."""
        return resolve(model, self.spec.embed)

    def head_slice(self, head: int) -> slice:
        """Columns of the output projection's input that carry this query head's output."""
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} heads per layer")
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    # Query / key / value inputs of the heads (see the module docstring for the layouts).
    def qkv_path(self, kind: str) -> str:
        """The module (relative to a block) whose output holds `kind` ("q", "k" or "v")."""
        if kind not in QKV_KINDS:
            raise ValueError(f"unknown head input {kind!r}: use one of {', '.join(QKV_KINDS)}")
        return self.spec.qkv[QKV_KINDS.index(kind)]

    def qkv_module(self, model: Any, layer: int, kind: str) -> Any:
        """The projection module whose output holds the queries, keys or values of a layer."""
        return resolve(self.layer(model, layer), self.qkv_path(kind))

    def kv_head(self, head: int) -> int:
        """The key/value head query head `head` reads (itself without grouped-query attention)."""
        self.head_slice(head)  # range check
        return head // (self.n_heads // self.n_kv_heads)

    def qkv_slice(self, kind: str, head: int) -> slice:
        """Columns of `qkv_module(..., kind)`'s output that hold query head `head`'s query, key or value input.

        Under grouped-query attention the key and value columns are those of the head's key/value group
        (`kv_head`), shared with the other query heads of the group.
        """
        self.qkv_path(kind)  # kind check
        self.head_slice(head)  # range check
        d = self.head_dim
        index = head if kind == "q" else self.kv_head(head)
        layout = self.spec.qkv_layout
        if layout == "separate":
            start = index * d
        elif layout == "stacked":  # [q: n_heads * D | k: n_kv_heads * D | v: n_kv_heads * D]
            start = {"q": 0, "k": self.n_heads * d, "v": (self.n_heads + self.n_kv_heads) * d}[kind] + index * d
        elif layout == "per_head":  # per head [q_h | k_h | v_h] (no grouped-query attention in this layout)
            start = index * 3 * d + QKV_KINDS.index(kind) * d
        else:
            raise UnsupportedArchitecture(f"unknown q/k/v layout {layout!r}; known: {', '.join(QKV_LAYOUTS)}")
        return slice(start, start + d)
