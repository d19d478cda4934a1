"""Run every benchmark in bench/, print a table and write bench/results/<case>.json (`make bench`).

A benchmark module has `CASES` ({name: run() arguments}), `run(name, **arguments) -> dict`, `COLUMNS` and
`summary_row(result)`. Each record also gets the machine it ran on, since the numbers mean little without it.

    python -m bench.run_all                    # every case
    python -m bench.run_all --only dcm_step    # one case
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import platform
from pathlib import Path

import nnsight
import torch
import transformers

import bench

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"


def benchmark_modules() -> list:
    """Every module of the bench package that defines CASES."""
    modules = []
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name == "run_all":
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if hasattr(module, "CASES"):
            modules.append(module)
    return modules


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "nnsight": nnsight.__version__, "transformers": transformers.__version__}


def format_table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    parser.add_argument("--repeats", type=int, help="override every case's number of timed repeats")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON records")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    tables = []
    for module in benchmark_modules():
        rows = []
        for name, kwargs in module.CASES.items():
            if args.only and name not in args.only:
                continue
            if args.repeats:
                kwargs = {**kwargs, "repeats": args.repeats}
            log.info("running %s (load average %.1f on %d cores)", name, os.getloadavg()[0], os.cpu_count())
            result = {**module.run(name, **kwargs), "machine": info}
            path = args.out / f"{name}.json"
            path.write_text(json.dumps(result, indent=1))
            log.info("%s: ratio %.3f -> %s", name, result["ratio"], path)
            rows.append(module.summary_row(result))
        if rows:
            tables.append(format_table(module.COLUMNS, rows))
    if not tables:
        raise SystemExit(f"no benchmark case matched {args.only}; see CASES in the bench/ modules")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
