"""The data types every layer shares, and the documented choices as `Literal` aliases. Imports nothing of lib.

- `Component` (a head or an MLP at a layer) and `Site` (a component at a named token position) name what is
  patched; `RowKey` / `Activations` hold what was read.
- `Prompt` (text, answer, named character spans) and `Triple` (original, alternate, target) are the data.
- `EncodedPrompts` is one side of a run, tokenized: left-padded ids and per-example token positions.
- `PairBatch` is the one batch type every method takes: an original run, an optional alternate run (the
  source of patched values), the target token a run is scored against and a foil (its competitor).
- `Metric` is the signature of every score: per-example values of last-position logits against a batch.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

# ---- documented choices -----------------------------------------------------------------------------------------

RowKind = Literal["head", "mlp"]
"""What a row of activations holds: "head" = the input of the attention output projection (every head of the
layer side by side, head h in columns [h*D, (h+1)*D)); "mlp" = the MLP module's output."""

Loss = Literal["target_logit", "logit_diff", "cross_entropy"]
"""DCM's task loss. target_logit: -logit[target] (Prakash et al.). logit_diff: -(logit[target] - logit[foil])
(Davies et al.). cross_entropy: softmax cross-entropy on the target."""

Penalty = Literal["l1", "l0.5"]
"""DCM's sparsity penalty on the patched amount 1 - w. l1: sum(1 - w) (Prakash et al.). l0.5: sum((1 - w + eps)^0.5)
(Davies et al.; eps keeps the gradient finite at w = 1)."""

Parameterization = Literal["clamp", "sigmoid", "hard_concrete"]
"""How DCM's weights are parameterised. clamp: w itself, clamped to [0, 1] after every step (the papers).
sigmoid: w = sigmoid(theta), never stuck at a bound. hard_concrete: stochastic L0 gates (Louizos et al. 2018)."""

Init = Literal["ones", "half", "random"]
"""DCM's initial weights. ones: nothing patched (the papers); half: every site half patched; random: U(0, 1)."""

Combine = Literal["sum", "alternate"]
"""How DCM combines several desiderata: sum their losses each step, or alternate steps (Davies et al.)."""

LOSSES: tuple[str, ...] = get_args(Loss)
PENALTIES: tuple[str, ...] = get_args(Penalty)
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)
INITS: tuple[str, ...] = get_args(Init)
COMBINES: tuple[str, ...] = get_args(Combine)


# ---- components and sites ---------------------------------------------------------------------------------------

_COMPONENT = re.compile(r"^(?:L(?P<layer>\d+)H(?P<head>\d+)|MLP(?P<mlp>\d+))$")
_SITE = re.compile(r"^(?P<component>[^@]+)(?:@(?P<position>.+))?$")


class Record:
    """Base of the small value types that travel to an NDIF server: immutable, compared and hashed by their fields.

    Not dataclasses on purpose: remotely, nnsight rebuilds lib's classes on the server from their source, and the
    methods `@dataclass` generates with exec have no source there (they fail or crash the server's worker). Every
    method here is written out in source. A subclass lists its fields in `_fields` and their defaults in `_defaults`.
    """

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        if len(args) > len(self._fields):
            raise TypeError(f"{name} takes {len(self._fields)} fields ({', '.join(self._fields)}), got {len(args)}")
        values = dict(zip(self._fields, args))
        for key, value in kwargs.items():
            if key not in self._fields or key in values:
                raise TypeError(f"{name} got an unexpected or repeated field {key!r}")
            values[key] = value
        for key in self._fields:
            if key not in values:
                if key not in self._defaults:
                    raise TypeError(f"{name} is missing field {key!r}")
                values[key] = self._defaults[key]
            object.__setattr__(self, key, values[key])

    def _key(self) -> tuple:
        return tuple(getattr(self, f) for f in self._fields)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: make a new one")

    def __reduce__(self) -> tuple:
        return (type(self), self._key())

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def __lt__(self, other: Any) -> bool:
        return self._order() < other._order()

    def __le__(self, other: Any) -> bool:
        return self._order() <= other._order()

    def __gt__(self, other: Any) -> bool:
        return self._order() > other._order()

    def __ge__(self, other: Any) -> bool:
        return self._order() >= other._order()

    def _order(self) -> tuple:
        return self._key()

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({fields})"


class Component(Record):
    """A head (layer, head) or an MLP (layer, head=None). Printed as L12H3 / MLP27.

    Fields: layer (int), head (int or None). Sorted by layer, then heads before the layer's MLP.
    """

    __slots__ = ("layer", "head")
    _fields = ("layer", "head")
    _defaults = {"head": None}
    layer: int
    head: int | None

    def _order(self) -> tuple:
        return (self.layer, self.head is None, self.head or 0)

    @property
    def is_head(self) -> bool:
        """True for a head, False for an MLP."""
        return self.head is not None

    @property
    def kind(self) -> RowKind:
        """"head" or "mlp": the row a component's output lives in."""
        return "head" if self.is_head else "mlp"

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}" if self.is_head else f"MLP{self.layer}"

    @classmethod
    def parse(cls, name: str) -> Component:
        """`Component.parse("L12H3")`, `Component.parse("MLP27")`."""
        match = _COMPONENT.match(name.strip())
        if not match:
            raise ValueError(f"bad component name {name!r}: write a head as L<layer>H<head> (L12H3), an MLP as MLP<layer>")
        if match["mlp"] is not None:
            return cls(int(match["mlp"]))
        return cls(int(match["layer"]), int(match["head"]))

    def check(self, arch: Any) -> Component:
        """Raise ValueError if the component does not exist in a model of this architecture (`n_layers`, `n_heads`)."""
        if not 0 <= self.layer < arch.n_layers:
            raise ValueError(f"{self}: layer {self.layer} out of range, the model has {arch.n_layers} layers")
        if self.is_head and not 0 <= self.head < arch.n_heads:
            raise ValueError(f"{self}: head {self.head} out of range, the model has {arch.n_heads} heads per layer")
        return self


RowKey = tuple[str, int, str]
"""(kind, layer, position name): the row of a layer's head outputs (n_heads * head_dim wide) or its MLP output
(d_model wide) at one named position, per example."""

Activations = dict[RowKey, torch.Tensor]
"""Rows read from a run: {RowKey: (batch, width)}."""


class Site(Record):
    """A component patched at one named token position ("last", "query_label", "label_3", "t12", ...).

    Fields: component (Component), position (str, default "last").
    """

    __slots__ = ("component", "position")
    _fields = ("component", "position")
    _defaults = {"position": "last"}
    component: Component
    position: str

    def _order(self) -> tuple:
        return (self.component._order(), self.position)

    def __str__(self) -> str:
        return f"{self.component}@{self.position}"

    @property
    def row_key(self) -> RowKey:
        """(kind, layer, position): the row this site is read from and written to."""
        return (self.component.kind, self.component.layer, self.position)

    @classmethod
    def parse(cls, name: str) -> Site:
        """`Site.parse("L2H3@last")`; without "@position" the position is "last"."""
        match = _SITE.match(name.strip())
        if not match:
            raise ValueError(f"bad site name {name!r}: write COMPONENT@POSITION, e.g. L2H3@last")
        return cls(Component.parse(match["component"]), match["position"] or "last")


# ---- prompts and triples ----------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One prompt: its text, the correct continuation and named character spans (e.g. "query_label").

    `spans["last"]` is always set by the data functions: the prompt's final token, where the answer is read.
    """

    text: str
    answer: str
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Triple:
    """A desideratum example: patching from `alternate` into `original` should make the model say `target`."""

    original: Prompt
    alternate: Prompt
    target: str
    desideratum: str
    meta: dict[str, Any] = field(default_factory=dict)


# ---- batches ----------------------------------------------------------------------------------------------------


class EncodedPrompts:
    """Prompts tokenized for one run: left-padded ids and each named position per example, in padded coordinates.

    input_ids, attention_mask: (batch, width). positions: {name: (batch,)} token indices; "last" is always there
    (width - 1 under left padding). Written out rather than a dataclass, like Record (it travels to NDIF).
    """

    __slots__ = ("input_ids", "attention_mask", "positions")

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: dict[str, torch.Tensor]):
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.positions = positions

    def __repr__(self) -> str:
        return f"EncodedPrompts(size={self.size}, width={self.width}, positions={sorted(self.positions)})"

    @property
    def size(self) -> int:
        """Number of prompts."""
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        """Padded length in tokens."""
        return self.input_ids.shape[1]

    def inputs(self) -> dict[str, torch.Tensor]:
        """The keyword inputs of a trace."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def select(self, idx: torch.Tensor) -> EncodedPrompts:
        """The examples at `idx` (a 1-d index tensor)."""
        return EncodedPrompts(self.input_ids[idx], self.attention_mask[idx], {k: v[idx] for k, v in self.positions.items()})

    def with_positions(self, positions: dict[str, torch.Tensor]) -> EncodedPrompts:
        """The same tokens with other named positions."""
        return EncodedPrompts(self.input_ids, self.attention_mask, dict(positions))

    def to(self, device: Any) -> EncodedPrompts:
        """The same prompts with every tensor on `device`."""
        return EncodedPrompts(self.input_ids.to(device), self.attention_mask.to(device),
                              {k: v.to(device) for k, v in self.positions.items()})


class PairBatch:
    """The batch every method takes: the run scored (`original`), the run patched values come from (`alternate`,
    None where the source is another model on the same input or a mean), and the answers.

    target_ids: (batch,) the token a run is scored against: a triple's target, or for plain prompts their own answer;
        None where only logits are wanted.
    foil_ids: (batch,) the competing token of a logit difference (the original's answer, or the alternate's when the
        target is the original's); None for plain prompts.
    desideratum: the name of the triples' desideratum ("" for plain prompts).
    """

    __slots__ = ("original", "alternate", "target_ids", "foil_ids", "desideratum")

    def __init__(self, original: EncodedPrompts, alternate: EncodedPrompts | None = None,
                 target_ids: torch.Tensor | None = None, foil_ids: torch.Tensor | None = None, desideratum: str = ""):
        self.original = original
        self.alternate = alternate
        self.target_ids = target_ids
        self.foil_ids = foil_ids
        self.desideratum = desideratum

    def __repr__(self) -> str:
        return (f"PairBatch(size={self.size}, alternate={self.alternate is not None}, "
                f"targets={self.target_ids is not None}, desideratum={self.desideratum!r})")

    @property
    def size(self) -> int:
        """Number of examples."""
        return self.original.size

    def select(self, idx: torch.Tensor) -> PairBatch:
        """The examples at `idx` (a 1-d index tensor) of every part."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return PairBatch(self.original.select(idx), None if self.alternate is None else self.alternate.select(idx),
                         pick(self.target_ids), pick(self.foil_ids), self.desideratum)

    def require_targets(self, what: str) -> torch.Tensor:
        """target_ids, or a ValueError naming the method that needs them."""
        if self.target_ids is None:
            raise ValueError(f"{what} scores against target tokens, but this batch has none: encode it with "
                             "answers (lib.data_gen.encode_pairs or encode_answers)")
        return self.target_ids


Metric = Callable[[torch.Tensor, PairBatch], torch.Tensor]
"""A score of a run: (last-position logits (batch, vocab), the batch) -> per-example values (batch,).
lib.scores holds the usual ones (target_hit, target_prob, target_logit, logit_diff)."""
