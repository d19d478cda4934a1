"""Cross-model activation patching (CMAP, Prakash et al. 2024): the same input to two models of one architecture,
chosen component outputs of the donor (e.g. a fine-tuned model) written into the receiver (its base).

Built only on lib.patching: `collect` on the donor, then `patched_logits` on the receiver. Each is one trace on
its own handle, so remotely (one model per request) CMAP is two requests: save from the donor, send to the
receiver. Values move to the receiving layer's device and dtype inside `write_blends`.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from lib.components import Component
from lib.data_gen import EncodedBatch, Prompt, encode_batch, random_entity_prompt
from lib.models import ModelHandle
from lib.patching import Site, check_sites, clean_logits, collect, order_sites, patched_logits

log = logging.getLogger(__name__)

RESERVED = ("none", "donor")   # rows of cmap_accuracy: the receiver alone, the donor alone
_SIZES = ("model_type", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model")


class IncompatibleModels(ValueError):
    """The donor's activations cannot be written into the receiver (other sizes or another vocabulary)."""


def check_compatible(receiver: ModelHandle, donor: ModelHandle) -> None:
    """Raise IncompatibleModels unless both models have the same architecture sizes and tokenizer vocabulary."""
    diffs = [f"{k}: {getattr(receiver.arch, k)} vs {getattr(donor.arch, k)}"
             for k in _SIZES if getattr(receiver.arch, k) != getattr(donor.arch, k)]
    if diffs:
        raise IncompatibleModels(
            f"cannot patch {donor.name} into {receiver.name}: architectures differ ({'; '.join(diffs)}). "
            "CMAP needs a model and its fine-tune (same architecture and sizes)."
        )
    r_vocab, d_vocab = receiver.tokenizer.get_vocab(), donor.tokenizer.get_vocab()
    if r_vocab != d_vocab:
        only_r, only_d = sorted(set(r_vocab) - set(d_vocab)), sorted(set(d_vocab) - set(r_vocab))
        moved = sum(1 for t in set(r_vocab) & set(d_vocab) if r_vocab[t] != d_vocab[t])
        raise IncompatibleModels(
            f"cannot patch {donor.name} into {receiver.name}: tokenizer vocabularies differ "
            f"({len(r_vocab)} vs {len(d_vocab)} tokens; only in receiver: {only_r[:5]}, only in donor: "
            f"{only_d[:5]}, {moved} shared tokens with other ids). The same input must be the same token ids "
            "in both: load both models with the same tokenizer."
        )


def cross_model_patch(
    receiver: ModelHandle, donor: ModelHandle, batch: EncodedBatch, sites: Sequence[Site]
) -> torch.Tensor:
    """Receiver's last-position logits on `batch` with the donor's outputs (same input) written in at `sites`."""
    check_compatible(receiver, donor)
    check_sites(receiver, sites, batch)
    return patched_logits(receiver, batch, sites, collect(donor, batch, sites))


def _hits(logits: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    return (logits.argmax(-1).cpu() == batch.answer_ids.cpu()).sum()


def cmap_accuracy(
    receiver: ModelHandle,
    donor: ModelHandle,
    prompts: Sequence[Prompt],
    groups: Mapping[str, Sequence[Site]],
    batch_size: int = 50,
) -> dict[str, float]:
    """Accuracy (argmax at the last token == answer) of the receiver with each group's sites patched from the donor.

    Returns {"none": receiver alone, "donor": donor alone, group: receiver with that group patched}. Per batch the
    donor runs once for the union of every group's sites; each group is then one receiver run.
    """
    check_compatible(receiver, donor)
    if not prompts:
        raise ValueError("cmap_accuracy needs at least one prompt")
    clash = [g for g in groups if g in RESERVED]
    if clash:
        raise ValueError(f"group names {clash} are reserved for the unpatched rows {RESERVED}: rename them")
    union = order_sites([s for sites in groups.values() for s in sites])
    hits = {name: torch.tensor(0) for name in (*RESERVED, *groups)}
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"CMAP {donor.name} -> {receiver.name}", disable=len(starts) < 3):
        batch = encode_batch(list(prompts[start:start + batch_size]), receiver.tokenizer)
        for name, sites in groups.items():
            check_sites(receiver, sites, batch)
        hits["none"] += _hits(clean_logits(receiver, batch), batch)
        hits["donor"] += _hits(clean_logits(donor, batch), batch)
        values = collect(donor, batch, union) if union else {}
        for name, sites in groups.items():
            hits[name] += _hits(patched_logits(receiver, batch, sites, values), batch)
    result = {name: float(h) / len(prompts) for name, h in hits.items()}
    log.info("CMAP %s -> %s on %d prompts: %s", donor.name, receiver.name, len(prompts),
             ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def toy_entity_groups(n_boxes: int = 7) -> dict[str, list[Site]]:
    """Head groups of the toy entity models' mechanism (docs/TOY_MODELS.md), each at the positions it works at,
    plus controls at positions where the mechanism does not run."""
    def heads(layer, *ids):
        return [Component(layer, h) for h in (ids or (0, 1))]

    def at(components, positions):
        return [Site(c, p) for c in components for p in positions]

    labels = [f"label_{i}" for i in range(n_boxes)]
    circuit = at(heads(0), labels) + at(heads(1), ["query_label"]) + at(heads(2), ["last"])
    return {
        "binding L0H0+L0H1 @ box labels": at(heads(0), labels),
        "binding head L0H1 @ box labels": at(heads(0, 1), labels),
        "L0H1 @ prev_query_label (queried box only)": at(heads(0, 1), ["prev_query_label"]),
        "L0H0 @ box labels": at(heads(0, 0), labels),
        "label matching L1H0+L1H1 @ query_label": at(heads(1), ["query_label"]),
        "mover L2H0+L2H1 @ last": at(heads(2), ["last"]),
        "circuit (the three above, each at its position)": circuit,
        "control: L0H0+L0H1 @ last": at(heads(0), ["last"]),
        "control: L0H0+L0H1 @ query_label": at(heads(0), ["query_label"]),
        "control: MLP0 @ box labels": at([Component(0)], labels),
    }


def main(argv: list[str] | None = None) -> None:
    """Measure CMAP of the toy entity models (base <- fine-tuned), the table of docs/CMAP.md."""
    from lib.models import load_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--receiver", default="toy:entity-base", help="the model patched into (the base)")
    parser.add_argument("--donor", default="toy:entity-ft", help="the model the head outputs come from")
    parser.add_argument("--boxes", type=int, default=7, help="boxes per prompt")
    parser.add_argument("--n", type=int, default=500, help="random prompts")
    parser.add_argument("--seed", type=int, default=2024, help="prompt seed")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", help="also write the results (with this config) to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    receiver, donor = load_model(args.receiver), load_model(args.donor)
    rng = random.Random(args.seed)
    prompts = [random_entity_prompt(rng, args.boxes) for _ in range(args.n)]
    result = cmap_accuracy(receiver, donor, prompts, toy_entity_groups(args.boxes), args.batch_size)
    lines = ["| patched from the donor | accuracy |", "|---|---|"]
    lines += [f"| {name} | {acc:.3f} |" for name, acc in result.items()]
    log.info("CMAP table:\n%s", "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "accuracy": result}, f, indent=2)


if __name__ == "__main__":
    main()
