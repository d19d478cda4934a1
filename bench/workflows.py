"""How long a user waits for each workflow run with its defaults, step by step.

Each workflow's `main()` runs with no flags but `--out` (a fresh temporary directory), in this process, with
torch on every core (what a user gets; the other benchmarks use one thread for their ratios); the per-step wall times are the workflow's own (`step_seconds`
in its results.json, measured by workflows.common.Run), the total includes loading the models and writing the
report. One run each: a workflow run is minutes, and its steps are what a user sees in the log.

    python -m bench.run_all --only workflows
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import footer, header, load, set_threads, timed
from workflows import entity_tracking, variable_binding

log = logging.getLogger(__name__)

NAME = "workflows"
WORKFLOWS = {"entity_tracking": entity_tracking.main, "variable_binding": variable_binding.main}


def run(name: str = NAME, flags: dict[str, Sequence[str]] | None = None, threads: int | None = os.cpu_count()) -> dict:
    """Each workflow once with `flags` (default: none, the users' command); the wall time of each step.

    Returns:
        the record: per workflow its total and per-step seconds and its model; `ratio` = the slowest total
        in minutes (no target: it is what a user waits for).
    """
    record = header(name, "wall time of each default workflow run, by step")
    set_threads(threads)
    flags = flags or {}
    rows = {}
    for workflow, main in WORKFLOWS.items():
        with tempfile.TemporaryDirectory(prefix=f"bench-{workflow}-") as tmp:
            argv = [*flags.get(workflow, []), "--out", str(Path(tmp) / "out")]
            seconds, cpu, results = timed(lambda: main(argv))  # noqa: B023 (called at once)
        rows[workflow] = {"flags": list(flags.get(workflow, [])), "models": results.get("models") or {"model": results.get("model")}, "total_s": seconds, "cpu_s": cpu,
                          "step_s": results["step_seconds"]}
        log.info("%s: %.0f s (%s)", workflow, seconds, rows[workflow]["step_s"])
    return footer({**record, "workflows": rows, "ratio": max(r["total_s"] for r in rows.values()) / 60,
                   "ratio_basis": "the slowest default workflow run, minutes", "target": None,
                   "meets_target": None})


CASES = {NAME: {}}
QUICK = {NAME: {"flags": {
    "entity_tracking": ["--n-eval", "8", "--n-train", "8", "--n-patch", "8", "--epochs", "1",
                        "--steps", "evaluate,circuit,dcm"],
    "variable_binding": ["--n-train", "8", "--n-eval", "8", "--epochs", "1", "--steps", "original,dcm"]}}}

COLUMNS = ["case", "workflow", "total s", "steps (s)", "load"]


def summary_row(result: dict) -> list[str]:
    return [result["name"], ", ".join(result["workflows"]),
            " / ".join(f"{r['total_s']:.0f}" for r in result["workflows"].values()),
            " | ".join(", ".join(f"{step} {s:.0f}" for step, s in r["step_s"].items())
                       for r in result["workflows"].values()), f"{load(result):.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(run(NAME), indent=1))


if __name__ == "__main__":
    main()
