"""Path patching (Prakash et al. 2024, after Wang et al. 2023): which head at which token feeds a receiver, and
through which of the receiver's inputs (its output, its query, key or value).

A node is a head at a token position (a `Site`). The noise prompt of each original (lib.data_gen: random
prompts, `entity_noise_triples`, or the authors' absent-query-label noise, `path_patching_noise`) has the same
template and token length, so token index t plays the same role in both; a sender's noise value is its output on
the noise prompt **at the original's token index**.

Exactly what is computed for one sender s = (head, position p), all on the original prompt (a head's output is
its slice of the attention output projection's input; MLPs always recompute):

- run A: s's output at p replaced by its noise value, and every other head of the layers after s's layer frozen
  to its clean output at every token from p on (earlier layers, s's own layer and earlier tokens cannot see s,
  so freezing them would change nothing). The change reaches the rest only through the residual stream and the
  MLPs: the direct paths of s.
- receivers = None (the logits): the score is read from run A's logits.
- receivers R with `receiver_input="out"` (their outputs): in run A the receiver sites are left free and their
  outputs are recorded; run B is a clean forward with only R's outputs replaced by the recorded ones, so the
  change reaches the logits only through R.
- `receiver_input` "q", "k" or "v": run A freezes every head but s (the receivers' outputs too) and records the
  receivers' query / key / value inputs (the projection outputs, lib.core.architectures) at the receivers'
  positions; run B writes only those. A receiver Site names the token whose input is patched: for "q" the
  receiver's own position (where it queries), for "k"/"v" the token it reads (the authors' step C patches the
  Position Transmitters' V at the query label). Under grouped-query attention a k/v receiver's vector is its
  key/value head's, shared by the query heads of its group (see lib.core.architectures).

Score = mean over examples of (p_patch - p_org) / p_org, p = the softmax probability of the original's answer;
the most negative senders matter most. Use originals the model answers correctly (lib.evaluation.filter_correct
with require_alternate=False): a wrong original's tiny p_org makes the ratio explode.

Speed: a run A (and B) serves `senders_per_pass` senders at once. "stack" (the default) repeats the batch once per
sender along the batch dimension and builds every sender's freeze and noise as one masked write per layer;
"invokes" gives each sender its own nnsight invoke in one trace. With `reuse_prefix` (the default, stack only) a
pass computes only the tokens from its earliest sender / receiver on: no sender changes an earlier token, so
their keys and values come from the clean run's cache (`_PrefixLayer`). All give the one-sender-per-pass scores
(`senders_per_pass=1, reuse_prefix=False`) to float precision; bench/path_patching.py measures them (on the CPU
the speed-up comes from the prefix reuse; stacking alone is memory-bound there). `noise_runs` lets several calls
on one batch share the clean and noise reads (discover_circuit does). Named positions are per example
(prev_query_label follows the query), so no grouping of examples by position is needed. Remotely, every run of a
batch travels in one request (ModelHandle.in_one_request).

Differences from the authors' code (Nix07/finetuning, path_patching/path_patching.py): their score is assigned
inside the loop over examples (the last example's value, not the mean); we average as the paper defines. Their
runs freeze every head at the tokens from the sender's to the last; we freeze the same heads (earlier layers and
the sender's layer are no-ops, as above).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, get_args

import nnsight
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lib.core.handle import ModelHandle
from lib.patching import check_sites, last_logits
from lib.types import Component, EncodedPrompts, PairBatch, Site

log = logging.getLogger(__name__)

HeadInput = Literal["out", "q", "k", "v"]
"""Which input of a receiver head a path must reach: "out" its output (as a sender would be read), "q" / "k" / "v"
its query, key or value input (the projection outputs, before rotary embeddings)."""
HEAD_INPUTS: tuple[str, ...] = get_args(HeadInput)

Batching = Literal["stack", "invokes"]
"""How one forward pass serves several senders: "stack" repeats the batch per sender along the batch dimension
(one masked write per layer); "invokes" gives each sender its own nnsight invoke of one trace."""
BATCHINGS: tuple[str, ...] = get_args(Batching)

DEFAULT_POSITIONS = ("last", "query_label", "prev_query_label", "correct_object")
SENDERS_PER_PASS = 16


def candidate_senders(handle: ModelHandle, positions: Sequence[str] = DEFAULT_POSITIONS,
                      receivers: Sequence[Site] | None = None) -> list[Site]:
    """Every head at each position; with receivers, only heads in layers below the last receiver's, minus R."""
    top = handle.arch.n_layers if not receivers else max(r.component.layer for r in receivers)
    skip = set(receivers or ())
    return [s for layer in range(top) for h in range(handle.arch.n_heads) for p in positions
            if (s := Site(Component(layer, h), p)) not in skip]


def top_senders(scores: dict[Site, float], k: int) -> list[tuple[Site, float]]:
    """The k most negative paths."""
    return sorted(scores.items(), key=lambda item: item[1])[:k]


# ---- the runs -----------------------------------------------------------------------------------------------


class _PrefixLayer(DynamicLayer):
    """A key/value cache layer holding `copies` stacked copies of the clean prefix in one buffer of the full prompt
    width; `update` writes the pass's own tokens after it. (transformers' DynamicLayer concatenates instead: two
    more copies of every copy's keys and values per pass, which on a small model cost more than the pass.)"""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, copies: int, width: int):
        DynamicLayer.__init__(self)   # not super(): NDIF rebuilds this class from source, without a __class__ cell
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.filled = keys.shape[-2]
        self.keys, self.values = (self._buffer(t, copies, width) for t in (keys, values))

    def _buffer(self, prefix: torch.Tensor, copies: int, width: int) -> torch.Tensor:
        b, h, p, d = prefix.shape
        out = prefix.new_empty(copies, b, h, width, d)
        out[..., :p, :] = prefix   # broadcast over the copies: one write
        return out.reshape(copies * b, h, width, d)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.filled + key_states.shape[-2]
        self.keys[..., self.filled:end, :] = key_states
        self.values[..., self.filled:end, :] = value_states
        self.filled = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def get_seq_length(self) -> int:
        return self.filled


class _Window:
    """What one pass computes: tokens [start, T) of `copies` stacked copies of a batch (copy s = rows s*N ..
    (s+1)*N - 1). The tokens before `start` are those no sender of the pass can change (causal attention): their
    keys and values come from the clean run's cache instead of being recomputed."""

    def __init__(self, prompts: EncodedPrompts, start: int, copies: int, cache: list | None):
        self.prompts = prompts
        self.start = start
        self.copies = copies
        self.cache = cache
        self.n = prompts.size

    def position(self, name: str) -> torch.Tensor:
        """(N,) the named token's index inside the window."""
        return self.prompts.positions[name] - self.start

    def inputs(self, config) -> dict:
        ids = self.prompts.input_ids.repeat(self.copies, 1)
        mask = self.prompts.attention_mask.repeat(self.copies, 1)
        if not self.start:
            return {"input_ids": ids, "attention_mask": mask}
        cache = DynamicCache(config=config)
        width = self.prompts.width
        for i, (k, v) in enumerate(self.cache):
            k, v = k[:, :, :self.start], v[:, :, :self.start]
            if type(cache.layers[i]) is DynamicLayer:   # full attention: the one-buffer layer
                cache.layers[i] = _PrefixLayer(k, v, self.copies, width)
            else:                                      # sliding window and others: transformers' own layer
                cache.layers[i].update(k.repeat(self.copies, 1, 1, 1), v.repeat(self.copies, 1, 1, 1))
        return {"input_ids": ids[:, self.start:], "attention_mask": mask,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, self.start:], "past_key_values": cache}


class _Senders:
    """One pass's senders as tensors: layer (S,), head (S,), token index inside the window per example (S, N)."""

    def __init__(self, layer: torch.Tensor, head: torch.Tensor, position: torch.Tensor):
        self.layer = layer
        self.head = head
        self.position = position

    @property
    def size(self) -> int:
        return int(self.layer.shape[0])

    def select(self, i: int) -> _Senders:
        return _Senders(self.layer[i:i + 1], self.head[i:i + 1], self.position[i:i + 1])


def _senders(senders: Sequence[Site], window: _Window) -> _Senders:
    return _Senders(torch.tensor([s.component.layer for s in senders]),
                    torch.tensor([s.component.head for s in senders]),
                    torch.stack([window.position(s.position) for s in senders]))


def _freeze_and_noise(arch, x, layer: int, senders: _Senders, clean, noise, free: Sequence[Site], window: _Window):
    """Head outputs of one layer for S stacked copies of the batch: in copy s, every head of a layer after s's is
    its clean output from s's token on (except the free sites), and s itself is its noise output at its token.

    x: (S*N, W, H*D) the layer's computed head outputs in the window; clean, noise: (N, W, H*D). Returns the new
    (S*N, W, H*D).
    """
    n_heads, d = arch.n_heads, arch.head_dim
    s_count, n, t = senders.size, window.n, x.shape[1]
    dev = x.device
    x5 = x.reshape(s_count, n, t, n_heads, d)
    clean5 = clean.to(dev, x.dtype).reshape(1, n, t, n_heads, d)
    pos = senders.position.to(dev)
    later = senders.layer.to(dev) < layer                                                            # (S,)
    frozen = (torch.arange(t, device=dev)[None, None, :] >= pos[:, :, None]) & later[:, None, None]  # (S, N, W)
    frozen = frozen[..., None].expand(s_count, n, t, n_heads)
    examples = torch.arange(n, device=dev)
    mine = [r for r in free if r.component.layer == layer]
    if mine:
        frozen = frozen.clone()
        for r in mine:
            frozen[:, examples, window.position(r.position).to(dev), r.component.head] = False
    new = torch.where(frozen[..., None], clean5, x5)
    here = (senders.layer == layer).nonzero().flatten().tolist()
    if here:
        noise5 = noise.to(dev, x.dtype).reshape(n, t, n_heads, d)
        for i in here:
            p, h = pos[i], int(senders.head[i])
            new[i, examples, p, h] = noise5[examples, p, h]
    return new.reshape(s_count * n, t, n_heads * d)


def _receiver_columns(arch, receiver: Site, kind: str) -> slice:
    if kind == "out":
        return arch.head_slice(receiver.component.head)
    return arch.qkv_slice(kind, receiver.component.head)


def _read_receivers(arch, value, receivers: Sequence[Site], kind: str, window: _Window) -> list:
    """Each receiver's columns at its token, for every row of the window's copies: [(copies*N, D)]."""
    rows = torch.arange(window.copies * window.n, device=value.device)
    out = []
    for r in receivers:
        pos = window.position(r.position).repeat(window.copies).to(value.device)
        out.append(value[rows, pos][:, _receiver_columns(arch, r, kind)])
    return out


def _write_receivers(arch, value, receivers: Sequence[Site], kind: str, window: _Window, recorded: Sequence):
    """`value` with each receiver's columns at its token replaced by the recorded ones (a new tensor)."""
    new = value.clone()
    rows = torch.arange(window.copies * window.n, device=value.device)
    for r, rec in zip(receivers, recorded):
        pos = window.position(r.position).repeat(window.copies).to(value.device)
        new[rows, pos, _receiver_columns(arch, r, kind)] = rec.to(value.device, value.dtype)
    return new


def _by_layer(receivers: Sequence[Site]) -> dict[int, list[Site]]:
    layers: dict[int, list[Site]] = {}
    for r in receivers:
        layers.setdefault(r.component.layer, []).append(r)
    return dict(sorted(layers.items()))


def _intervene_a(handle: ModelHandle, window: _Window, senders: _Senders, receivers: Sequence[Site], kind: str,
                 clean: list, noise: list) -> list | torch.Tensor:
    """Trace-body of run A: logits (receivers None) or the receivers' values (in the order of `_by_layer`)."""
    arch = handle.arch
    recv = _by_layer(receivers)
    top = arch.n_layers - 1 if not receivers else max(recv)
    free = receivers if kind == "out" else []
    recorded = []
    first = min([int(senders.layer.min()), *recv])   # receivers below every sender are read too (clean values)
    for layer in range(first, top + 1):
        here = recv.get(layer, [])
        if here and kind != "out":   # q / k / v are computed before the layer's head outputs
            recorded += _read_receivers(arch, arch.qkv_module(handle.model, layer, kind).output, here, kind, window)
        if receivers and layer == top and kind != "out":
            break   # the top layer's head outputs cannot reach its own q / k / v
        module = arch.attn_out(handle.model, layer)
        x = module.input
        if here and kind == "out":
            recorded += _read_receivers(arch, x, here, kind, window)
        if not receivers or layer < top:
            cols = slice(window.start, None)
            module.input = _freeze_and_noise(arch, x, layer, senders, clean[layer][:, cols], noise[layer][:, cols],
                                             free, window)
    return recorded if receivers else last_logits(handle)


def _intervene_b(handle: ModelHandle, window: _Window, receivers: Sequence[Site], kind: str, recorded: Sequence):
    """Trace-body of run B: a clean run with only the receivers' inputs written; last-position logits."""
    arch = handle.arch
    i = 0
    for layer, here in _by_layer(receivers).items():
        vals = recorded[i:i + len(here)]
        i += len(here)
        if kind == "out":
            module = arch.attn_out(handle.model, layer)
            module.input = _write_receivers(arch, module.input, here, kind, window, vals)
        else:
            module = arch.qkv_module(handle.model, layer, kind)
            module.output = _write_receivers(arch, module.output, here, kind, window, vals)
    return last_logits(handle)


def _start(prompts: EncodedPrompts, names: Sequence[str], cache: list | None) -> int:
    """The first token a pass must compute: the earliest named token of any example (0 without a cache)."""
    if cache is None:
        return 0
    return int(min(int(prompts.positions[name].min()) for name in names))


def _pass_logits(handle: ModelHandle, prompts: EncodedPrompts, chunk: Sequence[Site], receivers: Sequence[Site],
                 kind: str, clean: list, noise: list, cache: list | None, batching: str) -> torch.Tensor:
    """Last-position logits (S*N, vocab) of the patched runs of S senders (copy s = rows s*N .. (s+1)*N - 1)."""
    config = handle.lm.config
    names = [s.position for s in chunk] + [r.position for r in receivers]
    window = _Window(prompts, _start(prompts, names, cache), len(chunk), cache)
    senders = _senders(chunk, window)
    with torch.no_grad():
        if batching == "stack":
            with handle.trace(**window.inputs(config)) as tracer:
                out = nnsight.save(_intervene_a(handle, window, senders, receivers, kind, clean, noise))
                if receivers and not handle.remote:
                    tracer.stop()  # nothing above the receivers' layers can change what was recorded
        else:
            single = _Window(prompts, window.start, 1, cache)
            outs = []
            with handle.trace() as tracer:
                for i in range(senders.size):
                    with tracer.invoke(**single.inputs(config)):
                        outs.append(nnsight.save(_intervene_a(handle, single, senders.select(i), receivers, kind,
                                                              clean, noise)))
            out = torch.cat(outs) if not receivers else [torch.cat(v) for v in zip(*outs)]
        if not receivers:
            return out
        window = _Window(prompts, _start(prompts, [r.position for r in receivers], cache), len(chunk), cache)
        if batching == "stack":
            with handle.trace(**window.inputs(config)):
                logits = _intervene_b(handle, window, receivers, kind, out).save()
            return logits
        single = _Window(prompts, window.start, 1, cache)
        n = prompts.size
        outs = []
        with handle.trace() as tracer:
            for i in range(len(chunk)):
                with tracer.invoke(**single.inputs(config)):
                    outs.append(_intervene_b(handle, single, receivers, kind, [v[i * n:(i + 1) * n] for v in out])
                                .save())
        return torch.cat(outs)


def _read_run(handle: ModelHandle, prompts: EncodedPrompts, logits: bool, cache: bool):
    """Every layer's head outputs [(N, T, H*D)], the last-position logits (with `logits`) and every layer's keys and
    values [(k, v)] (with `cache`; k, v: (N, kv_heads, T, D))."""
    arch = handle.arch
    rows, last, kv = [], None, None
    with torch.no_grad(), handle.trace(prompts.inputs(), use_cache=cache):
        for layer in range(arch.n_layers):
            rows.append(arch.attn_out(handle.model, layer).input.save())
        if logits:
            last = last_logits(handle).save()
        if cache:
            kv = nnsight.save([(layer.keys, layer.values) for layer in handle.lm.output.past_key_values.layers])
    return rows, last, kv


class NoiseRuns:
    """What every path-patching pass over one batch reads: the clean run's head outputs, last-position logits and
    (for prefix reuse) keys and values, and the noise run's head outputs. `noise_runs` makes it; path_patch
    computes it itself when not given one, so passing it only saves the two passes (discover_circuit shares one
    across its steps)."""

    def __init__(self, clean: list, logits: torch.Tensor, cache: list | None, noise: list):
        self.clean = clean
        self.logits = logits
        self.cache = cache
        self.noise = noise


def noise_runs(handle: ModelHandle, batch: PairBatch, reuse_prefix: bool = True) -> NoiseRuns:
    """The clean and noise reads of a batch (two forward passes), for `path_patch(..., runs=)`."""
    noise = batch.alternate.with_positions(batch.original.positions)  # noise read at the original's indices
    clean, logits, cache = _read_run(handle, batch.original, logits=True, cache=reuse_prefix)
    noised, _, _ = _read_run(handle, noise, logits=False, cache=False)
    return NoiseRuns(clean, logits, cache, noised)


def _batch_totals(handle: ModelHandle, batch: PairBatch, senders: Sequence[Site], receivers: Sequence[Site],
                  kind: str, per_pass: int, batching: str, reuse_prefix: bool, runs: NoiseRuns | None = None,
                  bar=None) -> torch.Tensor:
    """(len(senders),) the sum over the batch's examples of (p_patch - p_org) / p_org; every trace through `handle`
    (remotely this whole function is one request)."""
    runs = runs if runs is not None else noise_runs(handle, batch, reuse_prefix)
    cache = runs.cache if reuse_prefix else None
    targets = batch.target_ids
    p_org = runs.logits.float().softmax(-1)[torch.arange(batch.size), targets.to(runs.logits.device)].cpu()
    totals = torch.zeros(len(senders))
    skip = set(receivers) if kind == "out" else set()
    todo = [i for i, s in enumerate(senders) if s not in skip]   # a sender that is an output receiver: score 0
    for first in range(0, len(todo), per_pass):
        idx = todo[first:first + per_pass]
        out = _pass_logits(handle, batch.original, [senders[i] for i in idx], receivers, kind, runs.clean, runs.noise,
                           cache, batching)
        rows = torch.arange(out.shape[0], device=out.device)
        p = out.float().softmax(-1)[rows, targets.repeat(len(idx)).to(out.device)].cpu()
        rel = (p.reshape(len(idx), batch.size) - p_org) / p_org.clamp_min(1e-12)
        totals[torch.tensor(idx)] = rel.sum(1)
        if bar is not None:
            bar.update(len(idx))
            bar.set_postfix(senders_left=bar.total - bar.n)
    return totals


def _check(handle: ModelHandle, batch: PairBatch, senders: Sequence[Site], receivers: Sequence[Site],
           kind: str, per_pass: int, batching: str) -> None:
    if batch.alternate is None or batch.original.input_ids.shape != batch.alternate.input_ids.shape \
            or not torch.equal(batch.original.attention_mask, batch.alternate.attention_mask):
        raise ValueError("original and noise prompts must have the same shape and padding, token for token: build "
                         "them with lib.data_gen.entity_noise_triples or path_patching_noise")
    batch.require_targets("path patching")
    if kind not in HEAD_INPUTS:
        raise ValueError(f"unknown receiver input {kind!r}: use one of {', '.join(HEAD_INPUTS)}")
    if batching not in BATCHINGS:
        raise ValueError(f"unknown batching {batching!r}: use one of {', '.join(BATCHINGS)}")
    if per_pass < 1:
        raise ValueError(f"senders_per_pass must be at least 1, got {per_pass}")
    if not senders:
        raise ValueError("no senders to score: give at least one head at a named position")
    if kind != "out" and not receivers:
        raise ValueError(f"receiver_input={kind!r} needs receivers (the heads whose {kind} the paths reach); "
                         "the logits have no query, key or value")
    for site in [*senders, *receivers]:
        if not site.component.is_head:
            raise ValueError(f"{site}: path patching sends from and into attention heads, not MLPs")
    check_sites(handle, list(senders), batch.original)
    if receivers:
        check_sites(handle, list(receivers), batch.original)


def path_patch(
    handle: ModelHandle,
    batch: PairBatch,
    senders: Sequence[Site] | None = None,
    receivers: Sequence[Site] | None = None,
    *,
    receiver_input: HeadInput = "out",
    senders_per_pass: int = SENDERS_PER_PASS,
    batching: Batching = "stack",
    reuse_prefix: bool = True,
    runs: NoiseRuns | None = None,
    progress: bool = True,
) -> dict[Site, float]:
    """Score of every sender's path to the receivers (None: the logits); most negative = most important.

    Args:
        batch: original runs and their noise prompts as `alternate`, aligned token for token (same template, same
            length and padding); target_ids = the originals' answers.
        senders: heads at named positions (default: every head at DEFAULT_POSITIONS).
        receivers: heads at named positions the paths must reach; None = the logits.
        receiver_input: which input of the receivers the paths reach (HeadInput): "out" (their outputs, the
            default), or "q" / "k" / "v" at the receiver's named position.
        senders_per_pass: senders served by one forward pass (1 = one sender per pass).
        batching: "stack" or "invokes" (see the module docstring).
        reuse_prefix: compute only the tokens from the earliest sender / receiver on, with the clean run's keys and
            values for the tokens before (exact: no sender can change them).
        runs: the batch's clean and noise reads (`noise_runs`), to share them between calls (local only).
        progress: a progress bar over senders (off remotely).

    Returns:
        {sender: mean over examples of (p_patch - p_org) / p_org} on the target token.
    """
    receivers = list(receivers or [])
    senders = list(senders) if senders is not None else candidate_senders(handle, receivers=receivers)
    _check(handle, batch, senders, receivers, receiver_input, senders_per_pass, batching)
    if reuse_prefix and batching != "stack":
        raise ValueError("reuse_prefix needs batching='stack' (invokes cannot share one key/value cache)")
    if runs is not None and reuse_prefix and runs.cache is None:
        raise ValueError("these runs hold no keys and values: make them with noise_runs(..., reuse_prefix=True)")
    args = (batch, senders, receivers, receiver_input, senders_per_pass, batching, reuse_prefix)
    if handle.remote:
        if runs is not None:
            raise ValueError("runs= is for local models: remotely the reads happen inside the request")
        totals = handle.in_one_request(_batch_totals, *args)
    else:
        with tqdm(total=len(senders), desc=f"path patching -> {receiver_input if receivers else 'logits'}",
                  leave=False, disable=not progress or len(senders) < 2 * senders_per_pass) as bar:
            totals = _batch_totals(handle, *args, runs=runs, bar=bar)
    return {s: float(v) / batch.size for s, v in zip(senders, totals)}


def forward_passes(n_senders: int, senders_per_pass: int = SENDERS_PER_PASS, receivers: bool = True) -> int:
    """Forward passes of one path-patching call on one batch: the clean and noise reads, then run A (and run B
    with receivers) per pass of `senders_per_pass` senders. Each pass runs senders_per_pass x the batch's rows."""
    passes = -(-n_senders // senders_per_pass)
    return 2 + passes * (2 if receivers else 1)
