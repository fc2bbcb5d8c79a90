"""Scale-out on one machine, loopback only: a `prefect server` on PostgreSQL (a throwaway cluster on
127.0.0.1, as the README deploys it for many workers), an `mlflow server` (SQLite backend,
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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trimesh
from mlflow import MlflowClient
from servers import ROOT, Cluster, Postgres, kill_tree, stop

from flows.pipeline import AssetRecord

pytestmark = pytest.mark.slow

ASSET_DEPLOYMENT = "csd-asset-single/asset"
CRASH_AFTER_S = 75
"""The automation's `within` here: heartbeats come every 30 s (prefect.yaml), so a dead run is Crashed 75–105 s after it
died; with less slack a busy 2-core machine delays a live run's heartbeat past the window and it is wrongly Crashed."""
EXPERIMENT = "scale-out"
BUCKET = "csd"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    (root / "meshes").mkdir()
    shutil.copy(ROOT / "catalogs" / "meshes" / "cube.obj", root / "meshes" / "cube.obj")
    # no skip when PostgreSQL is missing or does not start: the error (with initdb's / pg_ctl's output) fails the tests
    postgres = Postgres(root)
    cluster = Cluster(root, database_url=postgres.url)
    patch = pytest.MonkeyPatch()
    try:
        postgres.start()
        for key, value in cluster.start_s3(BUCKET).items():
            patch.setenv(key, value)  # this process reads the bucket too
        cluster.start_services(crash_after_s=CRASH_AFTER_S)
        cluster.start_worker("batch-worker", "batch", 4)
        for name, gpu in (("gpu-a", "0"), ("gpu-b", "1")):
            cluster.start_worker(name, "assets", 1, CUDA_VISIBLE_DEVICES=gpu, CSD_ASSET_WORK_DIR=str(root / f"work-{name}"))
        yield cluster
    finally:
        cluster.close()
        patch.undo()
        postgres.stop()


def _catalog(root: Path, name: str, rows: list[str]) -> str:
    path = root / f"{name}.csv"
    path.write_text("asset_id,prompt,seed,mesh,nerf.steps,nerf.checkpoint_every\n" + "\n".join(rows) + "\n")
    return str(path)


def _params(cluster: Cluster, catalog: str, out: str, tiny: dict, **extra) -> dict:
    return {"catalog": catalog, "preset": "toy-cpu", "out": out, "overrides": tiny, "stage_retries": 0,
            "experiment": EXPERIMENT, "asset_deployment": ASSET_DEPLOYMENT, **extra}


def _record(out: Path, asset_id: str) -> dict:
    return json.loads((out / asset_id / "asset.json").read_text())


def _psql(cluster: Cluster, query: str) -> list[tuple]:
    """Rows of `query` on the Prefect server's PostgreSQL database."""
    import asyncio

    import asyncpg

    async def fetch():
        connection = await asyncpg.connect(cluster.env["PREFECT_API_DATABASE_CONNECTION_URL"].replace("+asyncpg", ""))
        try:
            return [tuple(row) for row in await connection.fetch(query)]
        finally:
            await connection.close()

    return asyncio.run(fetch())


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
    # and they are rows in PostgreSQL: the server ran on the database it was given, not a SQLite fallback
    assert {row[0] for row in _psql(cluster, f"SELECT name FROM flow_run WHERE name IN ({', '.join(repr(a) for a in records)})")} == set(records)
    assert not (cluster.root / "prefect.db").exists() and not (cluster.root / "prefect-home" / "prefect.db").exists()
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
    assert record["tracking"]["failures"] and list((out / ".tracking-pending").glob("*.txt")), "left for sync-tracking"
    summary = cluster.summary(batch_id)
    # dark-box (no nerf) may have finished before the server went away; dark-red was inside nerf
    assert "MLflow logs not uploaded" in summary and "- dark-red: " in summary, summary
    assert f"csd-asset sync-tracking --out {out}" in summary

    # the server is back: the runs are made from the folders and the asset's run tree is complete, each run once
    cluster.start_mlflow()
    client = MlflowClient(cluster.mlflow_uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for sync in range(2):
        synced = subprocess.run([sys.executable, "-m", "flows.cli", "sync-tracking", "--out", str(out)], cwd=ROOT, env=cluster.env,
                                capture_output=True, text=True, timeout=300)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert not list((out / ".tracking-pending").glob("*.txt"))
        tree = client.search_runs([experiment_id], max_results=1000, filter_string=f"tags.csd_key LIKE 'batch/{batch_id}%'")
        assert len({r.data.tags["csd_key"] for r in tree}) == len(tree) == 1 + 2 + 5 + 4, sorted(r.data.tags["csd_key"] for r in tree)
    (asset_run,) = [r for r in tree if r.data.tags["csd_key"] == record["tracking"]["key"]]
    assert asset_run.info.status == "FINISHED"
    stage_runs = [r for r in tree if r.data.tags.get("mlflow.parentRunId") == asset_run.info.run_id]
    assert sorted(r.info.run_name for r in stage_runs) == sorted(record["stages"])
    export = next(r for r in stage_runs if r.info.run_name == "export")
    assert export.info.status == "FINISHED" and export.data.params and export.data.metrics
    assert [a.path for a in client.list_artifacts(export.info.run_id, "previews")], "files made while down were uploaded"


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

    # the victim's runs (the asset's and its nerf stage's, made RUNNING) are the survivor's: all end, none is left RUNNING
    synced = subprocess.run([sys.executable, "-m", "flows.cli", "sync-tracking", "--out", out], cwd=ROOT, env=cluster.env,
                            capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    client = MlflowClient(cluster.mlflow_uri)
    tree = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], max_results=1000,
                              filter_string=f"tags.csd_key LIKE 'batch/{batch_id}%'")
    statuses = sorted((r.data.tags["csd_key"], r.info.status) for r in tree)
    assert len(tree) == 1 + 1 + len(record.stages) and {status for _, status in statuses} == {"FINISHED"}, statuses
