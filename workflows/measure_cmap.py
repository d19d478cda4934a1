"""Measure CMAP of the toy entity models (base <- fine-tuned): the table of docs/CMAP.md.

    python workflows/measure_cmap.py [--receiver toy:entity-base --donor toy:entity-ft --boxes 7 --n 500]
"""
from __future__ import annotations

import argparse
import json
import logging
import random

from lib.builtin.circuits import toy_cmap_groups
from lib.cmap import cmap_accuracy
from lib.data_gen import random_entity_prompt
from lib.models import load_model

log = logging.getLogger("measure_cmap")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    result = cmap_accuracy(receiver, donor, prompts, toy_cmap_groups(args.boxes), args.batch_size)
    lines = ["| patched from the donor | accuracy |", "|---|---|"]
    lines += [f"| {name} | {acc:.3f} |" for name, acc in result.items()]
    log.info("CMAP table:\n%s", "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "accuracy": result}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
