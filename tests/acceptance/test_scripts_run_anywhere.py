"""The installed package (`pip install -e .`): the workflow scripts run from any directory, no sys.path edits."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["workflows/entity_tracking.py", "workflows/variable_binding.py", "workflows/measure_planted.py",
           "workflows/measure_cmap.py", "workflows/measure_circuits.py", "workflows/toy_models.py", "ndif/check.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_from_another_directory(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")


def test_no_script_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for d in ("workflows", "lib", "bench", "ndif") for p in (ROOT / d).rglob("*.py")
                 if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]
    assert offenders == []
