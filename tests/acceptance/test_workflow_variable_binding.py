"""The variable-binding workflow (Davies et al. Table 1) end to end on the trained toy:varbind model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from workflows import variable_binding

COLUMNS = ["value_dependence", "operation_invariance", "value_dependence_mul", "operation_invariance_add_mul"]


def test_workflow_reproduces_the_shape_of_table1_and_writes_its_outputs(tmp_path, one_thread):
    out = tmp_path / "run"
    variable_binding.main(["--n-train", "96", "--n-eval", "90", "--epochs", "3", "--batch-size", "32", "--sweep", "0.01,1",
                           "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "toy:varbind"
    assert len(results["sites"]) == 3 * 4 + 3 and all(s.endswith("@last") for s in results["sites"])
    table = results["table1"]
    assert set(table) == {"original", "incomplete", "full"}
    for row in table.values():
        assert set(row) == {*COLUMNS, "n_patched"}
    assert results["n_eval"] == {d: 90 for d in COLUMNS}

    original, incomplete, full = table["original"], table["incomplete"], table["full"]
    # patching nothing leaves the model's own answer: VD is low, OI is the model's (high) accuracy, on + and -
    # and on the transfer sets (toy:varbind multiplies)
    assert original["n_patched"] == 0
    assert original["value_dependence"] < 0.1 and original["value_dependence_mul"] < 0.1
    assert original["operation_invariance"] > 0.8 and original["operation_invariance_add_mul"] > 0.8
    # both masks patch something and move held-out VD far above the original's
    assert 0 < full["n_patched"] < len(results["sites"]) and incomplete["n_patched"] > 0
    assert full["value_dependence"] > original["value_dependence"] + 0.4
    assert incomplete["value_dependence"] > original["value_dependence"] + 0.4
    # only the full desiderata keep the operation: the VD-only mask breaks OI, the full one keeps most of it
    assert full["operation_invariance"] > 0.7
    assert incomplete["operation_invariance"] < full["operation_invariance"] - 0.3
    # transfer to multiplication, which DCM never trained on (Davies et al.: full mask VD (*) 84%, OI (+,*) 91%;
    # VD-only OI (+,*) 13%): the full mask changes products with the values and keeps them across + <-> *
    assert full["value_dependence_mul"] > original["value_dependence_mul"] + 0.4
    assert full["operation_invariance_add_mul"] > 0.7
    assert incomplete["operation_invariance_add_mul"] < full["operation_invariance_add_mul"] - 0.3
    assert results["dcm"]["full"]["trained_on"] == ["value_dependence", "operation_invariance"]
    assert len(results["dcm"]["full"]["selected_patched"]) == full["n_patched"]
    assert results["config"]["lam"] == 0.03 and results["config"]["prune"] is False
    assert all(not d["pruned"] for d in results["dcm"].values())  # the paper keeps the rounded mask

    report = (out / "report.md").read_text()
    assert "toy:varbind" in report and "Full desiderata (VD and OI)" in report and "84%" in report  # paper row
    for name in ["mask_full.png", "mask_incomplete.png", "weights_full.png", "table1_accuracy.png"]:
        assert (out / name).stat().st_size > 1000
    sweep = {r["lambda"]: r for r in results["sweep"]}
    assert set(sweep) == {0.01, 1.0} and sweep[1.0]["n_selected"] <= sweep[0.01]["n_selected"]
    assert (out / "sweep_accuracy.png").stat().st_size > 1000
    gradients = results["gradients"]["attribution"]["value_dependence"]
    assert len(gradients["sites"]) == 15 and -1 <= gradients["spearman"] <= 1
    assert "Lambda sweep" in report and "Logit lens" in report

    # --resume reads every finished step back and writes the same numbers
    again = variable_binding.main(["--n-train", "96", "--n-eval", "90", "--epochs", "3", "--batch-size", "32",
                                   "--sweep", "0.01,1", "--out", str(out), "--resume"])
    assert again["skipped_steps"] == ["original", "dcm", "sweep", "gradients"]
    assert again["table1"] == results["table1"]


def test_rank_first_trains_on_the_top_k_components(tmp_path, one_thread):
    results = variable_binding.main(["--n-train", "64", "--n-eval", "40", "--epochs", "2", "--steps", "dcm",
                                     "--rank-first", "5", "--out", str(tmp_path / "rf")])
    assert len(results["sites"]) == 5 and results["rank_first"]["of"] == 15
    assert set(results["dcm"]["full"]["selected_patched"]) <= set(results["sites"])


@pytest.mark.parametrize("flags,message", [
    (["--steps", "dcm,nope"], "--steps: unknown 'nope'"),
    (["--lambda", "-1"], "--lambda must be >= 0, got -1"),
    (["--sweep", "0.1,x"], "--sweep takes comma-separated numbers"),
    (["--n-train", "0"], "--n-train must be > 0, got 0"),
    (["--template", "/nonexistent.json"], "--template /nonexistent.json: no such file"),
])
def test_bad_flags_fail_in_one_line_with_status_2(flags, message):
    script = Path(__file__).resolve().parents[2] / "workflows" / "variable_binding.py"
    proc = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
