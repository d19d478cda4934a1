"""The benchmarks keep to bench.run_all's protocol, and a quick run of one writes its record.

No timing is asserted here (speed targets live in bench/BENCHMARKS.md): these tests check that `make bench`
would run every case, that --quick runs a case end to end on tiny inputs, and that a record names its machine.
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

from bench import common, run_all

ROOT = Path(__file__).resolve().parents[2]
MODULES = run_all.benchmark_modules()


def test_every_benchmark_module_keeps_to_the_protocol():
    names = [m.__name__ for m in MODULES]
    for expected in ("dcm_step", "attribution", "path_patching", "localisation", "memory", "remote", "workflows"):
        assert f"bench.{expected}" in names
    cases = [name for m in MODULES for name in m.CASES]
    assert len(cases) == len(set(cases)), "two modules define the same case name (their records would clash)"
    for module in MODULES:
        assert callable(module.run) and callable(module.summary_row) and module.COLUMNS
        signature = inspect.signature(module.run)
        for name, kwargs in module.CASES.items():
            quick = module.QUICK.get(name)
            assert quick is not None, f"{module.__name__}: case {name} has no QUICK arguments"
            signature.bind(name, **{**kwargs, **quick})   # raises if run() would not take them


def test_alternating_order_and_medians():
    assert common.alternating(0, "AB") == ["A", "B"] and common.alternating(1, "AB") == ["B", "A"]
    assert common.medians({"a": {"cpu": [3.0, 1.0, 2.0]}}) == {"a": {"cpu": 2.0}}


def test_quick_run_writes_a_record_with_the_machine_and_prints_the_table(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--only", "localisation", "memory",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for case in ("localisation", "memory"):
        record = json.loads((tmp_path / f"{case}.json").read_text())
        assert record["quick"] is True and record["machine"]["cores"] >= 1 and record["case_wall_s"] > 0
        assert record["ratio"] is not None and record["loadavg_before"] and record["loadavg_after"]
    localisation = json.loads((tmp_path / "localisation.json").read_text())
    assert Path(localisation["plot"]).parent == tmp_path and Path(localisation["plot"]).exists()  # not results/
    # brute force opens one trace per component and batch (after the clean and alternate runs); DCM a fixed count
    for size in localisation["per_size"]:
        assert size["traces"]["brute_force"] == size["components"] * size["batches"] + 2 * size["batches"]
    assert localisation["per_size"][0]["traces"]["dcm"] == localisation["per_size"][1]["traces"]["dcm"]
    memory = json.loads((tmp_path / "memory.json").read_text())
    # on the tiny quick model a step can fit in memory the process already holds: an increment may be 0, never
    # negative (the peak is reset right before the step), and the base is the whole process
    for row in memory["per_sites"]:
        assert set(row["increment_mib"]) == {"nnsight", "plain", "forward"} and row["base_mib"] > 100
        assert all(v >= 0 for v in row["increment_mib"].values()), row
    assert "localisation" in run.stdout and "memory" in run.stdout   # the summary table


def test_an_unknown_case_name_fails_with_the_reason(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--only", "no_such_case",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no benchmark case matched ['no_such_case']" in run.stderr


def test_remote_case_without_a_server_is_skipped_with_the_reason(tmp_path):
    from bench import remote

    record = remote.run("remote", **remote.QUICK["remote"], state_file=tmp_path / "no-server.json")
    assert record["ratio"] is None and "make ndif-up" in record["skipped"]
    assert "skipped" in remote.summary_row(record)[1]
