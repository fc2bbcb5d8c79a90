"""The Prefect flow on a real (temporary) Prefect server and a real MLflow store (SQLite), toy-cpu
with tiny stage settings: a failure in one asset leaves the other intact, a second run recomputes
exactly what failed and what follows it, and `csd-asset rerun` forces one stage under the same MLflow run."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.cli import main
from flows.pipeline import FAULT_ENV, AssetRecord, stage_states

CUBE = Path(__file__).parents[2] / "catalogs" / "meshes" / "cube.obj"
CATALOG = """asset_id,prompt,seed,mesh,nerf.steps
red-cube,a red cube,0,,12
green-box,a green cube,1,meshes/cube.obj,
"""
RED_STAGES = ["nerf", "mesh", "uv", "texture", "export"]
GREEN_STAGES = ["mesh", "uv", "texture", "export"]


def _commit_times(out: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("*/*/result.json")}


def _runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


@pytest.fixture(scope="module")
def faulty_batch(prefect_server, tiny, tmp_path_factory):
    """`csd-asset run` over a 2-asset catalog with green-box's uv stage made to fail."""
    root = tmp_path_factory.mktemp("batch")
    (root / "meshes").mkdir()
    shutil.copy(CUBE, root / "meshes" / "cube.obj")
    (root / "catalog.csv").write_text(CATALOG)
    out = root / "out"
    patch = pytest.MonkeyPatch()
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    patch.setenv(FAULT_ENV, "green-box/uv")
    args = ["run", str(root / "catalog.csv"), "--out", str(out), "--parallel", "2", "--retries", "0"]
    args += [f"--set={key}={value}" for key, value in tiny.items()]
    exit_code = main(args)
    patch.delenv(FAULT_ENV)
    yield {"root": root, "out": out, "args": args, "exit_code": exit_code}
    patch.undo()


# these three share a two-asset batch on the Prefect test server: ~1.5 min
@pytest.mark.slow
def test_a_failed_stage_fails_the_batch_but_not_the_other_asset(faulty_batch):
    out = faulty_batch["out"]
    assert faulty_batch["exit_code"] == 1
    states = stage_states(out)
    assert states["red-cube"] == dict.fromkeys(RED_STAGES, "done")
    assert states["green-box"] == {"mesh": "done", "uv": "failed", "texture": "blocked", "export": "blocked"}
    assert "CSD_ASSET_FAIL_STAGE" in AssetRecord.load(out, "green-box").stages["uv"]["error"]
    assert (out / "red-cube" / "export" / "asset.glb").stat().st_size > 1000
    assert not (out / "green-box" / "uv").exists() and not (out / "green-box" / "uv.partial" / "result.json").exists()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["csd-asset-batch"])))
    summary = artifacts[-1].data
    assert "| red-cube | completed |" in summary and "| green-box | failed |" in summary
    assert "stage 'uv' of asset 'green-box' failed" in summary


@pytest.mark.slow
def test_mlflow_holds_batch_asset_stage_runs_with_params_metrics_and_previews(faulty_batch):
    client = MlflowClient(f"sqlite:///{faulty_batch['out'] / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    # what MLflow 3's UI reads to open the experiment on its runs table, not the GenAI traces page
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = _runs(client)
    (batch,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assets = {r.data.tags["asset_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == batch.info.run_id}
    assert "contact_sheet.png" in [a.path for a in client.list_artifacts(batch.info.run_id)], "the batch at a glance"
    assert set(assets) == {"red-cube", "green-box"}
    assert assets["red-cube"].data.tags["prompt"] == "a red cube" and assets["red-cube"].data.tags["preset"] == "toy-cpu"
    assert assets["red-cube"].info.status == "FINISHED" and assets["green-box"].info.status == "FAILED"
    assert batch.info.status == "FAILED" and batch.data.metrics["assets_failed"] == 1

    def stages(asset_id):
        parent = assets[asset_id].info.run_id
        return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}

    red = stages("red-cube")
    assert sorted(red) == sorted(RED_STAGES) and all(r.info.status == "FINISHED" for r in red.values())
    green = stages("green-box")
    assert sorted(green) == ["mesh", "uv"] and green["uv"].info.status == "FAILED"
    assert "CSD_ASSET_FAIL_STAGE" in green["uv"].data.tags["error"]

    nerf = red["nerf"]
    assert nerf.data.params["steps"] == "12" and nerf.data.params["prompt"] == "a red cube"
    assert nerf.data.params["model.model"] == "toy" or "model.model" in nerf.data.params
    loss = client.get_metric_history(nerf.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 10, 12], "every 10th step, first and last, each once"
    assert loss[0].timestamp < loss[-1].timestamp, "step 1 came live, from the worker process, before the stage finished"
    assert {"grad_norm", "t", "step_time"} <= set(nerf.data.metrics)
    listed = {a.path for a in client.list_artifacts(nerf.info.run_id)}
    assert {"config.yaml", "result.json", "previews"} <= listed
    assert "previews/turntable.png" in {a.path for a in client.list_artifacts(nerf.info.run_id, "previews")}
    export_files = {a.path for a in client.list_artifacts(red["export"].info.run_id, "files")}
    assert "files/asset.glb" in export_files
    for name in ("mesh", "uv", "texture", "export"):
        assert client.list_artifacts(red[name].info.run_id, "previews"), f"{name} has rendered previews"


@pytest.mark.slow
def test_status_writes_a_contact_sheet_with_the_failed_asset_framed_red(faulty_batch, capsys):
    import imageio.v3 as iio

    from flows.sheet import LABEL_HEIGHT, TILE, sheet_entries

    sheet_path = faulty_batch["root"] / "sheet.png"
    assert main(["status", "--out", str(faulty_batch["out"]), "--sheet", str(sheet_path)]) == 1, "a stage failed"
    assert f"contact sheet of 2 assets: {sheet_path}" in capsys.readouterr().out
    sheet = iio.imread(sheet_path)
    width, height = TILE
    assert sheet.shape == (height + LABEL_HEIGHT, 2 * width, 3)
    green, red = sheet[:, :width], sheet[:, width:]  # sorted by asset id: green-box, red-cube
    assert (green[:, :3] == (200, 30, 30)).all(), "failed green-box framed in red"
    assert not (red[:, :3] == (200, 30, 30)).all(axis=-1).any()
    preview = red[:height, 4:-4]
    assert (preview < 250).any(axis=-1).mean() > 0.05, "red-cube's export preview is drawn"
    entries = {entry.asset_id: entry for entry in sheet_entries(faulty_batch["out"])}
    assert (entries["green-box"].state, entries["green-box"].failed) == ("failed at uv", True)
    assert (entries["red-cube"].state, entries["red-cube"].failed) == ("done", False)


@pytest.mark.slow
def test_running_again_recomputes_only_the_failed_stage_and_later_then_rerun_forces_one(faulty_batch, capsys):
    out = faulty_batch["out"]
    before = _commit_times(out)
    assert main(faulty_batch["args"]) == 0
    after = _commit_times(out)
    changed = sorted(k for k in after if before.get(k) != after[k])
    assert changed == ["green-box/export", "green-box/texture", "green-box/uv"]
    assert stage_states(out)["green-box"] == dict.fromkeys(GREEN_STAGES, "done")

    record = AssetRecord.load(out, "red-cube")
    assert all(entry["status"] == "reused" for entry in record.stages.values())
    asset_run = record.tracking["asset_run_id"]
    assert main(["rerun", "red-cube", "--stage", "texture", "--out", str(out)]) == 0
    rerun = _commit_times(out)
    assert sorted(k for k in rerun if rerun[k] != after[k]) == ["red-cube/export", "red-cube/texture"]

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    reruns = [r for r in _runs(client) if r.data.tags.get("rerun") == "true"]
    assert sorted(r.info.run_name for r in reruns) == ["export", "texture"]
    assert {r.data.tags["mlflow.parentRunId"] for r in reruns} == {asset_run}, "logged under the asset's run"
    assert "red-cube" in capsys.readouterr().out
    assert json.loads((out / "red-cube" / "asset.json").read_text())["status"] == "completed"


def test_prefect_retries_transient_stage_errors_but_not_bad_inputs(prefect_server, tiny, tmp_path, monkeypatch):
    from flows.catalog import CatalogRow
    from flows.flow import asset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    empty = tmp_path / "empty.obj"
    empty.write_text("v 0 0 0\n")
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, "flaky/mesh")
    for asset_id, mesh in (("flaky", CUBE), ("broken", empty)):
        state = asset(row=CatalogRow(asset_id, "a green cube", mesh=str(mesh)).to_dict(), out=str(out), overrides=tiny,
                      stage_retries=2, stage_retry_delay_s=0, return_state=True)
        assert state.is_failed()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["flaky/mesh", "broken/mesh"])))
    attempts = {run.name: run.run_count for run in runs}
    assert attempts["flaky/mesh"] == 3, "a transient error is retried stage_retries times"
    assert attempts["broken/mesh"] == 1, "a ValueError (bad input) is not retried"
    assert "holds no triangles" in AssetRecord.load(out, "broken").stages["mesh"]["error"]


def test_an_unreachable_mlflow_never_fails_a_stage(prefect_server, tiny, tmp_path, monkeypatch):
    from flows.catalog import CatalogRow
    from flows.flow import asset

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "out"
    state = asset(row=CatalogRow("offline", "a green cube", mesh=str(CUBE)).to_dict(), out=str(out), overrides=tiny,
                  stage_retries=0, return_state=True)
    assert state.is_completed()
    record = AssetRecord.load(out, "offline")
    assert stage_states(out)["offline"] == dict.fromkeys(GREEN_STAGES, "done")
    assert record.tracking["asset_run_id"] is None, "no run yet"
    assert any(f"127.0.0.1:{port}" in failure for failure in record.tracking["failures"]), record.tracking["failures"]
    pending = [path.read_text() for path in (out / ".tracking-pending").glob("*.txt")]
    assert pending == ["offline/asset.json"], "the record waits for `csd-asset sync-tracking`"


@pytest.mark.slow
def test_stage_pool_runs_stages_in_worker_processes_relaying_steps_and_keeping_error_causes(tiny, tmp_path):
    """`--parallel N > 1`: what `run_stage` needs from a worker — the stage's files, every step's
    metrics for MLflow, and the cause of a failure (a bad input must still not be retried)."""
    from flows.catalog import CatalogRow
    from flows.pipeline import StageFailed, plan_asset
    from flows.workers import StagePool, usable_cores

    plan = plan_asset(CatalogRow("pooled", "a red cube", seed=0), tmp_path / "out", overrides={**tiny, "nerf.steps": 3})
    pool = StagePool(2)
    try:
        assert pool.threads == max(1, usable_cores() // 2)
        steps = []
        outcome = pool.run(plan.stage("nerf"), False, lambda step, metrics: steps.append((step, metrics["loss"])))
        assert outcome.status == "ran" and (plan.stage("nerf").directory / "field.safetensors").is_file()
        assert [step for step, _ in steps] == [1, 2, 3] and all(loss > 0 for _, loss in steps)
        with pytest.raises(StageFailed, match="texture") as failure:
            pool.run(plan.stage("texture"), False)  # its uv input was never made
        assert isinstance(failure.value.__cause__, (ValueError, FileNotFoundError)), failure.value.__cause__
    finally:
        pool.close()
