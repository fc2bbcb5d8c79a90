"""The tracking spool: MLflow calls that cannot be sent are spooled to disk and replayed later.

"Down" is a port nobody listens on (`http://127.0.0.1:9`, no HTTP retries), or an SQLite store whose
client calls are made to raise a connection error; "back" is that SQLite store answering again."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from flows.cli import main
from flows.tracking import PENDING, RUN_IDS, SPOOL, Tracker, replay_spool

DOWN = "http://127.0.0.1:9"


@pytest.fixture
def offline(monkeypatch):
    """Fail fast on the dead URI: one attempt, a short timeout."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


CLIENT_CALLS = ("get_experiment_by_name", "create_experiment", "get_run", "create_run", "log_batch", "log_artifact",
                "log_text", "set_terminated")
"""The MLflow client calls the tracker and the replay make."""


def _server_down(patch: pytest.MonkeyPatch, calls: tuple[str, ...] = CLIENT_CALLS) -> None:
    """These client calls fail as if the server had gone away."""

    def refused(*args, **kwargs):
        raise requests.ConnectionError("connection refused")

    for name in calls:
        patch.setattr(MlflowClient, name, refused)


def _log_batch_and_stage(tracker: Tracker) -> tuple[str | None, str | None]:
    """What a batch logs: a batch run and a nested stage run with params, step metrics, a temporary
    file (like StageRun's config.yaml, gone before any replay), text, and both run ends."""
    batch = tracker.start_run("batch", tags={"catalog": "demo.csv"})
    stage = tracker.start_run("nerf", parent_run_id=batch, tags={"stage": "nerf"})
    tracker.log_params(stage, {"nerf": {"steps": 12}, "prompt": "a red cube"})
    tracker.log_history(stage, {1: {"loss": 0.5}, 10: {"loss": 0.25}})
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "config.yaml").write_text("steps: 12\n")
        tracker.log_files(stage, [Path(scratch) / "config.yaml"], "files")
    tracker.log_text(batch, "# summary\n", "summary.md")
    tracker.end_run(stage, succeeded=False)
    tracker.end_run(batch, succeeded=True)
    return batch, stage


def _spool_offline(tmp_path: Path) -> tuple[Path, str, str]:
    """A batch and stage logged while the server is down, by a tracker that is done (its spool file unlocked)."""
    spool = tmp_path / "spool"
    tracker = Tracker(DOWN, experiment_name="spooled", artifact_location=(tmp_path / "artifacts").as_uri(), spool_dir=spool)
    batch, stage = _log_batch_and_stage(tracker)
    assert batch.startswith(PENDING) and stage.startswith(PENDING)
    assert len(tracker.failures) == 9 and all("127.0.0.1:9" in failure for failure in tracker.failures), tracker.failures
    tracker.close()
    return spool, batch, stage


def _runs(client: MlflowClient, experiment: str) -> dict:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    names = [run.info.run_name for run in runs]
    assert len(names) == len(set(names)), f"a run was created twice: {names}"
    return {run.info.run_name: run for run in runs}


def _loss(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]


def _left_in(spool: Path) -> list[str]:
    """Spool files, send markers and copied files still in the spool."""
    copied = [p for p in (spool / "files").rglob("*") if p.is_file()]
    return sorted(p.name for p in [*spool.glob("*.jsonl"), *spool.glob("*.sent"), *copied])


def test_runs_spooled_while_the_server_is_down_are_replayed_with_parents_params_metrics_and_files(tmp_path, offline):
    spool, batch, stage = _spool_offline(tmp_path)
    assert len(list(spool.glob("*.jsonl"))) == 1
    assert [p.read_text() for p in (spool / "files").rglob("config.yaml")] == ["steps: 12\n"], "the temporary file is kept"
    replayed_at = time.time() * 1000
    report = replay_spool(spool, uri=_sqlite(tmp_path))

    client = MlflowClient(_sqlite(tmp_path))
    runs = _runs(client, "spooled")
    assert report.runs == {batch: runs["batch"].info.run_id, stage: runs["nerf"].info.run_id}
    assert json.loads((spool / RUN_IDS).read_text()) == report.runs
    assert client.get_experiment_by_name("spooled").tags["mlflow.experimentKind"] == "custom_model_development"
    nerf = runs["nerf"]
    assert nerf.data.tags["mlflow.parentRunId"] == runs["batch"].info.run_id
    assert nerf.data.tags["stage"] == "nerf" and runs["batch"].data.tags["catalog"] == "demo.csv"
    assert nerf.data.params == {"nerf.steps": "12", "prompt": "a red cube"}
    assert _loss(client, nerf.info.run_id) == [(1, 0.5), (10, 0.25)]
    config = client.download_artifacts(nerf.info.run_id, "files/config.yaml", str(tmp_path / "download"))
    assert Path(config).read_text() == "steps: 12\n"
    summary = client.download_artifacts(runs["batch"].info.run_id, "summary.md", str(tmp_path / "download"))
    assert Path(summary).read_text() == "# summary\n"
    assert (nerf.info.status, runs["batch"].info.status) == ("FAILED", "FINISHED")
    assert nerf.info.start_time < replayed_at and nerf.info.end_time < replayed_at, "times of the run, not of the replay"
    assert (report.sent, report.pending, report.rejected) == (9 - 1, {}, []), "every call but the connect"
    assert _left_in(spool) == []

    again = replay_spool(spool, uri=_sqlite(tmp_path))
    assert (again.sent, again.runs, again.done) == (0, {}, [])
    assert len(_runs(client, "spooled")) == 2


def test_a_replay_cut_short_keeps_the_file_and_resumes_without_sending_anything_twice(tmp_path, offline, monkeypatch):
    spool, batch, stage = _spool_offline(tmp_path)
    (name,) = [p.name for p in spool.glob("*.jsonl")]
    still_down = replay_spool(spool, uri=DOWN)
    assert (still_down.sent, still_down.pending, still_down.unreachable) == (0, {name: f"{DOWN} unreachable"}, {DOWN})

    with monkeypatch.context() as patch:  # the server goes away again as the first file is uploaded
        _server_down(patch, ("log_artifact",))
        cut = replay_spool(spool, uri=_sqlite(tmp_path))
    assert cut.sent == 4 and name in cut.pending, "both runs, the params and the metrics went before the file"
    assert (spool / name).exists() and (spool / name).with_suffix(".sent").read_text() == "4"

    rest = replay_spool(spool, uri=_sqlite(tmp_path))
    assert (rest.sent, rest.runs, rest.done) == (4, {}, [name]), "the file, the text and both run ends"
    client = MlflowClient(_sqlite(tmp_path))
    runs = _runs(client, "spooled")
    assert _loss(client, runs["nerf"].info.run_id) == [(1, 0.5), (10, 0.25)]
    assert runs["nerf"].data.tags["mlflow.parentRunId"] == runs["batch"].info.run_id
    assert [a.path for a in client.list_artifacts(runs["nerf"].info.run_id, "files")] == ["files/config.yaml"]
    assert runs["batch"].info.status == "FINISHED" and _left_in(spool) == []


def test_calls_after_the_server_went_down_are_replayed_onto_the_run_created_before(tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    tracker = Tracker(_sqlite(tmp_path), experiment_name="partial", artifact_location=(tmp_path / "artifacts").as_uri(),
                      spool_dir=spool)
    asset = tracker.start_run("red-cube")
    tracker.log_metrics(asset, {"loss": 0.5}, step=1)
    with monkeypatch.context() as patch:
        _server_down(patch)
        tracker.log_metrics(asset, {"loss": 0.25}, step=10)
        stage = tracker.start_run("nerf", parent_run_id=asset)
        tracker.log_params(stage, {"steps": 12})
        tracker.end_run(stage, succeeded=True)
        tracker.end_run(asset, succeeded=True)
    assert not asset.startswith(PENDING) and stage.startswith(PENDING)
    (path,) = spool.glob("*.jsonl")
    entries = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [entry.get("run") or entry["parent"] for entry in entries] == [asset, asset, stage, stage, asset]
    tracker.close()

    report = replay_spool(spool)  # to the store the file was written for, which answers again
    client = MlflowClient(_sqlite(tmp_path))
    runs = _runs(client, "partial")
    assert runs["red-cube"].info.run_id == asset and report.runs == {stage: runs["nerf"].info.run_id}
    assert _loss(client, asset) == [(1, 0.5), (10, 0.25)]
    assert runs["nerf"].data.tags["mlflow.parentRunId"] == asset and runs["nerf"].data.params == {"steps": "12"}
    assert runs["red-cube"].info.status == "FINISHED" and runs["nerf"].info.status == "FINISHED"
    assert _left_in(spool) == []


def test_a_tracker_that_reaches_the_server_uploads_what_earlier_trackers_spooled(tmp_path, monkeypatch):
    spool, uri, artifacts = tmp_path / "spool", _sqlite(tmp_path), (tmp_path / "artifacts").as_uri()
    with monkeypatch.context() as patch:
        _server_down(patch)
        earlier = Tracker(uri, experiment_name="auto", artifact_location=artifacts, spool_dir=spool)
        asset = earlier.start_run("red-cube")
        earlier.end_run(asset, succeeded=True)
    Tracker(uri, experiment_name="auto", artifact_location=artifacts, spool_dir=spool)  # connects while the earlier tracker still writes its file
    assert len(list(spool.glob("*.jsonl"))) == 1, "a file is not replayed while its tracker lives"
    earlier.close()

    # as a rerun of an asset whose asset.json holds the placeholder: no experiment, parent not created yet
    later = Tracker(uri, spool_dir=spool)
    assert _left_in(spool) == []
    real = json.loads((spool / RUN_IDS).read_text())[asset]
    stage = later.start_run("texture", parent_run_id=asset)
    assert later.failures == [] and not stage.startswith(PENDING)
    client = MlflowClient(uri)
    assert client.get_run(real).info.status == "FINISHED" and client.get_run(real).info.run_name == "red-cube"
    assert client.get_run(stage).data.tags["mlflow.parentRunId"] == real
    assert client.get_run(stage).info.experiment_id == client.get_experiment_by_name("auto").experiment_id


def test_sync_tracking_exits_1_while_logs_stay_pending_and_0_once_uploaded(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with monkeypatch.context() as patch:
        _server_down(patch)
        tracker = Tracker.for_output(out, "cli")
        assert tracker.start_run("red-cube").startswith(PENDING)
        tracker.close()
        assert main(["sync-tracking", "--out", str(out)]) == 1
    assert "unreachable" in capsys.readouterr().out
    assert main(["sync-tracking", "--out", str(out)]) == 0
    assert "1 run(s) created, 1 entr(ies) sent, 1 spool file(s) uploaded, 0 pending" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert list(_runs(client, "cli")) == ["red-cube"] and _left_in(out / SPOOL) == []


def test_the_batch_summary_says_where_the_logs_wait_and_how_to_upload_them(tmp_path, offline, monkeypatch):
    from flows.flow import summary_markdown

    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    tracker = Tracker.for_output(out, "summary")
    batch = tracker.start_run("batch")
    markdown = summary_markdown("demo.csv", {}, tracker, batch)
    assert f"`{out / SPOOL}`" in markdown and f"`csd-asset sync-tracking --out {out}`" in markdown
    assert f"batch run {batch} (in the tracking spool, not uploaded yet)" in markdown
    assert "- batch run: 2 call(s)" in markdown


# starts, stops and restarts a real MLflow server: ~1 min
@pytest.mark.slow
def test_logs_spooled_while_the_mlflow_server_was_stopped_reach_it_when_the_next_run_connects(tmp_path, offline, monkeypatch):
    from servers import free_port, stop, wait_healthy

    uri = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1",
               "--backend-store-uri", _sqlite(tmp_path), "--artifacts-destination", str(tmp_path / "mlartifacts")]

    def start() -> subprocess.Popen:
        server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(f"{uri}/health", server)
        return server

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out, server = tmp_path / "out", start()
    try:
        tracker = Tracker.for_output(out, "server")
        asset = tracker.start_run("red-cube")
        tracker.log_metrics(asset, {"loss": 0.5}, step=1)
        stop(server)
        tracker.log_metrics(asset, {"loss": 0.25}, step=10)
        stage = tracker.start_run("nerf", parent_run_id=asset)
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "stats.json").write_text('{"steps": 12}')
            tracker.log_files(stage, [Path(scratch) / "stats.json"])
        tracker.end_run(stage, succeeded=True)
        tracker.end_run(asset, succeeded=True)
        tracker.close()
        assert stage.startswith(PENDING) and len(tracker.failures) == 5, tracker.failures

        server = start()
        assert Tracker.for_output(out, "server").failures == [], "the next run connects and replays the spool"
        client = MlflowClient(uri)
        runs = _runs(client, "server")
        assert runs["red-cube"].info.run_id == asset and runs["red-cube"].info.status == "FINISHED"
        assert _loss(client, asset) == [(1, 0.5), (10, 0.25)]
        assert runs["nerf"].data.tags["mlflow.parentRunId"] == asset and runs["nerf"].info.status == "FINISHED"
        stats = client.download_artifacts(runs["nerf"].info.run_id, "stats.json", str(tmp_path / "download"))
        assert json.loads(Path(stats).read_text()) == {"steps": 12}
        assert _left_in(out / SPOOL) == []
    finally:
        stop(server)
