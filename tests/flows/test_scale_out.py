"""Scale-out on one machine, loopback only: a `prefect server`, an `mlflow server` (SQLite backend,
proxied artifacts), the `csd-gpu` pool with a batch worker on queue `batch` and two asset workers
(`--limit 1`, one per "GPU") on queue `assets`, and the crash automation of `automations.yaml`.
Each worker has its own working copy for output roots in object storage (a moto S3 server), as
separate machines would; the kill test uses such a root, so the survivor resumes from a checkpoint
it finds in the bucket.

The tests share that cluster and run in file order: the MLflow test stops the MLflow server and
the kill test kills a worker, so each comes after the tests that need what it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trimesh
import yaml
from mlflow import MlflowClient
from servers import free_port, kill_tree, start_s3, stop, wait_healthy

from flows.pipeline import AssetRecord

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
ASSET_DEPLOYMENT = "csd-asset-single/asset"
CRASH_AFTER_S = 75
"""The automation's `within` here: heartbeats come every 30 s (prefect.yaml), so a dead run is Crashed 75–105 s after it
died; with less slack a busy 2-core machine delays a live run's heartbeat past the window and it is wrongly Crashed."""
EXPERIMENT = "scale-out"
BUCKET = "csd"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = []
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.prefect_port}/api"
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "MLFLOW_TRACKING_URI": self.mlflow_uri,
                    "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        for name in ("PREFECT_API_URL", "CSD_ASSET_FAIL_STAGE"):
            self.env.pop(name, None)

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")
        self.logs.append(log)
        process = subprocess.Popen(args, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def start_mlflow(self) -> None:
        server = self.start("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                                       "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                                       "--artifacts-destination", str(self.root / "mlartifacts")])
        wait_healthy(f"{self.mlflow_uri}/health", server)

    def start_worker(self, name: str, queue: str, limit: int, **env: str) -> subprocess.Popen:
        return self.start(name, [*PREFECT, "worker", "start", "--pool", "csd-gpu", "--work-queue", queue, "--limit", str(limit),
                                 "--name", name], **env)

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run([*PREFECT, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api}):
            return get_client(sync_client=True)

    def start_batch(self, parameters: dict) -> str:
        with self.client() as client:
            deployment = client.read_deployment_by_name("csd-asset/batch")
            return str(client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id)

    def wait(self, flow_run_id: str, timeout: float = 600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.client() as client:
                run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(2)
        raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout}s; logs in {self.root}")

    def asset_runs(self, batch_run_id: str) -> list:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with self.client() as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[batch_run_id])))

    def summary(self, batch_run_id: str) -> str:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with self.client() as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[batch_run_id])))
        return "\n".join(str(a.data) for a in artifacts)

    def close(self) -> None:
        for process in reversed(list(self.processes.values())):
            stop(process)
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    (root / "meshes").mkdir()
    shutil.copy(ROOT / "catalogs" / "meshes" / "cube.obj", root / "meshes" / "cube.obj")
    cluster = Cluster(root)
    patch = pytest.MonkeyPatch()
    try:
        s3_server, s3_env = start_s3(root / "moto.log", BUCKET)
        cluster.processes["s3"] = s3_server
        cluster.env.update(s3_env)
        for key, value in s3_env.items():
            patch.setenv(key, value)  # this process reads the bucket too
        server = cluster.start("prefect-server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(cluster.prefect_port)])
        cluster.start_mlflow()
        wait_healthy(f"{cluster.api}/health", server)
        cluster.env["PREFECT_API_URL"] = cluster.api
        cluster.prefect("work-pool", "create", "csd-gpu", "--type", "process")
        cluster.prefect("--no-prompt", "deploy", "--all")
        automations = yaml.safe_load((ROOT / "automations.yaml").read_text())
        for automation in automations["automations"]:
            automation["trigger"]["within"] = CRASH_AFTER_S
        cluster.prefect("automation", "create", "--from-json", json.dumps(automations))
        cluster.start_worker("batch-worker", "batch", 4)
        for name, gpu in (("gpu-a", "0"), ("gpu-b", "1")):
            cluster.start_worker(name, "assets", 1, CUDA_VISIBLE_DEVICES=gpu, CSD_ASSET_WORK_DIR=str(root / f"work-{name}"))
        yield cluster
    finally:
        cluster.close()
        patch.undo()


def _catalog(root: Path, name: str, rows: list[str]) -> str:
    path = root / f"{name}.csv"
    path.write_text("asset_id,prompt,seed,mesh,nerf.steps,nerf.checkpoint_every\n" + "\n".join(rows) + "\n")
    return str(path)


def _params(cluster: Cluster, catalog: str, out: str, tiny: dict, **extra) -> dict:
    return {"catalog": catalog, "preset": "toy-cpu", "out": out, "overrides": tiny, "stage_retries": 0,
            "experiment": EXPERIMENT, "asset_deployment": ASSET_DEPLOYMENT, **extra}


def _record(out: Path, asset_id: str) -> dict:
    return json.loads((out / asset_id / "asset.json").read_text())


def _glb_loads(path: Path) -> bool:
    return len(trimesh.load(path, force="mesh").faces) > 0


def test_a_batch_is_shared_by_both_workers_and_logged_to_the_mlflow_server(cluster, tiny):
    rows = ["red-cube,a red cube,0,,4,100", "blue-sphere,a blue sphere,1,,4,100",
            f"green-box,a green cube,2,{cluster.root}/meshes/cube.obj,,", f"yellow-box,a yellow cube,3,{cluster.root}/meshes/cube.obj,,"]
    catalog, out = _catalog(cluster.root, "four", rows), cluster.root / "out-four"
    started = time.perf_counter()
    run = cluster.prefect("deployment", "run", "csd-asset/batch", "--params", json.dumps(_params(cluster, catalog, str(out), tiny)),
                          "--watch", timeout=900)
    wall = time.perf_counter() - started
    assert "Completed" in run.stdout, run.stdout

    records = {asset_id: _record(out, asset_id) for asset_id in ("red-cube", "blue-sphere", "green-box", "yellow-box")}
    workers = {cluster.processes[name].pid: name for name in ("gpu-a", "gpu-b")}
    ran_on = {asset_id: workers.get(record["worker"]["parent_pid"]) for asset_id, record in records.items()}
    assert set(ran_on.values()) == {"gpu-a", "gpu-b"}, ran_on
    assert {r["worker"]["cuda_visible_devices"] for r in records.values()} == {"0", "1"}
    # the Prefect flow runs agree: each asset's run was the process that wrote its record
    batch_id = records["red-cube"]["tracking"]["batch_id"]
    asset_runs = cluster.asset_runs(batch_id)
    assert sorted(r.name for r in asset_runs) == sorted(records)
    assert all(r.state.is_completed() for r in asset_runs)
    assert {int(r.infrastructure_pid.rsplit(":", 1)[-1]) for r in asset_runs} == {r["worker"]["pid"] for r in records.values()}
    for asset_id in records:
        assert _glb_loads(out / asset_id / "export" / "asset.glb")
        assert not (out / asset_id / "batches").exists() or not any((out / asset_id / "batches").iterdir())

    client = MlflowClient(cluster.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    batch_runs = [r for r in runs if r.data.tags.get("prefect_flow_run_id") == batch_id]
    assert len(batch_runs) == 1 and batch_runs[0].info.status == "FINISHED"
    for asset_id, record in records.items():
        asset_run = client.get_run(record["tracking"]["asset_run_id"])
        assert asset_run.data.tags["mlflow.parentRunId"] == batch_runs[0].info.run_id and asset_run.info.status == "FINISHED"
        stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == asset_run.info.run_id]
        assert sorted(r.info.run_name for r in stage_runs) == sorted(record["stages"])
        for stage_run in stage_runs:
            assert stage_run.info.status == "FINISHED" and stage_run.data.params and stage_run.data.metrics
            assert [a.path for a in client.list_artifacts(stage_run.info.run_id, "previews")], f"{asset_id}/{stage_run.info.run_name}"

    flow_seconds = {r.name: (r.end_time - r.start_time).total_seconds() for r in asset_runs}
    total = sum(flow_seconds.values())
    print("\nscale-out benchmark: 4 assets on 2 workers (asset flow run: process start, imports, stages, logging)")
    for asset_id, record in records.items():
        print(f"  {asset_id:<12} {ran_on[asset_id]}  flow run {flow_seconds[asset_id]:6.1f} s, stages {record['wall_seconds']:6.1f} s")
    print(f"  sum of asset flow runs {total:.1f} s; batch wall time {wall:.1f} s (`prefect deployment run --watch`, "
          f"incl. the batch's own start); speed-up {total / wall:.2f}x")


def test_two_batches_at_once_compute_each_stage_once(cluster, tiny):
    rows = ["twin-red,a red cube,0,,4,100", f"twin-box,a green cube,1,{cluster.root}/meshes/cube.obj,,"]
    catalog, out = _catalog(cluster.root, "twins", rows), cluster.root / "out-twins"
    # both batches run their assets in their own processes: the batch worker runs both batches at once
    first, second = (cluster.start_batch(_params(cluster, catalog, str(out), tiny, asset_deployment=None)) for _ in range(2))
    states = [cluster.wait(run_id).state for run_id in (first, second)]
    assert all(state.is_completed() for state in states), states

    client = MlflowClient(cluster.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], max_results=1000,
                              filter_string="tags.asset_id LIKE 'twin-%' AND tags.stage != ''")
    stages = {f"twin-red/{s}" for s in ("nerf", "mesh", "uv", "texture", "export")} | {f"twin-box/{s}" for s in ("mesh", "uv", "texture", "export")}
    statuses = sorted((f"{r.data.tags['asset_id']}/{r.data.tags['stage']}", r.data.tags.get("status")) for r in runs)
    # every stage ran in one batch and was reused by the other
    assert statuses == sorted([(stage, "ran") for stage in stages] + [(stage, "reused") for stage in stages]), statuses
    for asset_id in ("twin-red", "twin-box"):
        assert _glb_loads(out / asset_id / "export" / "asset.glb")
        leftovers = [p.name for p in (out / asset_id).iterdir() if p.name.endswith(".partial") or ".old-" in p.name]
        assert not leftovers


def test_a_batch_completes_while_the_mlflow_server_is_down(cluster, tiny):
    rows = ["dark-red,a red cube,0,,30,5", f"dark-box,a green cube,1,{cluster.root}/meshes/cube.obj,,"]
    catalog, out = _catalog(cluster.root, "dark", rows), cluster.root / "out-dark"
    batch_id = cluster.start_batch(_params(cluster, catalog, str(out), tiny))
    deadline = time.monotonic() + 300
    while not (out / "dark-red" / "nerf.partial" / "checkpoint.pt").exists():
        assert time.monotonic() < deadline, "the nerf stage never wrote a checkpoint"
        time.sleep(0.2)
    stop(cluster.processes["mlflow"])

    run = cluster.wait(batch_id)
    assert run.state.is_completed(), run.state
    for asset_id in ("dark-red", "dark-box"):
        assert _glb_loads(out / asset_id / "export" / "asset.glb")
    record = _record(out, "dark-red")
    lost = [name for name, entry in record["stages"].items() if entry.get("tracking_failures")]
    assert "export" in lost and record["tracking"]["failures"]
    summary = cluster.summary(batch_id)
    # dark-box (no nerf) may have finished before the server went away; dark-red was inside nerf
    assert "MLflow logs not uploaded" in summary and f"- dark-red: stages {', '.join(lost)};" in summary, summary


def test_a_killed_worker_loses_nothing(cluster, tiny):
    """The root is a bucket and each worker has its own working copy: the survivor can only resume
    from the checkpoint the victim uploaded."""
    import s3fs

    rows = ["doomed-cube,a red cube,0,,60,5"]
    catalog, out = _catalog(cluster.root, "doomed", rows), f"s3://{BUCKET}/doomed"
    batch_id = cluster.start_batch(_params(cluster, catalog, out, tiny))
    bucket = s3fs.S3FileSystem(endpoint_url=cluster.env["AWS_ENDPOINT_URL_S3"])
    deadline = time.monotonic() + 300
    while not bucket.exists(f"{BUCKET}/doomed/doomed-cube/nerf.partial/checkpoint.pt"):
        assert time.monotonic() < deadline, "the nerf stage never uploaded a checkpoint"
        time.sleep(0.5)
        bucket.invalidate_cache()
    workers = {cluster.processes[name].pid: name for name in ("gpu-a", "gpu-b")}
    victim = workers[AssetRecord.load(out, "doomed-cube").worker["parent_pid"]]
    kill_tree(cluster.processes[victim])

    run = cluster.wait(batch_id, timeout=900)
    assert run.state.is_completed(), run.state
    attempts = sorted(cluster.asset_runs(batch_id), key=lambda r: r.created)
    assert [r.state.type.value for r in attempts] == ["CRASHED", "COMPLETED"]
    record = AssetRecord.load(out, "doomed-cube")
    survivor = next(name for name in workers.values() if name != victim)
    assert workers.get(record.worker["parent_pid"]) == survivor
    nerf = record.stages["nerf"]
    assert nerf["status"] == "ran" and nerf["metrics"]["resumed_at"] >= 5 and nerf["metrics"]["steps"] == 60
    bucket.invalidate_cache()
    glb = cluster.root / "doomed.glb"
    bucket.get_file(f"{BUCKET}/doomed/doomed-cube/export/asset.glb", str(glb))
    assert _glb_loads(glb)
    assert not bucket.exists(f"{BUCKET}/doomed/doomed-cube/nerf.partial"), "the bucket keeps no checkpoint of a finished stage"
