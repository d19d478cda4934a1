"""What every benchmark module shares: the clock, the alternating order, medians, and the record's header.

Clock: process CPU time (`time.process_time`, every thread of the process) beside the wall clock. The machine
the numbers come from is shared (2 cores, other developers' jobs), where the wall clock mostly measures the
scheduler; torch runs on one thread for the same reason (bench/BENCHMARKS.md, "Which clock").
"""
from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lib.core.handle import ModelHandle

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NDIF_STATE = ROOT / ".ndif" / "run" / "state.json"


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run `fn` once; returns (wall seconds, process CPU seconds, its result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def alternating(i: int, items: Sequence) -> list:
    """The order of repeat `i`: as given on even repeats, reversed on odd ones (A B, B A, ...)."""
    return list(items) if i % 2 == 0 else list(items)[::-1]


def medians(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """{side: {clock: [seconds]}} -> {side: {clock: median}}."""
    return {side: {clock: statistics.median(v) for clock, v in t.items()} for side, t in times.items()}


def set_threads(threads: int | None) -> None:
    """torch intra-op threads (None = leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def header(name: str, what: str) -> dict:
    """The first fields of a record: its case, what it measures, when, and the load before it ran."""
    return {"name": name, "what": what, "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "loadavg_before": os.getloadavg()}


def footer(record: dict) -> dict:
    """The record with the load after it ran."""
    return {**record, "loadavg_after": os.getloadavg()}


def load(record: dict) -> float:
    """The higher 1-minute load average of before and after (for a table)."""
    return max(record["loadavg_before"][0], record["loadavg_after"][0])


def ndif_server(state_file: Path = NDIF_STATE) -> dict | None:
    """The running local NDIF's state (host, deployed models) from `state_file` (`make ndif-up` writes
    .ndif/run/state.json), or None if there is none or its server does not answer."""
    if not Path(state_file).exists():
        return None
    state = json.loads(Path(state_file).read_text())
    try:
        with urllib.request.urlopen(f"{state['host']}/ping", timeout=3) as response:
            return state if response.status == 200 else None
    except OSError:
        return None


class TraceCounter:
    """Counts the traces opened through a handle (a forward, or a forward and backward, each); as a context
    manager it gives the handle its own method back on exit."""

    def __init__(self, handle: ModelHandle):
        self.count = 0
        self.handle = handle
        inner = handle.trace

        def trace(*args, **kwargs):
            self.count += 1
            return inner(*args, **kwargs)

        handle.trace = trace  # an instance attribute: shadows the method for this handle only

    def __enter__(self) -> TraceCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.handle.trace
