"""Train, re-measure and inspect the built-in toy models (docs/TOY_MODELS.md).

    python workflows/toy_models.py train all --seed 0              # or: entity-base, entity-ft, varbind
    python workflows/toy_models.py eval entity-base entity-ft varbind --n 500
    python workflows/toy_models.py attention entity-base entity-ft varbind

`train` writes lib/builtin/toy_models/<name> and its manifest entry (accuracy on held-out tasks, command, seed,
checksum); the recipes are lib.builtin.toy_train.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from lib.attention import attention_weights
from lib.builtin import toy, toy_train
from lib.builtin.toy import BOX_COUNTS, EVAL_SEED, N_EVAL, NAMES, entity_tasks, varbind_tasks
from lib.data_gen import VB_DESIDERATA, encode_pairs, vb_triples
from lib.evaluation import accuracy, prompt_accuracy
from lib.models import load_model

log = logging.getLogger("toy_models")


def evaluate(handle, name: str, n: int = N_EVAL, seed: int = EVAL_SEED) -> dict[str, float]:
    """The manifest's accuracies: per box count for the entity models, per operation set for varbind."""
    if name.startswith("entity"):
        return {str(b): prompt_accuracy(handle, entity_tasks(b, n, seed), 250) for b in BOX_COUNTS}
    return {ops: prompt_accuracy(handle, varbind_tasks(ops, n, seed), 250) for ops in ("+", "-", "+-", "*")}


def majority_baseline(prompts: list) -> float:
    """Accuracy of always answering the most common answer (the first digit "1" is common: sums >= 100)."""
    answers = [p.answer for p in prompts]
    return max(answers.count(a) for a in set(answers)) / len(answers)


def varbind_table1(handle, n: int = N_EVAL, seed: int = EVAL_SEED) -> dict[str, float]:
    """The original model's row of Davies et al.'s Table 1 on lib.data.varbind's desiderata (targets balanced
    over the digits 1-9): the share of triples where the unpatched model already outputs the target (for VD the
    alternate's answer, so low is right; for OI the original's answer, so it is the model's accuracy)."""
    return {d: accuracy(handle, [encode_pairs(vb_triples(d, n, seed=seed), handle.tokenizer)]) for d in VB_DESIDERATA}


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


def save(name: str, model, tok, info: dict, command: str) -> dict:
    """Measure a freshly trained model on the held-out tasks and write it with its manifest entry."""
    handle = load_model(model, tokenizer=tok)
    entry = {
        "accuracy": evaluate(handle, name),
        "n_eval": N_EVAL,
        "eval_seed": EVAL_SEED,
        "command": command,
        "seed": info["seed"],
        "architecture": {k: getattr(model.config, k) for k in
                         ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")},
        "training": info,
    }
    if name == "varbind":
        entry["table1_original_model"] = varbind_table1(handle)
        entry["majority_baseline"] = {ops: majority_baseline(varbind_tasks(ops)) for ops in entry["accuracy"]}
    entry = toy.write_model(name, model, tok, entry)
    log.info("%s: accuracy %s", name, entry["accuracy"])
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python workflows/toy_models.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train", help="train toy models deterministically and write them with the manifest")
    train.add_argument("names", nargs="+", choices=[*NAMES, "all"],
                       help="which models; entity-ft continues from the entity-base run of the same seed")
    train.add_argument("--seed", type=int, default=0, help="seed of weights and training data (default 0)")
    evaluate_p = sub.add_parser("eval", help="re-measure the shipped models' accuracies on held-out tasks")
    evaluate_p.add_argument("names", nargs="+", choices=NAMES)
    evaluate_p.add_argument("--n", type=int, default=N_EVAL, help="held-out tasks per box count / operation")
    evaluate_p.add_argument("--seed", type=int, default=EVAL_SEED + 1, help="seed of the held-out tasks")
    attention = sub.add_parser("attention", help="print where each head attends (markdown, docs/TOY_MODELS.md)")
    attention.add_argument("names", nargs="+", choices=NAMES)
    attention.add_argument("--boxes", type=int, default=7, help="box count of the entity prompts (default 7)")
    attention.add_argument("--n", type=int, default=200, help="held-out prompts to average over")
    attention.add_argument("--threshold", type=float, default=0.15, help="list keys with at least this weight")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # A fixed thread count makes training bitwise reproducible; one thread is also the fastest on a shared
    # 2-core machine (two threads ran 10x slower there under load). Regenerate with the same count.
    torch.set_num_threads(toy.TRAIN_THREADS)

    if args.cmd == "attention":
        for name in args.names:
            handle = load_model(f"toy:{name}")
            if name == "varbind":
                table = varbind_table(handle, varbind_tasks("+-", args.n, EVAL_SEED + 2))
            else:
                table = entity_table(handle, entity_tasks(args.boxes, args.n, EVAL_SEED + 2))
            print(f"## {name}\n")  # noqa: T201 (the command's output)
            print(format_table(table, handle.arch.n_layers, handle.arch.n_heads, args.threshold))  # noqa: T201
        return
    if args.cmd == "eval":
        for name in args.names:
            print(name, json.dumps(evaluate(load_model(f"toy:{name}"), name, args.n, args.seed)))  # noqa: T201
        return
    names = list(NAMES) if "all" in args.names else list(dict.fromkeys(args.names))
    tok = toy.tokenizer()
    base = None
    for name in names:
        start = time.time()
        if name == "varbind":
            model, info = toy_train.train_varbind_recipe(tok, args.seed)
        elif name == "entity-base" or base is None:  # entity-ft continues from the base of the same seed
            base, info = toy_train.train_entity_base(tok, args.seed)
            model = base
        if name == "entity-ft":
            model, info = toy_train.train_entity_ft(tok, base, args.seed)
        info = {**info, "seed": args.seed, "seconds": round(time.time() - start, 1)}
        save(name, model, tok, info, f"{toy.regenerate_command(name)} --seed {args.seed}")


if __name__ == "__main__":
    main()
