"""Hand-weighted GPT-2 models that solve entity tracking through a known circuit: ground truth for every method.

On a real model nobody knows which heads a circuit-discovery method *should* find. These models are built, not
trained: every weight is set by `build` from the construction below, so the answer is known and written down
by `ground_truth`. Prompts are the paper's format ("The apple is in Box F, ... Box F contains the" -> " apple").
docs/PLANTED.md has the measured accuracies and tables.

3 layers x 4 heads, MLPs zero; the nine heads outside the circuit are distractors writing to a scratch subspace.
"strong" and "weak" fetch by label identity:

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

VARIANTS = ("strong", "weak", "positional")
MECHANISM = {"strong": "label", "weak": "label", "positional": "position"}  # what the fetch is keyed on
N_LAYERS, N_HEADS, D_MODEL = 3, 4, 192
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
        else:                           # pointer at the query label, pointer moved to the last token
            sizes.update(ptr=2 * N_FREQ, ptr2=2 * N_FREQ)
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
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    n_pos = 2 * N_FREQ
    sims = _similarities()
    d = heads[POSITION_DETECTOR]
    # score = match * label identity - suppress * code(p).code(p'): the token itself scores suppress * gap below
    # the earlier occurrence; the identity match outweighs the spread of the position term over other tokens.
    suppress = DETECT_MARGIN / position_gap()
    match = DETECT_MARGIN + suppress * float(1 - sims.min())
    d.wq[: lay.n_lab, lay["lab"]] = match * eye(lay.n_lab)
    d.wk[: lay.n_lab, lay["lab"]] = eye(lay.n_lab)
    d.wq[lay.n_lab: lay.n_lab + n_pos, lay["pos"]] = -suppress * eye(n_pos)
    d.wk[lay.n_lab: lay.n_lab + n_pos, lay["pos"]] = eye(n_pos)
    d.wv[:n_pos, lay["pos"]] = eye(n_pos)
    d.wo[lay["ptr"], :n_pos] = eye(n_pos)

    t = heads[POSITION_TRANSMITTER]
    _positional(t, lay, MOVER_OFFSET)
    t.wv[:n_pos, lay["ptr"]] = eye(n_pos)
    t.wo[lay["ptr2"], :n_pos] = eye(n_pos)

    f = heads[FETCHER]
    # Soft on purpose (like the label fetcher): the pointed-to object wins the argmax by FETCH_MARGIN nats over
    # objects in other segments, and a blended pointer still moves the attention, so DCM gets a gradient.
    scale = FETCH_MARGIN["positional"] / float(1 - sims[SEGMENT_TOKENS - 1::SEGMENT_TOKENS].max())
    f.wq[:n_pos, lay["ptr2"]] = scale * _shift(BINDER_OFFSET)  # pointer to the label -> its object
    f.wk[:n_pos, lay["pos"]] = eye(n_pos)
    f.bq[n_pos] = OBJECT_BONUS
    f.wk[n_pos, lay["obj"]] = 1
    f.wv[: lay.n_obj, lay["obj"]] = eye(lay.n_obj)
    f.wo[lay["obj"], : lay.n_obj] = eye(lay.n_obj)


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


def _embedding_matrix(lay: Layout) -> torch.Tensor:
    """E: logical -> residual, orthonormal columns orthogonal to the all-ones vector (so every vector has zero mean).

    A Householder reflection that sends the last residual axis to (1, ..., 1)/sqrt(d): feature i lives on axis i
    minus a small common offset.
    """
    d = D_MODEL
    a = torch.full((d,), d**-0.5, dtype=torch.float64)
    v = torch.zeros(d, dtype=torch.float64)
    v[-1] = 1
    v = (v - a) / (v - a).norm()
    reflect = torch.eye(d, dtype=torch.float64) - 2 * torch.outer(v, v)
    return reflect[:, : lay.size]


def build(variant: str = "strong") -> tuple[GPT2LMHeadModel, object]:
    """The planted model for `variant` (see VARIANTS) and its tokenizer; deterministic, no training."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown planted variant {variant!r}: use one of {', '.join(VARIANTS)}")
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    lay = Layout(len(OBJECTS), len(LABELS), len(tokenizer) - len(OBJECTS) - len(LABELS), MECHANISM[variant])
    if lay.size >= D_MODEL:
        raise AssertionError(f"logical space {lay.size} does not fit in d_model {D_MODEL}")
    d_head = D_MODEL // N_HEADS
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
        n_inner=4, activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-9, scale_attn_weights=False, tie_word_embeddings=False,
        pad_token_id=vocab[SPECIAL_TOKENS["pad_token"]], bos_token_id=vocab[SPECIAL_TOKENS["bos_token"]],
        eos_token_id=vocab[SPECIAL_TOKENS["eos_token"]], name_or_path=f"planted:{variant}",
    )
    model = GPT2LMHeadModel(config)
    e = _embedding_matrix(lay)
    # LayerNorm(E x) = E x * typical / |x| ~ E x: reads see the logical vector at its own scale, so weights are
    # in nats and stay small (float16-safe).
    ln_gain = _typical_norm() / D_MODEL**0.5

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
        heads = _heads(variant, lay, d_head)
        for layer, block in enumerate(tr.h):
            block.ln_1.weight.fill_(ln_gain)
            block.ln_2.weight.fill_(ln_gain)
            for h in range(N_HEADS):
                head, cols = heads[Component(layer, h)], slice(h * d_head, (h + 1) * d_head)
                for i, (w, bias) in enumerate([(head.wq, head.bq), (head.wk, head.bk), (head.wv, None)]):
                    out = slice(i * D_MODEL + cols.start, i * D_MODEL + cols.stop)
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


def ground_truth(variant: str = "strong") -> dict:
    """Which head does what, where, and which desideratum (object / label / position) it answers to.

    `patching[desideratum][position]` lists the heads whose activation patching *alone* at that token position
    moves the output to the desideratum's target (as lib.data_gen.entity_triples builds them: the original answer
    and the three targets are four different objects); every other (component, position) leaves it. MLPs do
    nothing. `desiderata` is the same for the last token only (the sites DCM masks in the papers' setting).

    strong / weak fetch by label identity: no head answers to position, and a method that reports positional heads
    there is wrong. positional fetches by position, like Llama-7B in Prakash et al. (Groups A, B, C): no head
    answers to label there.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown planted variant {variant!r}: use one of {', '.join(VARIANTS)}")
    circuit, patching = _label_truth(variant) if MECHANISM[variant] == "label" else _position_truth()
    return {
        "name": f"planted:{variant}",
        "architecture": "gpt2",
        "mechanism": MECHANISM[variant],
        "n_layers": N_LAYERS,
        "n_heads": N_HEADS,
        "circuit": circuit,
        "desiderata": {name: table["last"] for name, table in patching.items()},  # keys: data_gen.ENTITY_DESIDERATA
        "patching": patching,
        "distractors": [str(Component(layer, h)) for layer in range(N_LAYERS) for h in range(N_HEADS)
                        if Component(layer, h) not in (BINDER, MOVER, FETCHER)],
        "mlps": "all zero",
    }
