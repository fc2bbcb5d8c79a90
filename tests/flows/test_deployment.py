"""The documented deployment path, end to end: a local `prefect server`, the `csd-gpu` process pool,
`prefect deploy --all`, a worker, and `prefect deployment run csd-asset/batch --watch` on a 1-asset catalog."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port, stop, wait_healthy

ROOT = Path(__file__).parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.mark.slow
def test_deploy_then_run_the_batch_deployment_with_a_worker(tmp_path, tiny):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    (tmp_path / "meshes").mkdir()
    shutil.copy(ROOT / "catalogs" / "meshes" / "cube.obj", tmp_path / "meshes" / "cube.obj")
    (tmp_path / "one.csv").write_text("asset_id,prompt,seed,nerf.steps\nred-cube,a red cube,0,5\n")
    out = tmp_path / "out"

    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "worker")}
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=logs["server"], stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        wait_healthy(f"{api}/health", server)
        env["PREFECT_API_URL"] = api

        def prefect(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
            done = subprocess.run([*PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
            return done

        prefect("work-pool", "create", "csd-gpu", "--type", "process")
        deployed = prefect("--no-prompt", "deploy", "--all")
        assert "csd-asset/batch" in deployed.stdout and "csd-asset-single/asset" in deployed.stdout
        worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "csd-gpu", "--limit", "2"], cwd=ROOT, env=env,
                                  stdout=logs["worker"], stderr=subprocess.STDOUT, start_new_session=True)
        # in the batch's own process first (the deployment's default fans out)
        params = {"catalog": str(tmp_path / "one.csv"), "preset": "toy-cpu", "out": str(out), "overrides": tiny,
                  "stage_retries": 0, "asset_deployment": None}
        run = prefect("deployment", "run", "csd-asset/batch", "--params", json.dumps(params), "--watch", timeout=600)
        assert "Completed" in run.stdout, run.stdout
        assert (out / "red-cube" / "export" / "asset.glb").stat().st_size > 1000

        # fan-out: the batch starts the asset as a run of the `asset` deployment on the same pool
        # (a worker without --work-queue polls both queues; its second slot); every stage is reused
        fan_out = {**params, "asset_deployment": "csd-asset-single/asset"}
        run = prefect("deployment", "run", "csd-asset/batch", "--params", json.dumps(fan_out), "--watch", timeout=300)
        assert "Completed" in run.stdout, run.stdout
        record = json.loads((out / "red-cube" / "asset.json").read_text())
        assert {entry["status"] for entry in record["stages"].values()} == {"reused"}
        runs = json.loads(prefect("flow-run", "ls", "--flow-name", "csd-asset-single", "--output", "json").stdout)
        assert sorted((r["state_type"], r["deployment_id"] is not None) for r in runs) == [("COMPLETED", False), ("COMPLETED", True)]
    finally:
        for process in (worker, server):
            if process is not None:
                stop(process)
        for handle in logs.values():
            handle.close()
    assert (out / "mlflow.db").exists()
