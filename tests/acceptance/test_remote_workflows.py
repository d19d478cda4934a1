"""The entity-tracking workflow with --remote against the real local NDIF (planted-paper-base / -ft deployed by
`make ndif-up`): every step on the server, the local run's numbers, and a remote run killed mid-way that
--resume finishes. Skipped without the server, like tests/acceptance/test_remote.py (whose fixture this is)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.acceptance.test_remote import server  # noqa: F401  (the running server's state, or a skip)

pytestmark = pytest.mark.remote

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "workflows" / "entity_tracking.py"
SMALL = ["--n-eval", "48", "--n-train", "32", "--n-patch", "32", "--resamples", "2", "--batch-size", "16",
         "--steps", "evaluate,circuit,evaluate-circuit,dcm,functionality,cmap,knockout"]
TIMING = {"config", "step_seconds", "seconds", "figures", "models", "skipped_steps", "step_cpu_seconds",
          "step_requests"}


def _numbers(x, path=""):
    """Every number of a results tree by its path, timings and settings left out."""
    if isinstance(x, dict):
        return {k: v for key, value in x.items() if key not in TIMING for k, v in _numbers(value, f"{path}/{key}").items()}
    if isinstance(x, list):
        return {k: v for i, value in enumerate(x) for k, v in _numbers(value, f"{path}[{i}]").items()}
    return {path: x}


def _run(args, host, **kw):
    env = {**os.environ, "NDIF_HOST": host, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, **kw)


def test_remote_workflow_equals_local_and_a_killed_remote_run_resumes(server, tmp_path):  # noqa: F811
    host = server["host"]
    deployed = set(server["models"])
    if not {"planted-paper-base", "planted-paper-ft"} <= deployed:
        pytest.fail(f"the pair is not deployed ({sorted(deployed)}): run `make ndif-down ndif-up`")
    local = _run([*SMALL, "--out", str(tmp_path / "local")], host, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]

    remote_out = tmp_path / "remote"
    env = {**os.environ, "NDIF_HOST": host}
    log = (tmp_path / "remote.log").open("w")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, "--remote", "--out", str(remote_out)],
                            stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
    deadline = time.time() + 600
    while not (remote_out / "steps" / "circuit.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, ("the remote run ended before it could be killed: "
                                 + (tmp_path / "remote.log").read_text()[-3000:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (remote_out / "steps" / "functionality.json").exists()

    resumed = _run([*SMALL, "--remote", "--resume", "--out", str(remote_out)], host, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step circuit: finished in an earlier run, skipped" in resumed.stderr
    results = json.loads((remote_out / "results.json").read_text())
    # the resumed run counted its own steps' NDIF traffic (the killed run's circuit step was read back)
    requests = results["step_requests"]
    assert set(requests) == set(results["step_seconds"]) and "circuit" not in requests
    assert all(r["requests"] >= 1 and r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in requests.values())
    assert "NDIF requests per step" in (remote_out / "report.md").read_text()
    assert "step_requests" not in json.loads((tmp_path / "local" / "results.json").read_text())
    a = _numbers(results)
    b = _numbers(json.loads((tmp_path / "local" / "results.json").read_text()))
    assert a.keys() == b.keys()
    differ = {k: (a[k], b[k]) for k in a if a[k] != b[k] and not (
        isinstance(a[k], float) and isinstance(b[k], float) and abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])))}
    assert differ == {}
