"""Hand-weighted GPT-2 models that solve entity tracking through a known circuit: ground truth for every method.

On a real model nobody knows which heads a circuit-discovery method *should* find. These models are built, not
trained: every weight is set by `build` from the construction below, so the answer is known and written down
by `ground_truth`. Prompts are the paper's format ("The apple is in Box F, ... Box F contains the" -> " apple").
docs/PLANTED.md has the measured accuracies and tables.

VARIANTS: 3 layers x 4 heads, MLPs zero; the nine heads outside the circuit are distractors writing to a scratch
subspace. "strong" and "weak" fetch by label identity:

- L0H1, object binder, at every box label: attends 4 tokens back (its segment's object, through the absolute
  position embeddings) and writes the object's identity and a "box filled" flag into the label's stream.
- L1H2, query-label mover, at the last token: attends 2 tokens back (the query label) and writes the label's
  identity into a "queried label" subspace of the last token.
- L2H3, value fetcher, at the last token: matches the queried label against the labels that carry the filled
  flag and copies the object bound there into the object subspace, which the unembedding reads.

"weak" differs only in L2H3's query/key weights: its label match is blunted and competes with a fixed per-letter
preference, so it sometimes fetches from the wrong box; the strong L2H3 output written into it restores accuracy.

"positional" fetches by position, like Llama-7B's circuit in Prakash et al. (Groups C -> B -> A), in the same slots:

- L0H1, position detector, at the query label: attends to the earlier occurrence of the same label and writes
  that token's position code (a pointer).
- L1H2, position transmitter, at the last token: attends 2 tokens back and moves the pointer there.
- L2H3, value fetcher, at the last token: attends to the object 4 tokens before the pointed-to label.

"paper-base" and "paper-ft" (PAIR, 4 layers x 4 heads) are a base model and its "fine-tune" with the four groups
of Prakash et al.'s Llama-7B circuit, two heads each, eight distractors (two of them decoys that attend like a
circuit head); the default pair of the entity-tracking workflow:

- Group D, Structure Readers L0H1 + L0H2, at every box label (prev_query_label is the one read): attend to the
  box's object and write half of its identity each into a "bound object" subspace of the label.
- Group C, Position Detectors at the query label, both attending to the earlier occurrence of the same label:
  L1H3 copies that token's position code (the pointer), L1H0 the bound object D wrote (V-composition C <- D).
- Group B, Position Transmitters at the last token, both attending to the query label: L2H1 moves the pointer,
  L2H3 the bound object.
- Group A, Value Fetchers at the last token, both attending to the correct object and writing its identity:
  L3H2 through the pointer (0.7 of the logit), L3H0 through the bound object's identity (0.3; with no match it
  rests on plain words, which write nothing). The pointer outvotes the bound object, so moving the pointer moves
  the answer, while a bound object absent from the context only silences L3H0.

paper-ft differs from paper-base only in L3H2's query/key weights: the base's pointer match is blunt and competes
with a fixed per-object preference (like "weak"), the fine-tune's is sharp. Why D writes the bound object and not
a position, and which of the paper's findings the pair shows: docs/PLANTED.md, "The paper pair".

The residual stream is built in a "logical" space of named features, embedded by an orthonormal map whose image
has zero mean, so LayerNorm's centring does nothing and it only rescales. All reads are made scale-tolerant by a
large constant feature that dominates the norm, and by margins of several nats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lib.core.tokenization import SPECIAL_TOKENS, word_level_tokenizer
from lib.data.entity import LABELS, OBJECTS
from lib.types import Component

VARIANTS = ("strong", "weak", "positional")   # one three-head circuit each, 3 layers x 4 heads
PAIR = ("paper-base", "paper-ft")             # the paper's four groups, a base and its fine-tune, 4 layers x 4 heads
ALL_VARIANTS = VARIANTS + PAIR
MECHANISM = {"strong": "label", "weak": "label", "positional": "position",  # what the fetch is keyed on
             "paper-base": "paper", "paper-ft": "paper"}                   # position, checked by the bound object
N_LAYERS, N_HEADS, D_MODEL = 3, 4, 192        # VARIANTS; the pair's sizes are PAIR_SIZES
PAIR_SIZES = (4, 4, 256)                      # layers, heads, d_model of paper-base / paper-ft
N_POSITIONS = 256
WORDS = ("the", "is", "in", "box", "contains", ",", ".")

# The circuit's three heads. strong / weak: binder, query-label mover, value fetcher. positional: the same slots
# hold the position detector, position transmitter and value fetcher.
BINDER, MOVER, FETCHER = Component(0, 1), Component(1, 2), Component(2, 3)
POSITION_DETECTOR, POSITION_TRANSMITTER = BINDER, MOVER
BINDER_OFFSET, MOVER_OFFSET = 4, 2   # object -> label, query label -> last token, in tokens

CONST = 40.0           # constant feature: dominates every token's norm, so LayerNorm scales are near constant
                       # and the logits barely depend on the rest of the stream (see docs/PLANTED.md)
N_FREQ = 11            # sinusoid frequencies of the position code (2 * N_FREQ + 26 label dims fit one head)
POS_MARGIN = 14.0      # nats between the intended position and the best wrong one (positional heads)
FETCH_MARGIN = {"strong": 6.0, "weak": 1.5,   # nats the matching label gets over a non-matching filled label
                "positional": 3.5}            # nats the pointed-to object gets over any other object, at least
SEGMENT_TOKENS = 7     # ", the apple is in box f": objects sit a multiple of 7 tokens apart
WEAK_LETTER_BIAS = 1.5  # std (nats) of the weak fetcher's fixed per-letter preference
FLAG_BONUS = 12.0      # nats for a key that carries the "box filled" flag (excludes the query label itself)
LABEL_BONUS = 12.0     # nats for a key that is a label token (excludes junk flags at the first tokens)
LOGIT_NATS = 10.0      # logit of a fully fetched object
DETECT_MARGIN = 12.0   # positional: nats the earlier occurrence of the query label gets over the label itself
OBJECT_BONUS = 8.0     # positional: nats for a key that is an object token
SCRATCH = 8            # dims the distractor heads write to; nothing in the circuit reads them

# The pair (PAIR): Prakash et al.'s four groups, two heads each. Group A reads what B moves, B what C copies, C what
# D wrote: D at layer 0, C at 1, B at 2, A at 3 (see docs/PLANTED.md, "The paper pair").
VALUE_FETCHER, BOUND_FETCHER = Component(3, 2), Component(3, 0)          # Group A: by pointer / by bound object
POINTER_TRANSMITTER, BOUND_TRANSMITTER = Component(2, 1), Component(2, 3)  # Group B: move pointer / bound object
POINTER_DETECTOR, BOUND_DETECTOR = Component(1, 3), Component(1, 0)      # Group C: copy pointer / bound object
STRUCTURE_READERS = (Component(0, 1), Component(0, 2))                    # Group D: each writes half the object
GROUPS = {"Value Fetcher": (VALUE_FETCHER, BOUND_FETCHER),
          "Position Transmitter": (POINTER_TRANSMITTER, BOUND_TRANSMITTER),
          "Position Detector": (POINTER_DETECTOR, BOUND_DETECTOR),
          "Structure Reader": STRUCTURE_READERS}
GROUP_POSITION = {"Value Fetcher": "last", "Position Transmitter": "last", "Position Detector": "query_label",
                  "Structure Reader": "prev_query_label"}
POINTER_MARGIN = {"paper-base": 4.0, "paper-ft": 8.0}  # nats the pointed-to object gets over other objects
OBJECT_PRIOR = {"paper-base": 6.0, "paper-ft": 3.0}    # std (nats) of the pointer fetcher's fixed per-object preference
FETCH_SHARE = (0.7, 0.3)   # of LOGIT_NATS written by the pointer / the bound-object fetcher: the pointer outvotes
BOUND_MATCH = 20.0         # nats for the object whose identity the bound-object query carries (at full strength)
SINK = 10.0                # nats for every plain word, where the bound-object fetcher rests when nothing matches


@dataclass(frozen=True)
class Layout:
    """Named slices of the logical feature space."""

    n_obj: int
    n_lab: int
    n_word: int
    mechanism: str = "label"

    def _sizes(self) -> dict[str, int]:
        sizes = {"const": 1, "obj": self.n_obj, "lab": self.n_lab, "word": self.n_word, "pos": 2 * N_FREQ}
        if self.mechanism == "label":   # "box filled" flag, queried label
            sizes.update(flag=1, qlab=self.n_lab)
        elif self.mechanism == "position":  # pointer at the query label, pointer moved to the last token
            sizes.update(ptr=2 * N_FREQ, ptr2=2 * N_FREQ)
        else:  # paper: the object bound at a label (there and at the query label), the pointer, both at the last token
            sizes.update(bound=self.n_obj, ptr=2 * N_FREQ, ptr2=2 * N_FREQ, bound2=self.n_obj)
        return {**sizes, "scratch": SCRATCH}

    def __getitem__(self, name: str) -> slice:
        start = 0
        for key, size in self._sizes().items():
            if key == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    @property
    def size(self) -> int:
        """Width of the logical feature space (the sum of every slice)."""
        return sum(self._sizes().values())


def build_tokenizer():
    """Word-level tokenizer over the prompt vocabulary (lowercased: labels become "a".."z")."""
    return word_level_tokenizer([*WORDS, *OBJECTS, *LABELS])


def _frequencies() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return 0.1 + (math.pi - 0.1) * torch.rand(N_FREQ, generator=gen, dtype=torch.float64)


def position_code(positions: torch.Tensor) -> torch.Tensor:
    """Unit-norm sinusoid code; code(p) . code(q) = mean_k cos(w_k (p - q)), 1 only at p = q."""
    angles = positions.double()[:, None] * _frequencies()[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1) / math.sqrt(N_FREQ)


def _similarities() -> torch.Tensor:
    """code(p) . code(p + d) for every d = 1 .. N_POSITIONS - 1."""
    deltas = torch.arange(1, N_POSITIONS, dtype=torch.float64)
    return (deltas[:, None] * _frequencies()[None]).cos().mean(1)


def position_gap() -> float:
    """1 - the largest similarity between two different positions below N_POSITIONS."""
    return float(1 - _similarities().max())


def _shift(offset: int) -> torch.Tensor:
    """Linear map on position codes: code(p) -> code(p - offset)."""
    w = _frequencies() * offset
    c, s = w.cos(), w.sin()
    out = torch.zeros(2 * N_FREQ, 2 * N_FREQ, dtype=torch.float64)
    k = torch.arange(N_FREQ)
    # cos(a - b) = cos a cos b + sin a sin b ; sin(a - b) = sin a cos b - cos a sin b
    out[k, k], out[k, k + N_FREQ] = c, s
    out[k + N_FREQ, k + N_FREQ], out[k + N_FREQ, k] = c, -s
    return out


class _Head:
    """One head's weights in logical space: q = Wq x + bq, k = Wk x + bk, v = Wv x, out = Wo v."""

    def __init__(self, d_log: int, d_head: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.wq, self.bq, self.wk, self.bk = z(d_head, d_log), z(d_head), z(d_head, d_log), z(d_head)
        self.wv, self.wo = z(d_head, d_log), z(d_log, d_head)


def _token_features(tokenizer, lay: Layout) -> torch.Tensor:
    """Logical embedding of every token: the constant plus a one-hot identity (object, label or other word)."""
    vocab = tokenizer.get_vocab()
    emb = torch.zeros(len(tokenizer), lay.size, dtype=torch.float64)
    emb[:, lay["const"].start] = CONST
    others = [w for w in sorted(vocab, key=vocab.get) if w not in OBJECTS and w.upper() not in LABELS]
    for word, idx in vocab.items():
        if word in OBJECTS:
            emb[idx, lay["obj"].start + OBJECTS.index(word)] = 1
        elif word.upper() in LABELS:
            emb[idx, lay["lab"].start + LABELS.index(word.upper())] = 1
        else:
            emb[idx, lay["word"].start + others.index(word)] = 1
    return emb


def _typical_norm() -> float:
    """Norm of a token's logical vector at the embedding: constant, identity, position code (the constant
    dominates: later writes add at most a few units to CONST**2)."""
    return math.sqrt(CONST**2 + 2)


def _positional(head: _Head, lay: Layout, offset: int) -> None:
    """Attend `offset` tokens back through the position code, POS_MARGIN nats above any other position."""
    scale = POS_MARGIN / position_gap()
    head.wq[: 2 * N_FREQ, lay["pos"]] = scale * _shift(offset)
    head.wk[: 2 * N_FREQ, lay["pos"]] = torch.eye(2 * N_FREQ, dtype=torch.float64)


def _scratch_writer(head: _Head, lay: Layout, gen: torch.Generator, src: str = "ident") -> None:
    """Distractor output: a fixed random projection of the attended token's identity into the scratch dims."""
    cols = [lay["obj"], lay["lab"], lay["word"]] if src == "ident" else [lay["scratch"]]
    n_in = sum(s.stop - s.start for s in cols)
    proj = torch.randn(SCRATCH, n_in, generator=gen, dtype=torch.float64) / math.sqrt(n_in)
    start = 0
    for s in cols:
        width = s.stop - s.start
        head.wv[:SCRATCH, s] = proj[:, start:start + width]
        start += width
    head.wo[lay["scratch"], :SCRATCH] = 0.5 * torch.eye(SCRATCH, dtype=torch.float64)


def _content(head: _Head, lay: Layout, feature: str, nats: float) -> None:
    """Attend to tokens that carry `feature` (any index in its slice), `nats` above the others."""
    head.bq[0] = nats
    head.wk[0, lay[feature]] = 1


def _copy(head: _Head, lay: Layout, src: str, dst: str, gain: float = 1.0) -> None:
    """Value/output: copy the attended token's `src` features into `dst` (same width), times `gain`."""
    width = lay[src].stop - lay[src].start
    head.wv[:width, lay[src]] = torch.eye(width, dtype=torch.float64)
    head.wo[lay[dst], :width] = gain * torch.eye(width, dtype=torch.float64)


def _detect_earlier_label(head: _Head, lay: Layout) -> None:
    """Query/key: attend to the earlier token with the same label identity, the token itself suppressed.

    score = match * label identity - suppress * code(p).code(p'): the token itself scores suppress * gap below
    the earlier occurrence; the identity match outweighs the spread of the position term over other tokens.
    """
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    n_pos = 2 * N_FREQ
    suppress = DETECT_MARGIN / position_gap()
    match = DETECT_MARGIN + suppress * float(1 - _similarities().min())
    head.wq[: lay.n_lab, lay["lab"]] = match * eye(lay.n_lab)
    head.wk[: lay.n_lab, lay["lab"]] = eye(lay.n_lab)
    head.wq[lay.n_lab: lay.n_lab + n_pos, lay["pos"]] = -suppress * eye(n_pos)
    head.wk[lay.n_lab: lay.n_lab + n_pos, lay["pos"]] = eye(n_pos)


def _fetch_by_pointer(head: _Head, lay: Layout, margin: float, prior: float) -> None:
    """Query/key: attend to the object BINDER_OFFSET tokens before the position `ptr2` points at, `margin` nats
    over objects of other segments, plus a fixed per-object preference of std `prior` nats (0: none)."""
    n_pos = 2 * N_FREQ
    sims = _similarities()
    scale = margin / float(1 - sims[SEGMENT_TOKENS - 1::SEGMENT_TOKENS].max())
    head.wq[:n_pos, lay["ptr2"]] = scale * _shift(BINDER_OFFSET)
    head.wk[:n_pos, lay["pos"]] = torch.eye(n_pos, dtype=torch.float64)
    head.bq[n_pos] = OBJECT_BONUS
    head.wk[n_pos, lay["obj"]] = 1
    if prior:
        preference = torch.randn(lay.n_obj, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        head.bq[n_pos + 1] = prior
        head.wk[n_pos + 1, lay["obj"]] = preference


def _label_circuit(heads: dict[Component, _Head], variant: str, lay: Layout) -> None:
    """Binder (label <- its object), query-label mover (last <- query label), fetcher keyed on label identity."""
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    b = heads[BINDER]
    _positional(b, lay, BINDER_OFFSET)
    b.wv[: lay.n_obj, lay["obj"]] = eye(lay.n_obj)
    b.wv[lay.n_obj, lay["obj"]] = 1                         # flag = "an object was found"
    b.wo[lay["obj"], : lay.n_obj] = eye(lay.n_obj)
    b.wo[lay["flag"], lay.n_obj] = 1

    m = heads[MOVER]
    _positional(m, lay, MOVER_OFFSET)
    m.wv[: lay.n_lab, lay["lab"]] = eye(lay.n_lab)
    m.wo[lay["qlab"], : lay.n_lab] = eye(lay.n_lab)

    f = heads[FETCHER]
    f.wq[: lay.n_lab, lay["qlab"]] = FETCH_MARGIN[variant] * eye(lay.n_lab)
    f.wk[: lay.n_lab, lay["lab"]] = eye(lay.n_lab)
    f.bq[lay.n_lab] = FLAG_BONUS
    f.wk[lay.n_lab, lay["flag"]] = 1
    f.bq[lay.n_lab + 1] = LABEL_BONUS
    f.wk[lay.n_lab + 1, lay["lab"]] = 1
    if variant == "weak":
        letter_bias = torch.randn(lay.n_lab, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        f.bq[lay.n_lab + 2] = WEAK_LETTER_BIAS
        f.wk[lay.n_lab + 2, lay["lab"]] = letter_bias
    f.wv[: lay.n_obj, lay["obj"]] = eye(lay.n_obj)
    f.wo[lay["obj"], : lay.n_obj] = eye(lay.n_obj)


def _position_circuit(heads: dict[Component, _Head], lay: Layout) -> None:
    """Prakash et al.'s mechanism: detector (query label <- position of its earlier occurrence), transmitter
    (last <- that pointer), fetcher (last <- the object 4 tokens before the pointed-to label)."""
    d = heads[POSITION_DETECTOR]
    _detect_earlier_label(d, lay)
    _copy(d, lay, "pos", "ptr")

    t = heads[POSITION_TRANSMITTER]
    _positional(t, lay, MOVER_OFFSET)
    _copy(t, lay, "ptr", "ptr2")

    f = heads[FETCHER]
    # Soft on purpose (like the label fetcher): the pointed-to object wins the argmax by FETCH_MARGIN nats over
    # objects in other segments, and a blended pointer still moves the attention, so DCM gets a gradient.
    _fetch_by_pointer(f, lay, FETCH_MARGIN["positional"], prior=0.0)
    _copy(f, lay, "obj", "obj")


def _heads(variant: str, lay: Layout, d_head: int) -> dict[Component, _Head]:
    gen = torch.Generator().manual_seed(1)
    heads = {Component(layer, h): _Head(lay.size, d_head) for layer in range(N_LAYERS) for h in range(N_HEADS)}
    if MECHANISM[variant] == "label":
        _label_circuit(heads, variant, lay)
    else:
        _position_circuit(heads, lay)

    # Distractors: real attention patterns, outputs only in the scratch subspace.
    _positional(heads[Component(0, 0)], lay, 1)              # previous token
    _scratch_writer(heads[Component(0, 0)], lay, gen)
    _scratch_writer(heads[Component(0, 2)], lay, gen)        # uniform attention
    _content(heads[Component(0, 3)], lay, "lab", 6.0)        # attends to labels
    _scratch_writer(heads[Component(0, 3)], lay, gen)
    _positional(heads[Component(1, 0)], lay, 1)
    _scratch_writer(heads[Component(1, 0)], lay, gen, src="scratch")
    _content(heads[Component(1, 1)], lay, "obj", 6.0)        # attends to objects
    _scratch_writer(heads[Component(1, 1)], lay, gen)
    _scratch_writer(heads[Component(1, 3)], lay, gen)
    _positional(heads[Component(2, 0)], lay, 3)
    _scratch_writer(heads[Component(2, 0)], lay, gen)
    _content(heads[Component(2, 1)], lay, "obj", 6.0)
    _scratch_writer(heads[Component(2, 1)], lay, gen)
    _scratch_writer(heads[Component(2, 2)], lay, gen, src="scratch")
    return heads


def _paper_circuit(heads: dict[Component, _Head], variant: str, lay: Layout) -> None:
    """Groups D -> C -> B -> A of Prakash et al. Two routes run through them side by side:

    - the pointer: C's pointer head copies the position code of prev_query_label, B's moves it to the last token,
      A's pointer head fetches the object 4 tokens before the pointed-to label (the paper's mechanism);
    - the bound object: D's heads write the object of each box into its label's stream (half each), C's and B's
      bound heads carry it on, and A's bound head attends to the context object with that identity (or, if none
      matches, to plain words, which write nothing). It checks the pointer: both vote for the same object, the
      pointer with FETCH_SHARE[0] > FETCH_SHARE[1], so a moved pointer outvotes the original's bound object.

    Only the pointer head of A differs between paper-base (blunt, a strong per-object preference) and paper-ft.
    """
    for reader in STRUCTURE_READERS:
        _positional(heads[reader], lay, BINDER_OFFSET)
        _copy(heads[reader], lay, "obj", "bound", 0.5)
    for head, (src, dst) in ((POINTER_DETECTOR, ("pos", "ptr")), (BOUND_DETECTOR, ("bound", "bound"))):
        _detect_earlier_label(heads[head], lay)
        _copy(heads[head], lay, src, dst)
    for head, (src, dst) in ((POINTER_TRANSMITTER, ("ptr", "ptr2")), (BOUND_TRANSMITTER, ("bound", "bound2"))):
        _positional(heads[head], lay, MOVER_OFFSET)
        _copy(heads[head], lay, src, dst)

    a = heads[VALUE_FETCHER]
    _fetch_by_pointer(a, lay, POINTER_MARGIN[variant], OBJECT_PRIOR[variant])
    _copy(a, lay, "obj", "obj", FETCH_SHARE[0])
    b = heads[BOUND_FETCHER]
    b.wq[: lay.n_obj, lay["bound2"]] = BOUND_MATCH * torch.eye(lay.n_obj, dtype=torch.float64)
    b.wk[: lay.n_obj, lay["obj"]] = torch.eye(lay.n_obj, dtype=torch.float64)
    b.bq[lay.n_obj] = SINK
    b.wk[lay.n_obj, lay["word"]] = 1
    _copy(b, lay, "obj", "obj", FETCH_SHARE[1])


def _paper_heads(variant: str, lay: Layout, d_head: int) -> dict[Component, _Head]:
    n_layers, n_heads, _ = PAIR_SIZES
    gen = torch.Generator().manual_seed(1)
    heads = {Component(layer, h): _Head(lay.size, d_head) for layer in range(n_layers) for h in range(n_heads)}
    _paper_circuit(heads, variant, lay)
    # Distractors: real attention, outputs only in the scratch subspace. Two are decoys that attend exactly like a
    # circuit head (L1H1 like the detectors, L3H1 like the pointer fetcher) and do nothing the answer depends on.
    _positional(heads[Component(0, 0)], lay, 1)              # previous token
    _scratch_writer(heads[Component(0, 0)], lay, gen)
    _content(heads[Component(0, 3)], lay, "lab", 6.0)        # attends to labels
    _scratch_writer(heads[Component(0, 3)], lay, gen)
    _detect_earlier_label(heads[Component(1, 1)], lay)       # decoy detector
    _scratch_writer(heads[Component(1, 1)], lay, gen)
    _scratch_writer(heads[Component(1, 2)], lay, gen, src="scratch")   # uniform attention
    _content(heads[Component(2, 0)], lay, "obj", 6.0)        # attends to objects
    _scratch_writer(heads[Component(2, 0)], lay, gen)
    _positional(heads[Component(2, 2)], lay, 3)              # three tokens back
    _scratch_writer(heads[Component(2, 2)], lay, gen)
    _fetch_by_pointer(heads[Component(3, 1)], lay, POINTER_MARGIN["paper-ft"], 0.0)  # decoy value fetcher
    _scratch_writer(heads[Component(3, 1)], lay, gen)
    _content(heads[Component(3, 3)], lay, "lab", 6.0)
    _scratch_writer(heads[Component(3, 3)], lay, gen, src="scratch")
    return heads


def _embedding_matrix(lay: Layout, d: int = D_MODEL) -> torch.Tensor:
    """E: logical -> residual, orthonormal columns orthogonal to the all-ones vector (so every vector has zero mean).

    A Householder reflection that sends the last residual axis to (1, ..., 1)/sqrt(d): feature i lives on axis i
    minus a small common offset.
    """
    a = torch.full((d,), d**-0.5, dtype=torch.float64)
    v = torch.zeros(d, dtype=torch.float64)
    v[-1] = 1
    v = (v - a) / (v - a).norm()
    reflect = torch.eye(d, dtype=torch.float64) - 2 * torch.outer(v, v)
    return reflect[:, : lay.size]


def _check_variant(variant: str) -> None:
    if variant not in ALL_VARIANTS:
        raise ValueError(f"unknown planted variant {variant!r}: use one of {', '.join(ALL_VARIANTS)}")


def sizes(variant: str) -> tuple[int, int, int]:
    """(layers, heads, d_model) of a planted variant."""
    _check_variant(variant)
    return PAIR_SIZES if variant in PAIR else (N_LAYERS, N_HEADS, D_MODEL)


def model_config(variant: str = "strong", tokenizer=None) -> GPT2Config:
    """The GPT-2 config of a planted variant (sizes, vocabulary, special tokens): no weights are built."""
    n_layers, n_heads, d_model = sizes(variant)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    vocab = tokenizer.get_vocab()
    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
        n_inner=4, activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-9, scale_attn_weights=False, tie_word_embeddings=False,
        pad_token_id=vocab[SPECIAL_TOKENS["pad_token"]], bos_token_id=vocab[SPECIAL_TOKENS["bos_token"]],
        eos_token_id=vocab[SPECIAL_TOKENS["eos_token"]], name_or_path=f"planted:{variant}",
    )


def build(variant: str = "strong") -> tuple[GPT2LMHeadModel, object]:
    """The planted model for `variant` (see ALL_VARIANTS) and its tokenizer; deterministic, no training."""
    n_layers, n_heads, d_model = sizes(variant)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    lay = Layout(len(OBJECTS), len(LABELS), len(tokenizer) - len(OBJECTS) - len(LABELS), MECHANISM[variant])
    if lay.size >= d_model:
        raise AssertionError(f"logical space {lay.size} does not fit in d_model {d_model}")
    d_head = d_model // n_heads
    config = model_config(variant, tokenizer)
    model = GPT2LMHeadModel(config)
    e = _embedding_matrix(lay, d_model)
    # LayerNorm(E x) = E x * typical / |x| ~ E x: reads see the logical vector at its own scale, so weights are
    # in nats and stay small (float16-safe).
    ln_gain = _typical_norm() / d_model**0.5

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32)

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        tr.wte.weight.copy_(f32(_token_features(tokenizer, lay) @ e.T))
        pos = torch.zeros(N_POSITIONS, lay.size, dtype=torch.float64)
        pos[:, lay["pos"]] = position_code(torch.arange(N_POSITIONS))
        tr.wpe.weight.copy_(f32(pos @ e.T))
        heads = _paper_heads(variant, lay, d_head) if variant in PAIR else _heads(variant, lay, d_head)
        for layer, block in enumerate(tr.h):
            block.ln_1.weight.fill_(ln_gain)
            block.ln_2.weight.fill_(ln_gain)
            for h in range(n_heads):
                head, cols = heads[Component(layer, h)], slice(h * d_head, (h + 1) * d_head)
                for i, (w, bias) in enumerate([(head.wq, head.bq), (head.wk, head.bk), (head.wv, None)]):
                    out = slice(i * d_model + cols.start, i * d_model + cols.stop)
                    block.attn.c_attn.weight[:, out] = f32(e @ w.T)  # Conv1D stores (in, out)
                    if bias is not None:
                        block.attn.c_attn.bias[out] = f32(bias)
                block.attn.c_proj.weight[cols, :] = f32((e @ head.wo).T)
        tr.ln_f.weight.fill_(ln_gain)
        unembed = torch.zeros(len(tokenizer), lay.size, dtype=torch.float64)
        for i, obj in enumerate(OBJECTS):
            unembed[vocab[obj], lay["obj"].start + i] = LOGIT_NATS
        model.lm_head.weight.copy_(f32(unembed @ e.T))
    if model.lm_head.weight.data_ptr() == tr.wte.weight.data_ptr():
        raise AssertionError("lm_head is tied to the embedding; the construction needs them separate")
    return model.eval().requires_grad_(False), tokenizer


def _label_truth(variant: str) -> tuple[list[dict], dict]:
    circuit = [
        {"component": str(BINDER), "role": "object binder", "position": "label_i",
         "attends_to": f"object_i ({BINDER_OFFSET} tokens back)",
         "writes": "the object's identity and a 'box filled' flag into the label's stream"},
        {"component": str(MOVER), "role": "query-label mover", "position": "last",
         "attends_to": f"query_label ({MOVER_OFFSET} tokens back)",
         "writes": "the query label's identity into the last token's 'queried label' subspace"},
        {"component": str(FETCHER), "role": "value fetcher", "position": "last",
         "attends_to": "prev_query_label (the filled label matching the queried label)",
         "writes": "the object bound at that label, read by the unembedding"
                   + (" (blunted match plus a fixed per-letter preference)" if variant == "weak" else "")},
    ]
    patching = {
        "object": {"last": [str(FETCHER)], "prev_query_label": [str(BINDER)], "query_label": []},
        "label": {"last": [str(MOVER)], "prev_query_label": [], "query_label": []},
        "position": {"last": [], "prev_query_label": [], "query_label": []},
    }
    return circuit, patching


def _position_truth() -> tuple[list[dict], dict]:
    circuit = [
        {"component": str(POSITION_DETECTOR), "role": "position detector", "position": "query_label",
         "attends_to": "prev_query_label (the earlier occurrence of the same label)",
         "writes": "that token's position code (a pointer) into the query label's stream"},
        {"component": str(POSITION_TRANSMITTER), "role": "position transmitter", "position": "last",
         "attends_to": f"query_label ({MOVER_OFFSET} tokens back)",
         "writes": "the pointer into the last token's stream"},
        {"component": str(FETCHER), "role": "value fetcher", "position": "last",
         "attends_to": f"correct_object (the object {BINDER_OFFSET} tokens before the pointed-to label)",
         "writes": "that object's identity, read by the unembedding"},
    ]
    patching = {
        "object": {"last": [str(FETCHER)], "prev_query_label": [], "query_label": []},
        "label": {"last": [], "prev_query_label": [], "query_label": []},
        "position": {"last": [str(POSITION_TRANSMITTER)], "prev_query_label": [],
                     "query_label": [str(POSITION_DETECTOR)]},
    }
    return circuit, patching


def _paper_truth(variant: str) -> dict:
    """The pair's circuit, single-head patching table and per-group DCM expectations (see ground_truth)."""
    a_share, b_share = FETCH_SHARE
    blunt = (f"; blunt in paper-base: {POINTER_MARGIN['paper-base']:g} nats over other objects against a fixed "
             f"per-object preference of std {OBJECT_PRIOR['paper-base']:g} nats (paper-ft: "
             f"{POINTER_MARGIN['paper-ft']:g} against {OBJECT_PRIOR['paper-ft']:g})")
    entries = [
        (VALUE_FETCHER, "value fetcher (by pointer)", "correct_object",
         "the pointer L2H1 moved, shifted 4 tokens back (Q-composition with B)" + blunt,
         f"the object's identity ({a_share:g} of the answer logit), read by the unembedding"),
        (BOUND_FETCHER, "value fetcher (by bound object)", "correct_object",
         "identity match with the bound object L2H3 moved (Q-composition with B); with no match it rests on plain "
         "words, which write nothing",
         f"the object's identity ({b_share:g} of the answer logit), read by the unembedding"),
        (POINTER_TRANSMITTER, "position transmitter (pointer)", "query_label", f"{MOVER_OFFSET} tokens back",
         "the pointer at the query label into the last token (V-composition with C)"),
        (BOUND_TRANSMITTER, "bound-object transmitter", "query_label", f"{MOVER_OFFSET} tokens back",
         "the bound object at the query label into the last token (V-composition with C)"),
        (POINTER_DETECTOR, "position detector (pointer)", "prev_query_label",
         "the earlier token with the same label identity (itself suppressed)",
         "that token's position code (the pointer) into the query label's stream"),
        (BOUND_DETECTOR, "bound-object detector", "prev_query_label",
         "the earlier token with the same label identity (itself suppressed)",
         "the object Group D bound to that label (V-composition with D) into the query label's stream"),
    ] + [(reader, "structure reader", "correct_object",
          f"{BINDER_OFFSET} tokens back, at every box label (only prev_query_label is read downstream)",
          "half of its box's object identity into the label's 'bound object' subspace") for reader in STRUCTURE_READERS]
    group_of = {c: g for g, heads in GROUPS.items() for c in heads}
    circuit = [{"component": str(c), "role": role, "group": group_of[c], "position": GROUP_POSITION[group_of[c]],
                "attends_to": key, "attends_by": how, "writes": writes}
               for c, role, key, how, writes in entries]
    patching = {
        "object": {"last": [str(VALUE_FETCHER)], "prev_query_label": [], "query_label": []},
        "label": {"last": [], "prev_query_label": [], "query_label": []},
        "position": {"last": [str(POINTER_TRANSMITTER)], "prev_query_label": [],
                     "query_label": [str(POINTER_DETECTOR)]},
    }
    none = {"object": [], "label": [], "position": []}
    dcm = {"Value Fetcher": {**none, "object": [str(VALUE_FETCHER), str(BOUND_FETCHER)]},
           "Position Transmitter": {**none, "position": [str(POINTER_TRANSMITTER)]},
           "Position Detector": {**none, "position": [str(POINTER_DETECTOR)]},
           "Structure Reader": dict(none)}
    return {"circuit": circuit, "patching": patching, "dcm": dcm,
            "groups": {g: {"heads": [str(c) for c in heads], "position": GROUP_POSITION[g]}
                       for g, heads in GROUPS.items()},
            "fine_tune": {"base": "planted:paper-base", "fine_tuned": "planted:paper-ft",
                          "changed": [str(VALUE_FETCHER)], "group": "Value Fetcher"}}


def ground_truth(variant: str = "strong") -> dict:
    """Which head does what, where, and which desideratum (object / label / position) it answers to.

    `patching[desideratum][position]` lists the heads whose activation patching *alone* at that token position
    moves the output to the desideratum's target (as lib.data_gen.entity_triples builds them: the original answer
    and the three targets are four different objects); every other (component, position) leaves it. MLPs do
    nothing. `desiderata` is the same for the last token only (the sites DCM masks in the papers' setting).

    strong / weak fetch by label identity: no head answers to position, and a method that reports positional heads
    there is wrong. positional fetches by position, like Llama-7B in Prakash et al. (Groups A, B, C): no head
    answers to label there.

    paper-base / paper-ft (PAIR) have Prakash et al.'s four groups, two heads each; every circuit entry also has
    its "group" (the paper's name) and "attends_by". Extra keys: `groups` ({group: {"heads", "position"}}),
    `dcm` ({group: {desideratum: heads}}: the group's heads at the group's position whose patching raises the
    desideratum's target logit, i.e. what DCM restricted to that group should patch), and `fine_tune` (the one
    head paper-ft changes).
    """
    n_layers, n_heads, _ = sizes(variant)
    extra: dict = {}
    if variant in PAIR:
        extra = _paper_truth(variant)
        circuit, patching = extra.pop("circuit"), extra.pop("patching")
    elif MECHANISM[variant] == "label":
        circuit, patching = _label_truth(variant)
    else:
        circuit, patching = _position_truth()
    named = {entry["component"] for entry in circuit}
    return {
        "name": f"planted:{variant}",
        "architecture": "gpt2",
        "mechanism": MECHANISM[variant],
        "n_layers": n_layers,
        "n_heads": n_heads,
        "circuit": circuit,
        "desiderata": {name: table["last"] for name, table in patching.items()},  # keys: data_gen.ENTITY_DESIDERATA
        "patching": patching,
        "distractors": [str(Component(layer, h)) for layer in range(n_layers) for h in range(n_heads)
                        if str(Component(layer, h)) not in named],
        "mlps": "all zero",
        **extra,
    }
