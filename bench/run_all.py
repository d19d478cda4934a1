"""Run every benchmark in bench/, print a table and write bench/results/<case>.json (`make bench`).

A benchmark module has `CASES` ({name: run() arguments}), `QUICK` ({name: arguments that replace them for a
smoke run}), `run(name, **arguments) -> dict` (a record with `ratio`, its headline figure, None where a case was
skipped), `COLUMNS` and `summary_row(result)`. Each record also gets the machine it ran on and its own wall time,
since the numbers mean little without them (tests/integration/test_bench_protocol.py checks every module keeps to this).

    python -m bench.run_all                    # every case (make bench)
    python -m bench.run_all --only dcm_step    # one case
    python -m bench.run_all --quick            # every case, tiny: checks the benchmarks run, measures nothing
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import pkgutil
import platform
import time
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
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON records (default bench/results; --quick: bench/results/quick)")
    parser.add_argument("--quick", action="store_true",
                        help="each case with its QUICK arguments: a smoke run whose numbers mean nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    tables = []
    for module in benchmark_modules():
        rows = []
        for name, kwargs in module.CASES.items():
            if args.only and name not in args.only:
                continue
            if args.quick:
                kwargs = {**kwargs, **module.QUICK.get(name, {})}
            if args.repeats:
                kwargs = {**kwargs, "repeats": args.repeats}
            if "out" in inspect.signature(module.run).parameters:   # files beside the record (plots)
                kwargs = {**kwargs, "out": args.out}
            log.info("running %s (load average %.1f on %d cores)", name, os.getloadavg()[0], os.cpu_count())
            started = time.perf_counter()
            result = {**module.run(name, **kwargs), "machine": info, "quick": args.quick,
                      "case_wall_s": 0.0}
            result["case_wall_s"] = round(time.perf_counter() - started, 1)
            path = args.out / f"{name}.json"
            path.write_text(json.dumps(result, indent=1, default=str))
            ratio = "skipped" if result["ratio"] is None else f"{result['ratio']:.3f}"
            log.info("%s: %s (%s) in %.0f s -> %s", name, ratio, result.get("ratio_basis", "ratio"),
                     result["case_wall_s"], path)
            rows.append(module.summary_row(result))
        if rows:
            tables.append(format_table(module.COLUMNS, rows))
    if not tables:
        raise SystemExit(f"no benchmark case matched {args.only}; see CASES in the bench/ modules")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
