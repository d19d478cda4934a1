"""The entity-tracking workflow end to end on the default pair (planted:paper-base / planted:paper-ft), whose
circuit is known (lib.builtin.planted.ground_truth): every step, its outputs agreeing with each other, the
findings against the pair's documented mechanism, --resume after a killed run, a LoRA fine-tune, bad flags."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib.builtin import planted
from workflows import entity_tracking

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "workflows" / "entity_tracking.py"
SMALL = ["--n-eval", "60", "--n-train", "48", "--n-patch", "32", "--resamples", "2", "--batch-size", "16"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One full default run (every step but scan), small settings."""
    out = tmp_path_factory.mktemp("et") / "run"
    results = entity_tracking.main([*SMALL, "--steps", "evaluate,circuit,evaluate-circuit,dcm,functionality,cmap,"
                                    "knockout", "--out", str(out)])
    return out, results


def _truth_groups() -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for entry in planted.ground_truth("paper-base")["circuit"]:
        groups.setdefault(entry["group"], set()).add(entry["component"])
    return groups


def test_every_step_ran_and_the_files_are_there(run):
    out, results = run
    for name in ("results.json", "report.md", "circuit.json", "circuit_heads.png", "figure3_functionality.png",
                 "figure4_cmap.png", "knockout_base.png"):
        assert (out / name).stat().st_size > 500, name
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) >= {"evaluate", "circuit", "evaluate-circuit", "dcm", "functionality", "cmap", "knockout"}
    assert all(isinstance(v, float) for v in on_disk["cmap"]["accuracy"].values())   # numbers as numbers
    assert sorted(p.stem for p in (out / "steps").glob("*.json")) == sorted(
        ["evaluate", "circuit", "evaluate-circuit", "dcm", "functionality", "cmap", "knockout"])


def test_the_outputs_agree_with_each_other(run):
    out, results = run
    ec = results["evaluate-circuit"]
    for row in ec.values():
        assert row["faithfulness"] == pytest.approx(row["circuit"] / row["full_model"])
    circuit = json.loads((out / "circuit.json").read_text())
    sites = sorted(h["site"] for g in circuit["groups"] for h in g["heads"])
    assert sorted(results["cmap"]["heads"]["whole circuit"]) == sites   # the CMAP row uses step 2's circuit
    assert results["cmap"]["accuracy"]["none"] == pytest.approx(results["evaluate"]["base"]["accuracy"], abs=0.15)


def test_the_circuit_is_the_planted_one(run):
    _, results = run
    truth = _truth_groups()
    found = {g["name"]: {h["site"].split("@")[0] for h in g["heads"]} for g in results["circuit"]["circuit"]["groups"]}
    positions = {g["name"]: g["position"] for g in results["circuit"]["circuit"]["groups"]}
    assert positions == {"Value Fetcher": "last", "Position Transmitter": "last", "Position Detector": "query_label",
                         "Structure Reader": "prev_query_label"}
    assert found == truth


def test_the_findings_match_the_pairs_mechanism(run):
    out, results = run
    ev = results["evaluate"]
    assert ev["fine_tuned"]["accuracy"] > ev["base"]["accuracy"] + 0.1
    assert results["evaluate-circuit"]["base"]["faithfulness"] >= 0.9
    dcm = results["dcm"]["groups"]
    assert dcm["Value Fetcher"]["desiderata"]["object"]["selected"]          # A carries the object
    assert dcm["Position Transmitter"]["desiderata"]["position"]["selected"]  # B and C carry the position
    assert dcm["Position Detector"]["desiderata"]["position"]["selected"]
    cmap = results["cmap"]["accuracy"]
    assert cmap["Value Fetcher"] >= cmap["donor"] - 0.05                     # the fine-tune's gain lives in A
    assert abs(cmap["Structure Reader"] - cmap["none"]) <= 0.1
    curve = results["knockout"]["base"]["curves"]["last->correct_object"]
    assert curve["3"] < 0.5 * curve["4"]                                     # A (layer 3) reads the object
    report = (out / "report.md").read_text()
    assert report.count("**reproduced**") >= 5 and "Table 1" in report and "Figure 4" in report


def _run_script(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, **kw)


def test_resume_after_a_killed_run_skips_the_finished_steps_and_gives_the_same_results(tmp_path):
    out = tmp_path / "killed"
    args = [*SMALL, "--steps", "evaluate,circuit,dcm", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "steps" / "circuit.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)       # killed during dcm (or just before)
    proc.wait()
    assert not (out / "steps" / "dcm.json").exists() and not list((out / "steps").glob("*.tmp"))

    resumed = _run_script([*args, "--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step evaluate: finished in an earlier run, skipped" in resumed.stderr
    assert "step circuit: finished in an earlier run, skipped" in resumed.stderr
    fresh = entity_tracking.main([*args[:-1], str(tmp_path / "fresh")])
    again = json.loads((out / "results.json").read_text())
    assert again["skipped_steps"] == ["evaluate", "circuit"]
    assert again["evaluate"] == fresh["evaluate"] and again["dcm"] == fresh["dcm"]
    assert again["circuit"]["circuit"]["groups"] == fresh["circuit"]["circuit"]["groups"]   # (timings differ)
    refused = _run_script([*args[:-4], "--n-train", "40", "--steps", "evaluate", "--out", str(out), "--resume"])
    assert refused.returncode == 2 and "other settings (n_train)" in refused.stderr


def test_a_lora_fine_tune_loads_over_its_base_and_cmap_patches_from_it(run, tmp_path):
    from peft import LoraConfig, get_peft_model

    module, _ = planted.build("paper-base")
    lora = get_peft_model(module, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:   # every adapter weight set here (peft draws lora_A from the global RNG)
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if "lora_B" in name else 0.5))
    lora.save_pretrained(tmp_path / "adapter")
    out_dir, _ = run
    out = tmp_path / "lora"
    results = entity_tracking.main([*SMALL, "--steps", "evaluate,cmap", "--fine-tuned", str(tmp_path / "adapter"),
                                    "--circuit", str(out_dir / "circuit.json"), "--out", str(out)])
    assert "LoRA" in results["models"]["fine_tuned"]
    acc = results["cmap"]["accuracy"]
    assert set(acc) >= {"none", "donor", "Value Fetcher", "whole circuit"}
    ev = results["evaluate"]
    assert ev["fine_tuned"]["accuracy"] != ev["base"]["accuracy"] and acc["donor"] != acc["none"]  # it is in effect
    assert acc["none"] == pytest.approx(ev["base"]["accuracy"], abs=0.2)


@pytest.mark.parametrize("flags,message", [
    (["--steps", "evaluate,foo"], "--steps: unknown 'foo'; choose from evaluate,circuit"),
    (["--lambda", "-1"], "--lambda must be >= 0, got -1"),
    (["--n-boxes", "2"], "--n-boxes must be at least 3"),
    (["--top-k", "20,5"], "--top-k takes three positive integers"),
    (["--circuit", "/nonexistent/circuit.json"], "--circuit /nonexistent/circuit.json: no such file"),
    (["--fine-tuned", "/nonexistent/ft"], "--fine-tuned /nonexistent/ft: model path /nonexistent/ft does not exist"),
    (["--fine-tuned", "planted:strong"], "cannot be patched into --model planted:paper-base: their architectures "
                                         "differ (n_layers: 4 vs 3"),
    (["--fine-tuned", "none"], "--steps cmap needs --fine-tuned"),
    (["--init", "ones", "--parameterization", "sigmoid"], "--init ones cannot start the sigmoid"),
])
def test_bad_flags_fail_in_one_line_with_status_2_before_any_model_loads(flags, message):
    proc = _run_script(flags, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0]
    assert "Loading weights" not in proc.stderr and not proc.stdout


def test_rank_first_path_patches_fewer_senders_and_finds_the_same_circuit(run, tmp_path):
    _, full = run
    ranked = entity_tracking.main([*SMALL, "--steps", "circuit", "--rank-first", "4", "--out", str(tmp_path / "rf")])
    info = ranked["circuit"]["rank_first"]
    assert info["senders_path_patched"] == 12 and info["senders_without"] == 48
    groups = lambda r: {g["name"]: sorted(h["site"] for h in g["heads"]) for g in r["circuit"]["circuit"]["groups"]}  # noqa: E731
    assert groups(ranked) == groups(full)
