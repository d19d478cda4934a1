"""What a remote run sends and receives, against the same work done locally: requests, bytes and time.

Four pieces of work, each on the local NDIF (`make ndif-up`) and on this machine with the same weights, sides
alternating between repeats; the traffic is counted by the handle's backend (ProjectRemoteBackend.traffic:
requests the server accepted, their serialized payloads as sent, the result blobs as received):

- `dcm`: one DCM training run (lib.mask_intervention.train_mask, DCMConfig() but 2 and 4 epochs: the goal is one
  request per run whatever its number of steps, and bytes that do not grow with them);
- `evaluate`: accuracy on the training triples (lib.evaluation.scores);
- `cmap`: one CMAP run (lib.cmap.cmap_scores, the fine-tuned model's circuit groups patched into the base);
- `path_patching`: one path-patching step (lib.path_patching.path_patch, every head at the default positions
  to the logits).

Models: planted:paper-base and planted:paper-ft (deployed by `make ndif-up`). The server runs on this machine,
so the time remote is the cost of the protocol (serialization, the queue, Ray, the server's own pass), not of
a network; on a real NDIF add the round trips.

    python -m bench.run_all --only remote
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

from bench.common import NDIF_STATE, alternating, footer, header, load, ndif_server, timed
from lib.builtin.circuits import planted_circuit
from lib.cmap import cmap_scores
from lib.core.components import all_components
from lib.data_gen import encode_pairs, entity_triples, iter_pair_batches, path_patching_noise
from lib.evaluation import scores
from lib.mask_intervention import DCMConfig, train_mask
from lib.models import ModelHandle, load_model
from lib.patching import sites_at
from lib.path_patching import path_patch

log = logging.getLogger(__name__)

NAME = "remote"
BASE, FINE_TUNED = "planted:paper-base", "planted:paper-ft"
WORK = ("dcm", "dcm_twice_the_steps", "evaluate", "cmap", "path_patching")


def work(base: ModelHandle, ft: ModelHandle, n: int, n_boxes: int, seed: int) -> dict[str, Callable[[], object]]:
    """{name: () -> result} for one pair of handles (both local or both remote)."""
    tok = base.tokenizer
    triples = entity_triples("object", 2 * n, n_boxes=n_boxes, seed=seed, tokenizer=tok)
    train, val = {"object": triples[:n]}, {"object": triples[n:]}
    batches = list(iter_pair_batches(triples[:n], tok, 32))
    sites = sites_at(all_components(base.arch))
    config = DCMConfig(epochs=2)
    noise = encode_pairs(path_patching_noise("absent_query", n, n_boxes=n_boxes, seed=seed, tokenizer=tok), tok)
    groups = planted_circuit("paper-ft", n_boxes)
    return {
        "dcm": lambda: train_mask(base, train, val, sites, config, progress=False),
        "dcm_twice_the_steps": lambda: train_mask(base, train, val, sites, dataclasses.replace(config, epochs=4),
                                                  progress=False),
        "evaluate": lambda: scores(base, batches, progress=False),
        "cmap": lambda: cmap_scores(base, ft, batches, groups),
        "path_patching": lambda: path_patch(base, noise, progress=False),
    }


def run(name: str = NAME, repeats: int = 2, n: int = 32, n_boxes: int = 5, seed: int = 0,
        state_file: Path = NDIF_STATE) -> dict:
    """Each piece of work locally and remotely `repeats` times; the traffic of the remote runs.

    Returns:
        the record: per piece of work the median wall seconds local and remote, requests and bytes of each
        remote run; `ratio` = requests of one DCM run (goal 1). Without a running server (none recorded in
        `state_file`, or it does not answer): `skipped` says why.
    """
    record = header(name, "requests, bytes and time of remote work against the same work locally")
    server = ndif_server(state_file)
    if server is None or any(m.replace(":", "-", 1) not in server["models"] for m in (BASE, FINE_TUNED)):
        return footer({**record, "skipped": "the local NDIF server is not running or lacks the planted pair: "
                                            "start it with `make ndif-up`", "ratio": None, "meets_target": None})
    handles = {"local": (load_model(BASE), load_model(FINE_TUNED)),
               "remote": tuple(load_model(m, remote=True, backend=server["host"]) for m in (BASE, FINE_TUNED))}
    for h in handles["remote"]:
        h.backend.display.enabled = False
    runs = {side: work(*pair, n=n, n_boxes=n_boxes, seed=seed) for side, pair in handles.items()}
    wall: dict[str, dict[str, list[float]]] = {w: {"local": [], "remote": []} for w in WORK}
    traffic: dict[str, list[dict]] = {w: [] for w in WORK}
    backends = [h.backend for h in handles["remote"]]
    for i in range(repeats):
        for what in WORK:
            for side in alternating(i, ("local", "remote")):
                for b in backends:
                    b.reset_traffic()
                seconds, _, _ = timed(runs[side][what])
                wall[what][side].append(seconds)
                if side == "remote":
                    counts = [b.reset_traffic() for b in backends]
                    traffic[what].append({k: sum(c[k] for c in counts) for k in counts[0]})
    rows = {}
    for what in WORK:
        med = {side: statistics.median(v) for side, v in wall[what].items()}
        rows[what] = {"wall_s": med, "remote_over_local": med["remote"] / med["local"], "traffic": traffic[what][-1],
                      "traffic_every_repeat": traffic[what]}
    dcm_requests = rows["dcm"]["traffic"]["requests"]
    steps_free = (rows["dcm_twice_the_steps"]["traffic"]["requests"] == dcm_requests
                  and abs(rows["dcm_twice_the_steps"]["traffic"]["bytes_sent"] - rows["dcm"]["traffic"]["bytes_sent"])
                  < 0.01 * rows["dcm"]["traffic"]["bytes_sent"])
    return footer({**record, "server": server["host"],
                   "setup": {"models": [BASE, FINE_TUNED], "triples": n, "n_boxes": n_boxes,
                             "dcm": "DCMConfig() with epochs 2 (and 4), every head and MLP at the last position",
                             "cmap_groups": "planted:paper-ft's circuit groups",
                             "path_patching": "every head at the default positions -> logits, absent-query noise"},
                   "config": {"repeats": repeats, "seed": seed}, "work": rows,
                   "dcm_bytes_independent_of_steps": steps_free, "ratio": dcm_requests,
                   "ratio_basis": "requests of one DCM training run", "target": 1,
                   "meets_target": dcm_requests == 1 and steps_free})


CASES = {NAME: {}}
QUICK = {NAME: {"repeats": 1, "n": 8, "n_boxes": 3}}

COLUMNS = ["case", "work", "requests", "KiB sent / received", "wall s local / remote", "ok", "load"]


def summary_row(result: dict) -> list[str]:
    if result.get("skipped"):
        return [result["name"], f"skipped: {result['skipped']}", "-", "-", "-", "-", f"{load(result):.1f}"]
    work_rows = result["work"].items()
    return [result["name"], ", ".join(w for w, _ in work_rows),
            " / ".join(str(r["traffic"]["requests"]) for _, r in work_rows),
            " | ".join(f"{r['traffic']['bytes_sent'] / 1024:.0f} / {r['traffic']['bytes_received'] / 1024:.0f}"
                       for _, r in work_rows),
            " | ".join(f"{r['wall_s']['local']:.2f} / {r['wall_s']['remote']:.2f}" for _, r in work_rows),
            "yes" if result["meets_target"] else "NO", f"{load(result):.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(run(NAME, args.repeats), indent=1))


if __name__ == "__main__":
    main()
