"""MLflow runs synced from the output root: batch → asset → stage runs made from the records and stage
folders, idempotently. "Down" is an SQLite store whose client calls raise a connection error. "Killed"
is a process that SIGKILLs itself inside a stage, as the OOM killer or a lost machine would end it."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from flows.catalog import CatalogRow
from flows.cli import main
from flows.pipeline import AssetRecord, BatchRecord, StageOutcome, plan_asset, run_asset, stage_states
from flows.store import open_store
from flows.tracking import KEY_TAG, PENDING, Tracker
from stages.common import StageResult, StageWorkspace

EXPERIMENT = "sync"
WRITES = ("create_run", "log_batch", "log_artifacts", "set_terminated", "update_run", "set_tag", "delete_run", "create_experiment")
ROOT = Path(__file__).parents[2]
CUBE = ROOT / "catalogs" / "meshes" / "cube.obj"


def _server_down(patch: pytest.MonkeyPatch, calls: tuple[str, ...] = ("get_experiment_by_name", "search_runs", *WRITES)) -> None:
    def refused(*args, **kwargs):
        raise requests.ConnectionError("connection refused")

    for name in calls:
        patch.setattr(MlflowClient, name, refused)


def _count_writes(patch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in WRITES:
        original = getattr(MlflowClient, name)
        patch.setattr(MlflowClient, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    return calls


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables made (seconds each time), copied by every test."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _root(tmp_path: Path, empty_store: Path) -> tuple:
    """A batch over one asset: nerf ran (folder with config, history, preview, weights), mesh failed, uv blocked."""
    store = open_store(tmp_path / "out")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    link = {"uri": uri, "experiment": EXPERIMENT, "artifact_location": (tmp_path / "artifacts").as_uri()}
    with StageWorkspace(store.local / "red" / "nerf", "nerf", "id-nerf") as workspace:
        (workspace.path / "config.yaml").write_text("steps: 12\nguidance:\n  method: csd\n")
        (workspace.path / "history.json").write_text(json.dumps([{"step": s, "loss": 1 / s} for s in range(1, 13)]))
        (workspace.path / "turntable.png").write_bytes(b"png")
        (workspace.path / "field.safetensors").write_bytes(b"weights")
        outputs = {"config": "config.yaml", "history": "history.json", "field": "field.safetensors", "preview": "turntable.png"}
        workspace.commit(StageResult("nerf", "", outputs, {"final_loss": 0.08}, {"total": 1.5}, ["turntable.png"]))
    stages = {"nerf": {"status": "ran", "identity": "id-nerf", "finished_at": "2026-01-01T00:01:00+00:00", "metrics": {"final_loss": 0.08}},
              "mesh": {"status": "failed", "identity": "id-mesh", "error": "stage 'mesh' failed: boom", "finished_at": "2026-01-01T00:02:00+00:00"},
              "uv": {"status": "blocked", "identity": "id-uv"}}
    asset = AssetRecord("red", {"asset_id": "red", "prompt": "a red cube"}, "toy-cpu", {"nerf.steps": 12}, "failed", stages,
                        {**link, "key": "batch/B1/red", "stage_prefix": "batch/B1/red", "parent_key": "batch/B1",
                         "tags": {"asset_id": "red", "prompt": "a red cube"}},
                        started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:02:00+00:00")
    asset.save(store)
    batch = BatchRecord("B1", "demo 2026-01-01", {**link, "key": "batch/B1"}, {"catalog": "demo.csv"}, {"assets": 1},
                        started_at="2026-01-01T00:00:00+00:00", status="failed", metrics={"assets_failed": 1}, summary="# summary\n",
                        assets={"red": dataclasses.asdict(asset)}, finished_at="2026-01-01T00:03:00+00:00")
    batch.save(store)
    return store, uri, link, batch.rel


def _state(uri: str) -> dict:
    """Every run by key: name, parent's key, status, end time, params, tags, metric histories, artifacts."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], max_results=1000)
    keys = {run.info.run_id: run.data.tags[KEY_TAG] for run in runs}
    assert len(set(keys.values())) == len(runs), f"a run was created twice: {sorted(keys.values())}"

    def artifacts(run_id: str, path: str | None = None) -> list[str]:
        return sorted(p for a in client.list_artifacts(run_id, path) for p in (artifacts(run_id, a.path) if a.is_dir else [a.path]))

    return {keys[run.info.run_id]: {
        "name": run.info.run_name, "parent": keys.get(run.data.tags.get("mlflow.parentRunId")), "status": run.info.status,
        "end": run.info.end_time, "params": run.data.params, "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        "metrics": {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics},
        "artifacts": artifacts(run.info.run_id)} for run in runs}


def test_syncing_a_root_three_times_with_the_server_down_once_gives_identical_runs_each_once(tmp_path, empty_store, monkeypatch, capsys):
    store, uri, link, batch = _root(tmp_path, empty_store)
    assert Tracker(uri, EXPERIMENT, link["artifact_location"]).sync(store, batch)
    first = _state(uri)
    assert set(first) == {"batch/B1", "batch/B1/red", "batch/B1/red/nerf", "batch/B1/red/mesh"}, "blocked uv has no run"
    nerf, mesh = first["batch/B1/red/nerf"], first["batch/B1/red/mesh"]
    assert (first["batch/B1/red"]["parent"], nerf["parent"], mesh["parent"]) == ("batch/B1", "batch/B1/red", "batch/B1/red")
    assert (first["batch/B1"]["status"], first["batch/B1/red"]["status"], nerf["status"], mesh["status"]) == ("FAILED",) * 2 + ("FINISHED", "FAILED")
    assert nerf["params"] == {"steps": "12", "guidance.method": "csd"}
    assert nerf["metrics"]["loss"] == [(1, 1.0), (10, 0.1), (12, 1 / 12)], "every 10th step, first and last"
    assert nerf["metrics"]["final_loss"] == [(0, 0.08)] and nerf["metrics"]["time_total"] == [(0, 1.5)]
    assert nerf["artifacts"] == ["config.yaml", "files/history.json", "previews/turntable.png", "result.json"], "no weights"
    assert mesh["tags"]["error"] == "stage 'mesh' failed: boom" and mesh["artifacts"] == ["error.txt"]
    assert first["batch/B1"]["artifacts"] == ["summary.md"] and first["batch/B1"]["metrics"] == {"assets_failed": [(0, 1.0)]}
    assert first["batch/B1/red"]["params"] == {"preset": "toy-cpu", "overrides.nerf.steps": "12", "stages": "nerf,mesh,uv"}
    assert MlflowClient(uri).get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"

    with monkeypatch.context() as patch:
        _server_down(patch)
        assert not Tracker(uri, EXPERIMENT).sync(store, batch), "down: not synced"
        assert store.glob(f"{PENDING}/*.txt"), "the record waits for sync-tracking"
        assert main(["sync-tracking", "--out", str(store.local)]) == 1
        assert "1 record(s) still not synced" in capsys.readouterr().out
    with monkeypatch.context() as patch:
        writes = _count_writes(patch)
        assert main(["sync-tracking", "--out", str(store.local)]) == 0
        assert Tracker(uri, EXPERIMENT).sync(store, batch)
    assert writes == [], "an unchanged root sends nothing"
    assert store.glob(f"{PENDING}/*.txt") == []
    assert _state(uri) == first


def test_a_sync_cut_short_completes_later_without_sending_anything_twice(tmp_path, empty_store, monkeypatch):
    store, uri, link, batch = _root(tmp_path, empty_store)
    reference_store, reference_uri, _, _ = _root(tmp_path / "reference", empty_store)
    assert Tracker(reference_uri, EXPERIMENT, link["artifact_location"]).sync(reference_store, batch)

    asset = "red/asset.json"
    with monkeypatch.context() as patch:  # the asset flow syncs before its batch run exists: it waits for its parent
        assert not Tracker(uri, EXPERIMENT, link["artifact_location"]).sync(store, asset)
        _server_down(patch, ("log_artifacts",))  # the server goes away as the first files are uploaded
        tracker = Tracker(uri, EXPERIMENT, link["artifact_location"])
        assert not tracker.sync(store, batch) and "connection refused" in tracker.failures[0]
    assert len(store.glob(f"{PENDING}/*.txt")) == 2
    assert main(["sync-tracking", "--out", str(store.local)]) == 0
    assert store.glob(f"{PENDING}/*.txt") == []
    expected, got = _state(reference_uri), _state(uri)
    for run in (*expected.values(), *got.values()):
        run["tags"].pop("directory", None), run["tags"].pop("csd_synced")  # where each root is, and so the digest
    assert got == expected


def test_a_rerun_adds_stage_runs_under_the_asset_run_and_duplicates_from_a_race_are_removed(tmp_path, empty_store):
    store, uri, link, batch = _root(tmp_path, empty_store)
    tracker = Tracker(uri, EXPERIMENT, link["artifact_location"])
    assert tracker.sync(store, batch)
    record = AssetRecord.load(store, "red")
    record.tracking.update(stage_prefix="batch/B1/red/rerun-R2", rerun=True)
    record.stages["nerf"]["status"] = "reused"
    record.stages["mesh"] = {"status": "ran", "identity": "id-mesh", "finished_at": "2026-01-02T00:00:00+00:00", "metrics": {}}
    record.status = "completed"
    record.save(store)
    client = MlflowClient(uri)
    twin = client.create_run(tracker.experiment_id, tags={KEY_TAG: "batch/B1/red"}, run_name="red")  # another process, same run
    assert tracker.sync(store, "red/asset.json")
    state = _state(uri)
    assert client.get_run(twin.info.run_id).info.lifecycle_stage == "deleted", "the newer duplicate goes"
    assert state["batch/B1/red/rerun-R2/mesh"]["parent"] == "batch/B1/red" and "batch/B1/red/rerun-R2/nerf" not in state
    assert state["batch/B1/red"]["status"] == "FINISHED" and state["batch/B1/red"]["tags"]["status"] == "completed"
    assert tracker.run_ids["batch/B1/red"] == client.get_run(tracker.run_ids["batch/B1/red"]).info.run_id != twin.info.run_id


def test_the_batch_summary_says_how_to_sync_what_is_missing(tmp_path, empty_store):
    from flows.flow import summary_markdown

    store, uri, link, _ = _root(tmp_path, empty_store)
    record = AssetRecord.load(store, "red")
    record.tracking["failures"] = ["red/asset.json: ConnectionError: connection refused"]
    markdown = summary_markdown("demo.csv", {"red": record}, Tracker(uri, EXPERIMENT), None, out=str(store.local))
    assert f"`csd-asset sync-tracking --out {store.local}`" in markdown
    assert "- red: 1 sync(s) failed; first problem: red/asset.json: ConnectionError" in markdown
    assert "not in MLflow yet" in markdown


def test_a_sqlite_store_keeps_artifacts_beside_it_and_the_link_names_the_experiment_or_lists_them_all(tmp_path, empty_store):
    from flows.tracking import ARTIFACTS, RUNS_VIEW, experiment_link

    store, uri, _, batch = _root(tmp_path, empty_store)
    tracker = Tracker(uri, EXPERIMENT)
    assert tracker.sync(store, batch)
    made = MlflowClient(uri).get_experiment_by_name(EXPERIMENT)
    assert (tracker.experiment_id, made.artifact_location) == (made.experiment_id, (tmp_path / ARTIFACTS).as_uri())
    assert experiment_link("http://127.0.0.1:5000/", "7") == f"http://127.0.0.1:5000/#/experiments/7{RUNS_VIEW}"
    assert experiment_link("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000/#/experiments", "never /experiments/None"


def test_a_running_stage_shows_its_points_live_and_the_final_sync_sends_none_twice(tmp_path, empty_store, monkeypatch):
    store, uri, link, batch = _root(tmp_path, empty_store)
    tracker = Tracker(uri, EXPERIMENT, link["artifact_location"])
    record = json.loads(store.read_text(batch))
    assert tracker.sync(store, batch, {**record, "assets": {}}), "the batch run, before its asset ran"
    running = {**record["assets"]["red"], "status": "running", "stages": {"nerf": {"status": "running", "identity": "id-nerf"}}}
    assert tracker.sync(store, "red/asset.json", running), "the asset run, as its first stage starts"
    client = MlflowClient(uri)

    def loss_in_mlflow() -> list:
        (run,) = client.search_runs([tracker.experiment_id], f"tags.{KEY_TAG} = 'batch/B1/red/nerf'")
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))

    live = tracker.live(running["tracking"], "nerf")
    live(1, {"loss": 1.0})
    live(2, {"loss": 0.5})
    assert loss_in_mlflow() == [(1, 1.0)], "step 1 is in the stage's run at once; step 2 is not a logged step"
    monkeypatch.setattr("flows.tracking.LIVE_SECONDS", 0.0)
    for step in range(3, 13):
        live(step, {"loss": 1 / step})
    assert loss_in_mlflow() == [(1, 1.0), (10, 0.1)], "every 10th step while the stage runs"
    assert tracker.sync(store, batch)
    assert loss_in_mlflow() == [(1, 1.0), (10, 0.1), (12, 1 / 12)], "the final sync adds the last point, none twice"
    assert len(_state(uri)) == 4, "the live run is the stage's run, not a second one"


def test_a_server_down_while_a_stage_runs_warns_once_and_the_stage_goes_on(tmp_path, empty_store, monkeypatch, caplog):
    store, uri, link, batch = _root(tmp_path, empty_store)
    tracker = Tracker(uri, EXPERIMENT, link["artifact_location"])
    monkeypatch.setattr("flows.tracking.LIVE_SECONDS", 0.0)
    _server_down(monkeypatch)
    live = tracker.live(json.loads(store.read_text("red/asset.json"))["tracking"], "nerf")
    for step in range(1, 31):
        live(step, {"loss": 1 / step})
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1 and "connection refused" in tracker.failures[0]


def _statuses(uri: str, experiment: str = EXPERIMENT) -> dict[str, str]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    return {run.data.tags[KEY_TAG]: run.info.status for run in runs}


def _asset_link(uri: str, key: str) -> dict:
    batch = key.split("/")[1]
    return {"uri": uri, "experiment": EXPERIMENT, "key": key, "stage_prefix": key, "parent_key": None, "tags": {"asset_id": "box"},
            "batch_record": f"batches/{batch}/batch.json"}


def _sync_as_the_flow_does(plan):
    """`run_asset`'s `saved`: each record to its own tracking link, as the asset flow does."""
    def saved(record):
        tracker = Tracker(record.tracking["uri"], record.tracking["experiment"])
        tracker.sync(plan.store, f"{record.asset_id}/asset.json", dataclasses.asdict(record))

    return saved


def _killed_in_uv(plan, link) -> None:
    """A process that runs the asset and is SIGKILLed inside its uv stage, after the stage's first live point."""
    def execute(stage, force):
        if stage.name == "uv":
            Tracker(link["uri"], link["experiment"]).live(link, "uv")(1, {"loss": 1.0})
            os.kill(os.getpid(), signal.SIGKILL)
        return StageOutcome(stage.name, "ran", stage.identity)

    run_asset(plan, execute=execute, tracking=link, saved=_sync_as_the_flow_does(plan))


def _kill_a_run(plan, link) -> int:
    """Run `_killed_in_uv` in a child process; its pid."""
    child = multiprocessing.get_context("fork").Process(target=_killed_in_uv, args=(plan, link))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    return child.pid


def _box(tmp_path, empty_store, tiny):
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    plan = plan_asset(CatalogRow("box", "a red cube", mesh=str(CUBE), line=2), tmp_path / "out", overrides=tiny)
    return plan, f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_killed_asset_run_ends_failed_at_sync_tracking_once_its_lock_is_free_and_a_later_attempt_reopens_it(
        tmp_path, empty_store, tiny, monkeypatch, capsys):
    plan, uri = _box(tmp_path, empty_store, tiny)
    link = _asset_link(uri, "batch/B1/box")
    pid = _kill_a_run(plan, link)
    out = str(plan.store.local)
    assert _statuses(uri) == {"batch/B1/box": "RUNNING", "batch/B1/box/mesh": "FINISHED", "batch/B1/box/uv": "RUNNING"}

    for owner in ("box/asset", "batches/B1/batch"):  # a live owner (on another machine, say), or its batch, which may resubmit it
        with plan.store.lock(plan.store.local / owner):
            assert main(["sync-tracking", "--out", out]) == 0
            assert _statuses(uri)["batch/B1/box"] == "RUNNING", f"{owner}.lock held: nothing is ended"
    assert main(["sync-tracking", "--out", out]) == 0
    assert _statuses(uri) == {"batch/B1/box": "FAILED", "batch/B1/box/mesh": "FINISHED", "batch/B1/box/uv": "FAILED"}
    assert capsys.readouterr().out.count("1 record(s) still running") == 2, "said by each sync while a lock was held"
    ended = _state(uri)
    assert "did not finish" in ended["batch/B1/box/uv"]["tags"]["error"] and f"pid {pid})" in ended["batch/B1/box/uv"]["tags"]["error"]
    assert "error.txt" in ended["batch/B1/box/uv"]["artifacts"]
    assert stage_states(out)["box"] == {"mesh": "stale", "uv": "failed", "texture": "blocked", "export": "blocked"}, \
        "csd-asset status agrees (mesh: the fake stage wrote no files)"
    with monkeypatch.context() as patch:
        writes = _count_writes(patch)
        assert main(["sync-tracking", "--out", out]) == 0
        assert Tracker(uri, EXPERIMENT).sync(plan.store, "box/asset.json")
    assert writes == [] and plan.store.glob(f"{PENDING}/*.txt") == [] and _state(uri) == ended, "syncing again changes nothing"

    seen = []

    def execute(stage, force):  # the batch's next attempt of the asset: the same MLflow runs, continued
        seen.append(_statuses(uri)["batch/B1/box"])
        return StageOutcome(stage.name, "ran", stage.identity)

    run_asset(plan, execute=execute, tracking=link, saved=_sync_as_the_flow_does(plan))
    assert set(seen) == {"RUNNING"}, "reopened while the attempt runs"
    assert set(_statuses(uri).values()) == {"FINISHED"} and len(_statuses(uri)) == 5


def test_a_new_run_of_an_asset_whose_last_run_was_killed_ends_that_runs_runs_before_its_own(tmp_path, empty_store, tiny):
    plan, uri = _box(tmp_path, empty_store, tiny)
    _kill_a_run(plan, _asset_link(uri, "batch/B1/box"))
    run_asset(plan, execute=lambda stage, force: StageOutcome(stage.name, "ran", stage.identity),
              tracking=_asset_link(uri, "batch/B2/box"), saved=_sync_as_the_flow_does(plan))  # no sync-tracking in between
    statuses = _statuses(uri)
    assert {k: v for k, v in statuses.items() if k.startswith("batch/B1/")} == \
        {"batch/B1/box": "FAILED", "batch/B1/box/mesh": "FINISHED", "batch/B1/box/uv": "FAILED"}
    assert {k: v for k, v in statuses.items() if k.startswith("batch/B2/")} == \
        {f"batch/B2/box{stage}": "FINISHED" for stage in ("", "/mesh", "/uv", "/texture", "/export")}
    assert AssetRecord.load(plan.store, "box").status == "completed" and plan.store.glob(f"{PENDING}/*.txt") == []


KILLED_BATCH = """
import os, signal, sys
import flows.flow

def killed(stage, force, callback=None):
    callback(1, {"loss": 1.0})  # the stage's run is made, RUNNING, as a live stage's is
    os.kill(os.getpid(), signal.SIGKILL)

flows.flow.execute_stage = killed
flows.flow.batch(catalog=sys.argv[1], out=sys.argv[2], stage_retries=0, experiment="killed")
"""


def test_a_batch_killed_mid_stage_leaves_no_run_running_after_sync_tracking(prefect_server, tmp_path, empty_store, monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "catalog.csv").write_text(f"asset_id,prompt,seed,mesh\nbox,a red cube,0,{CUBE}\n")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(empty_store, out / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")}
    child = subprocess.run([sys.executable, "-c", KILLED_BATCH, str(tmp_path / "catalog.csv"), str(out)], cwd=ROOT, timeout=300,
                           env={**env, "PREFECT_API_URL": PREFECT_API_URL.value()}, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    uri = f"sqlite:///{out / 'mlflow.db'}"
    killed = _statuses(uri, "killed")
    assert sorted(killed.values()) == ["RUNNING"] * 3, f"batch, asset and mesh stage runs, as the kill left them: {killed}"

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["sync-tracking", "--out", str(out)]) == 0
    assert "still running" not in capsys.readouterr().out
    assert _statuses(uri, "killed") == dict.fromkeys(killed, "FAILED")
    (batch,) = [json.loads(p.read_text()) for p in out.glob("batches/*/batch.json")]
    assert batch["status"] == "failed" and "did not finish" in batch["tags"]["error"] and "did not finish" in batch["summary"]
    record = AssetRecord.load(out, "box")
    assert record.status == "failed" and "stage 'mesh' of asset 'box' did not finish" in record.stages["mesh"]["error"]
    with monkeypatch.context() as patch:
        writes = _count_writes(patch)
        assert main(["sync-tracking", "--out", str(out)]) == 0
        tracker = Tracker(uri, "killed")
        assert tracker.sync(open_store(out), "box/asset.json") and tracker.sync(open_store(out), f"batches/{batch['batch_id']}/batch.json")
    assert writes == [] and not list(out.glob(f"{PENDING}/*.txt")), "syncing again changes nothing"


def test_a_batch_ends_the_record_of_an_asset_whose_every_attempt_crashed(prefect_server, tmp_path, empty_store, monkeypatch):
    import flows.flow

    def every_attempt_crashed(row, out, tracking, **parameters):
        """What `submit_asset` leaves when the asset's last attempt crashed too: its record running, its stage's
        run live in MLflow, no hand-off copy for the batch, and no process (no lock held)."""
        plan = plan_asset(CatalogRow.from_dict(row), out)
        key = f"{tracking['key']}/{row['asset_id']}"
        link = {**tracking, "key": key, "stage_prefix": key, "parent_key": tracking["key"], "tags": {}}
        record = AssetRecord.start(plan, link)
        record.stages["mesh"]["status"] = "running"
        record.save(plan.store)
        tracker = Tracker(link["uri"], link["experiment"])
        assert tracker.sync(plan.store, "box/asset.json", dataclasses.asdict(record))
        tracker.live(link, "mesh")(1, {"loss": 1.0})

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(flows.flow, "asset", every_attempt_crashed)
    (tmp_path / "catalog.csv").write_text(f"asset_id,prompt,seed,mesh\nbox,a red cube,0,{CUBE}\n")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(empty_store, out / "mlflow.db")
    state = flows.flow.batch(catalog=str(tmp_path / "catalog.csv"), out=str(out), experiment=EXPERIMENT, return_state=True)
    assert state.is_failed()
    statuses = _statuses(f"sqlite:///{out / 'mlflow.db'}")
    assert sorted(statuses.values()) == ["FAILED"] * 3, f"batch, asset and its stage: no sync-tracking needed: {statuses}"
    record = AssetRecord.load(out, "box")
    assert record.status == "failed" and "stage 'mesh' of asset 'box' did not finish" in record.stages["mesh"]["error"]
    assert not list(out.glob(f"{PENDING}/*.txt"))
