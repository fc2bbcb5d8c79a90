"""A first run looks broken when it prints a traceback, even when it succeeds: `csd-asset run` with
its own temporary Prefect server (no PREFECT_API_URL), as a new user starts it, prints none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CATALOG = """asset_id,prompt,seed,nerf.steps
red-cube,a red cube,0,6
blue-sphere,a blue sphere,1,6
"""


@pytest.mark.slow
def test_a_successful_run_prints_no_traceback_and_no_error_line(tiny, tmp_path):
    (tmp_path / "catalog.csv").write_text(CATALOG)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a fresh home: the first run a user sees
    args = [sys.executable, "-m", "flows.cli", "run", str(tmp_path / "catalog.csv"), "--out", str(tmp_path / "out"), "--parallel", "2"]
    args += [f"--set={key}={value}" for key, value in tiny.items()]
    done = subprocess.run(args, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert (tmp_path / "out" / "blue-sphere" / "export").is_dir()
    assert "Traceback" not in output, output[-4000:]
    assert not [line for line in output.splitlines() if "ERROR" in line], output[-4000:]
