"""The deployments as the README documents them, on a local `prefect server` with the `csd-gpu` process
pool, `prefect deploy --all` and the crash automation of `automations.yaml`, workers started from the
repository root:

- the nightly `batch` deployment with its defaults (fan-out to the `asset` deployment) and RELATIVE
  `catalog` and `out` parameters, as the cron runs it, ends Completed with the GLBs and the MLflow tree
  under `<checkout>/<out>`;
- the crash automation leaves a flow run of someone else's flow alone (default heartbeats, every 180 s)
  and marks a silent one of ours Crashed;
- `prefect flow-run retry` of a failed batch reruns only the failed asset, from its failed stage.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trimesh
from mlflow import MlflowClient
from servers import PREFECT, ROOT, Cluster, stop

from flows.pipeline import FAULT_ENV, AssetRecord

pytestmark = pytest.mark.slow

CRASH_AFTER_S = 75
"""The automation's `within`: our runs heartbeat every 30 s (prefect.yaml) and a busy 2-core machine delays them
(see test_scale_out.py); a run with Prefect's default heartbeat (every 180 s) is silent longer than this."""
SILENT_S = CRASH_AFTER_S + 30
"""How long the heartbeat test's flows sleep: past the window, before their second heartbeat."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("deploy"))
    try:
        # one machine as the README's first section has it: no MLflow server, an mlflow.db per output root
        cluster.start_services(crash_after_s=CRASH_AFTER_S, mlflow=False)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def workdir():
    """A directory in the checkout, given to the deployments by its path relative to the repository root."""
    relative = Path("out") / f".test-deployment-{uuid.uuid4().hex[:8]}"
    (ROOT / relative).mkdir(parents=True)
    yield relative
    shutil.rmtree(ROOT / relative, ignore_errors=True)


def _worker(cluster: Cluster, name: str, **env: str) -> subprocess.Popen:
    """`prefect worker start --pool csd-gpu --limit 2` in the repository root (both queues, one machine)."""
    return cluster.start(name, [*PREFECT, "worker", "start", "--pool", "csd-gpu", "--limit", "2", "--name", name], **env)


def _glb_loads(path: Path) -> bool:
    return len(trimesh.load(path, force="mesh").faces) > 0


def test_the_nightly_deployment_with_relative_catalog_and_out(cluster, workdir, tiny):
    # a nerf row and a texture-only row whose mesh path is relative to the catalog file
    (ROOT / workdir / "toy.csv").write_text("asset_id,prompt,seed,mesh,nerf.steps\nred-cube,a red cube,0,,5\n"
                                            "green-box,a green cube,1,../../catalogs/meshes/cube.obj,\n")
    worker = _worker(cluster, "worker")
    try:
        params = {"catalog": f"{workdir}/toy.csv", "preset": "toy-cpu", "out": f"{workdir}/out", "overrides": tiny,
                  "stage_retries": 0}
        run = cluster.prefect("deployment", "run", "csd-asset/batch", "--params", json.dumps(params), "--watch", timeout=900)
        assert "Completed" in run.stdout, run.stdout
    finally:
        stop(worker)
    out = ROOT / workdir / "out"
    for asset_id in ("red-cube", "green-box"):
        assert _glb_loads(out / asset_id / "export" / "asset.glb")
    assert AssetRecord.load(out, "green-box").row["mesh"] == str(ROOT / "catalogs" / "meshes" / "cube.obj")
    records = {asset_id: AssetRecord.load(out, asset_id) for asset_id in ("red-cube", "green-box")}
    # the deployment's default fans the assets out as runs of the `asset` deployment
    asset_runs = cluster.asset_runs(records["red-cube"].tracking["batch_id"])
    assert sorted((r.name, r.deployment_id is not None, r.state.type.value) for r in asset_runs) == [
        ("green-box", True, "COMPLETED"), ("red-cube", True, "COMPLETED")]

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    (batch,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert batch.info.status == "FINISHED" and batch.data.params["catalog"] == f"{workdir}/toy.csv"
    for asset_id, record in records.items():
        asset_run = client.get_run(record.tracking["asset_run_id"])
        assert asset_run.data.tags["mlflow.parentRunId"] == batch.info.run_id and asset_run.info.status == "FINISHED"
        stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == asset_run.info.run_id]
        assert sorted(r.info.run_name for r in stage_runs) == sorted(record.stages)


SLEEPER = """
import sys, time
from prefect import flow, tags
from prefect.runtime import flow_run

@flow(name=sys.argv[1])
def sleeper(seconds: float):
    print(flow_run.id, flush=True)
    time.sleep(seconds)

with tags(*sys.argv[3:]):
    sleeper(float(sys.argv[2]))
"""


def test_the_crash_automation_marks_only_our_silent_runs_crashed(cluster, tmp_path):
    env = {k: v for k, v in cluster.env.items() if k != "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"}  # Prefect's default: 180 s
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    flows = {"foreign": ["someone-elses-flow"], "ours": ["csd-asset-single", "csd-asset"]}
    processes = {who: subprocess.Popen([sys.executable, str(script), name, str(SILENT_S), *tags], cwd=tmp_path, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for who, (name, *tags) in flows.items()}
    outputs = {who: process.communicate(timeout=SILENT_S + 120)[0] for who, process in processes.items()}
    histories = {}
    with cluster.client() as client:
        for who, output in outputs.items():
            printed = re.search(r"^([0-9a-f-]{36})$", output, re.MULTILINE)
            assert printed, output
            histories[who] = [state.type.value for state in client.read_flow_run_states(printed.group(1))]
    assert "CRASHED" not in histories["foreign"] and histories["foreign"][-1] == "COMPLETED", (histories, outputs["foreign"])
    # the automation is live: a run tagged csd-asset that stays silent past the window is marked Crashed
    assert "CRASHED" in histories["ours"], histories


def test_a_retried_batch_reruns_only_the_failed_asset_from_its_failed_stage(cluster, workdir, tiny):
    (ROOT / workdir / "pair.csv").write_text("asset_id,prompt,seed,mesh\nred-box,a red cube,0,../../catalogs/meshes/cube.obj\n"
                                             "green-box,a green cube,1,../../catalogs/meshes/cube.obj\n")
    out = ROOT / workdir / "out"
    params = {"catalog": f"{workdir}/pair.csv", "preset": "toy-cpu", "out": f"{workdir}/out", "overrides": tiny,
              "stage_retries": 0}
    worker = _worker(cluster, "faulty-worker", **{FAULT_ENV: "green-box/uv"})
    try:
        batch_id = cluster.start_batch(params)
        assert cluster.wait(batch_id).state.is_failed()
    finally:
        stop(worker)
    failed = AssetRecord.load(out, "green-box")
    assert {name: entry["status"] for name, entry in failed.stages.items()} == {
        "mesh": "ran", "uv": "failed", "texture": "blocked", "export": "blocked"}
    red_before = AssetRecord.load(out, "red-box")
    assert red_before.status == "completed"

    worker = _worker(cluster, "worker-after-fix")  # the fault is gone
    try:
        cluster.prefect("flow-run", "retry", batch_id)
        run = cluster.wait(batch_id)
    finally:
        stop(worker)
    assert run.state.is_completed(), run.state
    assert run.run_count == 2
    green = AssetRecord.load(out, "green-box")
    assert {name: entry["status"] for name, entry in green.stages.items()} == {
        "mesh": "reused", "uv": "ran", "texture": "ran", "export": "ran"}
    assert _glb_loads(out / "green-box" / "export" / "asset.glb")
    # red-box completed in the first run and is not run again: one asset flow run, its record unchanged
    assert AssetRecord.load(out, "red-box") == red_before
    runs = sorted(cluster.asset_runs(batch_id), key=lambda r: r.created)
    assert sorted((r.name, r.state.type.value) for r in runs[:2]) == [("green-box", "FAILED"), ("red-box", "COMPLETED")]
    assert [(r.name, r.state.type.value) for r in runs[2:]] == [("green-box", "COMPLETED")]
    summaries = cluster.summary(batch_id)
    assert "| red-box | completed |" in summaries and "| green-box | completed |" in summaries, summaries
    for asset_id in ("red-box", "green-box"):
        assert not any((out / asset_id / "batches").glob("*.json")), "the completed retry leaves no batch records"
