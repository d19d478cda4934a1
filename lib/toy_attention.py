"""Where each head of a toy model attends, measured with nnsight on held-out prompts (docs/TOY_MODELS.md).

For chosen query positions (last token, query label, box labels, ...) the mean attention weight of every head
to named key positions (correct object, the query label's earlier occurrence, ...), read from the attention
modules' weights in an nnsight trace (the model is switched to eager attention, which returns them).
"""
from __future__ import annotations

import torch

from lib.data_gen import encode_batch


def attention_weights(handle, prompts: list) -> tuple[list[torch.Tensor], object]:
    """Per layer (batch, heads, query, key) attention weights on the left-padded batch, and the batch."""
    handle.lm._module.set_attn_implementation("eager")
    batch = encode_batch(prompts, handle.tokenizer)
    weights = []
    with torch.no_grad(), handle.trace(batch.inputs()):
        for layer in range(handle.arch.n_layers):
            weights.append(handle.arch.layer(handle.model, layer).self_attn.output[1].save())
    return [w.float() for w in weights], batch


def _gather(w: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(batch, heads) attention from query index q[b] to key index k[b]."""
    return w[torch.arange(w.shape[0]), :, q, k]


def entity_table(handle, prompts: list) -> dict[str, dict[str, list[list[float]]]]:
    """{query position: {key position: [layer][head] mean attention}} for entity-tracking prompts."""
    weights, batch = attention_weights(handle, prompts)
    pos = batch.positions
    n = len(prompts[0].meta["objects"])
    first = batch.attention_mask.float().argmax(1)
    table: dict[str, dict[str, list[list[float]]]] = {}
    queries = {"last": pos["last"], "query_label": pos["query_label"]}
    keys = {"correct_object": pos["correct_object"], "prev_query_label": pos["prev_query_label"],
            "query_label": pos["query_label"], "box (query)": pos["query_label"] - 1, "first token": first}
    for qname, q in queries.items():
        table[qname] = {}
        for kname, k in keys.items():
            table[qname][kname] = torch.stack([_gather(w, q, k).mean(0) for w in weights]).tolist()
        others = [torch.stack([_gather(w, q, pos[f"object_{i}"]) for i in range(n)], -1) for w in weights]
        correct = [_gather(w, q, pos["correct_object"]) for w in weights]
        table[qname]["other objects (sum)"] = torch.stack(
            [(o.sum(-1) - c).mean(0) for o, c in zip(others, correct)]).tolist()
    # a box label, pooled over the boxes: its own object, its own 'box' token, the previous segment's label
    def pooled(key_of) -> torch.Tensor:
        per_box = [torch.stack([_gather(w, pos[f"label_{i}"], key_of(i)).mean(0) for w in weights]) for i in range(n)]
        return torch.stack(per_box).mean(0)

    own = {
        "own object": pooled(lambda i: pos[f"object_{i}"]),
        "own 'box'": pooled(lambda i: pos[f"label_{i}"] - 1),
        "previous label": pooled(lambda i: pos[f"label_{i - 1}"] if i else first),
        "first token": pooled(lambda i: first),
    }
    table["box labels"] = {k: v.tolist() for k, v in own.items()}
    return table


def varbind_table(handle, prompts: list) -> dict[str, dict[str, list[list[float]]]]:
    """{query position: {key position: [layer][head] mean attention}} for variable-binding prompts."""
    weights, batch = attention_weights(handle, prompts)
    pos = batch.positions

    def named(prefix: str, side: str) -> torch.Tensor:
        return torch.stack([pos[f"{prefix}_{p.meta[side]}"][i] for i, p in enumerate(prompts)])

    keys = {
        "left value, tens": named("value", "left") - 1, "left value, units": named("value", "left"),
        "right value, tens": named("value", "right") - 1, "right value, units": named("value", "right"),
        "left name (definition)": named("var", "left"), "right name (definition)": named("var", "right"),
        "left (query)": pos["left"], "op": pos["op"], "right (query)": pos["right"],
    }
    queries = {"last": pos["last"], "right (query)": pos["right"], "left (query)": pos["left"]}
    return {q: {k: torch.stack([_gather(w, qi, ki).mean(0) for w in weights]).tolist()
                for k, ki in keys.items() if bool((ki <= qi).all())}
            for q, qi in queries.items()}


def format_table(table: dict, n_layers: int, n_heads: int, threshold: float = 0.2) -> str:
    """Markdown: for each query position and head, the key positions it gives >= threshold of its attention."""
    lines = ["| query position | head | attends to (mean weight) |", "|---|---|---|"]
    for qname, cols in table.items():
        for layer in range(n_layers):
            for head in range(n_heads):
                hits = sorted(((v[layer][head], k) for k, v in cols.items() if v[layer][head] >= threshold),
                              reverse=True)
                text = ", ".join(f"{k} {v:.2f}" for v, k in hits) or "spread out (no named key >= %.2f)" % threshold
                lines.append(f"| {qname} | L{layer}H{head} | {text} |")
    return "\n".join(lines)
