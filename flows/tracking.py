"""MLflow tracking: batch → asset → stage runs, each stage with params, step metrics and files.

The tracking URI is `MLFLOW_TRACKING_URI` when set (an `mlflow server`), else an SQLite file
`<out>/mlflow.db` with artifacts under `<out>/mlartifacts`. Tracking never fails generation work:
every MLflow call is guarded, a failure is logged as a warning and kept in `Tracker.failures`,
which the asset record and the batch summary report. Once the server is unreachable the tracker
stops calling it (each call would wait out MLflow's HTTP retries while the GPU idles) and records
every later call as not uploaded; the next asset run connects afresh. Bound the wait for a dead
server with `MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `MLFLOW_HTTP_REQUEST_TIMEOUT` (set in prefect.yaml).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from flows.pipeline import PlannedStage, StageOutcome
from stages.config import config_to_dict, flatten

log = logging.getLogger(__name__)

DATABASE = "mlflow.db"
ARTIFACTS = "mlartifacts"
METRIC_EVERY = 10
"""Log the step metrics of every 10th step (and the first and last)."""
FLUSH_SECONDS = 30.0
"""Send buffered step metrics at least this often, so the UI shows live curves of long stages."""
REVIEWABLE = (".png", ".gif", ".jpg", ".jpeg", ".mp4", ".glb", ".gltf", ".obj", ".mtl", ".ply", ".json", ".yaml", ".txt")
"""Stage files logged as artifacts; weights and checkpoints (.safetensors, .pt) stay in the stage directory."""
_LOCK = threading.Lock()
"""One MLflow call at a time per process: SQLite has a single writer, and assets run in threads."""


def default_uri(out: Path) -> str:
    return f"sqlite:///{(Path(out) / DATABASE).resolve()}"


def tracking_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri(out)


def code_version() -> str:
    """The git commit of the checkout this package runs from, or `unknown`."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_link(uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """A browser link for a run on an MLflow server, else the run id (open it with `mlflow ui`)."""
    if not run_id:
        return "not logged"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return run_id


def _is_connection_error(error: BaseException) -> bool:
    """Whether the server could not be reached (as opposed to rejecting one request)."""
    import requests

    while error is not None:
        if isinstance(error, (requests.ConnectionError, requests.Timeout)):
            return True
        error = error.__cause__ or error.__context__
    return False


class Tracker:
    """Guarded MLflow client for one experiment. `Tracker.for_output(out, name)` for the default store."""

    def __init__(self, uri: str, experiment_name: str | None = None, experiment_id: str | None = None, artifact_location: str | None = None):
        self.uri = uri
        self.experiment_id = experiment_id
        self.failures: list[str] = []
        self._client = None
        self._unreachable = False
        try:
            with _LOCK:
                self._connect(experiment_name, artifact_location)
        except Exception as error:
            self._failed(f"connect to {uri}", error)

    @classmethod
    def for_output(cls, out: Path, experiment_name: str) -> "Tracker":
        uri = tracking_uri(out)
        # a server stores artifacts where it is configured to; a local database keeps them next to it
        local = not uri.startswith(("http://", "https://"))
        artifacts = (Path(out) / ARTIFACTS).resolve().as_uri() if local else None
        if uri == default_uri(out):
            Path(out).mkdir(parents=True, exist_ok=True)
        return cls(uri, experiment_name=experiment_name, artifact_location=artifacts)

    def context(self, parent_run_id: str | None) -> dict[str, Any]:
        """What a per-asset flow (possibly on another machine) needs to log under `parent_run_id`."""
        return {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": parent_run_id}

    def _connect(self, experiment_name: str | None, artifact_location: str | None) -> None:
        from mlflow import MlflowClient

        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=self.uri)
        if self.experiment_id is None:
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                try:
                    experiment = client.get_experiment(client.create_experiment(experiment_name, artifact_location=artifact_location))
                except MlflowException:
                    # another batch or worker created it first
                    experiment = client.get_experiment_by_name(experiment_name)
            self.experiment_id = experiment.experiment_id
        self._client = client

    def _guard(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """Call `fn`; on any error log a warning, remember it and return None."""
        if self._client is None or self._unreachable:
            self.failures.append(f"{what}: not sent, {self.uri} unreachable")
            return None
        try:
            with _LOCK:
                return fn(*args, **kwargs)
        except Exception as error:
            self._failed(what, error)
            self._unreachable = _is_connection_error(error)
            return None

    def _failed(self, what: str, error: Exception) -> None:
        log.warning("MLflow: %s failed (%s: %s); the pipeline goes on", what, type(error).__name__, error)
        self.failures.append(f"{what}: {type(error).__name__}: {error}")

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, Any] | None = None) -> str | None:
        tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id

        def create() -> str:
            return self._client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

        return self._guard(f"start run {name!r}", create)

    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if run_id:
            entries = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
            self._guard("set tags", self._client.log_batch, run_id, tags=entries)

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if not run_id:
            return
        entries = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(entries), 100):
            self._guard("log params", self._client.log_batch, run_id, params=entries[i : i + 100])

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
        self.log_history(run_id, {step: metrics})

    def log_history(self, run_id: str | None, history: dict[int, dict[str, float]]) -> None:
        """Metrics of several steps, `{step: {name: value}}`, in batches of MLflow's maximum size."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for step, metrics in sorted(history.items()) for k, v in metrics.items() if v is not None]
        for i in range(0, len(entries), 1000):
            if run_id:
                self._guard("log metrics", self._client.log_batch, run_id, metrics=entries[i : i + 1000])

    def log_files(self, run_id: str | None, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if run_id and Path(path).is_file():
                self._guard(f"upload {Path(path).name}", self._client.log_artifact, run_id, str(path), artifact_path)

    def log_text(self, run_id: str | None, text: str, name: str) -> None:
        if run_id:
            self._guard(f"upload {name}", self._client.log_text, run_id, text, name)

    def end_run(self, run_id: str | None, succeeded: bool) -> None:
        if run_id:
            self._guard("end run", self._client.set_terminated, run_id, "FINISHED" if succeeded else "FAILED")

    def stage_run(self, parent_run_id: str | None, stage: PlannedStage, tags: dict[str, Any], log_reused: bool = True) -> "StageRun":
        return StageRun(self, parent_run_id, stage, tags, log_reused)


class StageRun:
    """`with tracker.stage_run(asset_run, stage, tags) as run:` — pass `run.log_step` to the stage as
    its callback, then `run.finish(outcome)`. An exception ends the run FAILED with `error.txt`.

    The MLflow run starts at the first thing to log, so a reused stage leaves no run when
    `log_reused` is False (a stage rerun logs only the stages it recomputes)."""

    def __init__(self, tracker: Tracker, parent_run_id: str | None, stage: PlannedStage, tags: dict[str, Any], log_reused: bool):
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.stage = stage
        self.tags = {"stage": stage.name, "asset_id": stage.asset_id, "identity": stage.identity, **tags}
        self.log_reused = log_reused
        self._run_id: str | None = None
        self._started = False
        self._buffer: dict[int, dict[str, float]] = {}
        self._last: tuple[int, dict[str, float]] | None = None
        self._flushed_at = time.monotonic()
        self._failures_before = len(tracker.failures)

    @property
    def run_id(self) -> str | None:
        if not self._started:
            self._started = True
            self._run_id = self.tracker.start_run(self.stage.name, self.parent_run_id, self.tags)
            self.tracker.log_params(self._run_id, config_to_dict(self.stage.config))
        return self._run_id

    def __enter__(self) -> "StageRun":
        return self

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Stage callback: keep every METRIC_EVERY-th step's metrics; send them in batches."""
        self._last = (step, metrics)
        if step == 1 or step % METRIC_EVERY == 0:
            self._buffer[step] = metrics
        if sum(map(len, self._buffer.values())) >= 500 or time.monotonic() - self._flushed_at > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._last is not None:
            self._buffer.setdefault(*self._last)
        if self._buffer:
            self.tracker.log_history(self.run_id, self._buffer)
        self._buffer = {}
        self._flushed_at = time.monotonic()

    def finish(self, outcome: StageOutcome) -> None:
        """Log the result: summary metrics, timings, previews, reviewable files, config and stats."""
        if outcome.status == "reused" and not self.log_reused:
            return
        self.flush()
        outcome.tracking_run_id = self.run_id
        try:
            self._log_result(outcome)
        finally:
            outcome.tracking_failures = len(self.tracker.failures) - self._failures_before

    def _log_result(self, outcome: StageOutcome) -> None:
        result = outcome.result
        self.tracker.set_tags(self.run_id, {"status": outcome.status, "directory": result.directory})
        self.tracker.log_metrics(self.run_id, {**result.metrics, **{f"time_{k}": v for k, v in result.timings.items()}})
        if outcome.status != "ran":
            return
        directory = Path(result.directory)
        self.tracker.log_files(self.run_id, [directory / name for name in result.previews], "previews")
        files = sorted({directory / name for name in result.outputs.values()} - {directory / name for name in result.previews})
        # the resolved config is logged at the top level below
        reviewable = [f for f in files if f.suffix.lower() in REVIEWABLE and f.name != "config.yaml"]
        self.tracker.log_files(self.run_id, reviewable, "files")
        stats = {"identity": result.identity, "inputs": {k: str(v) for k, v in self.stage.inputs.items()},
                 "metrics": result.metrics, "timings": result.timings, "outputs": result.outputs}
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.stage.config), sort_keys=False))
            (Path(scratch) / "stats.json").write_text(json.dumps(stats, indent=2))
            self.tracker.log_files(self.run_id, [Path(scratch) / "config.yaml", Path(scratch) / "stats.json"])

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.flush()
            self.tracker.set_tags(self.run_id, {"status": "failed", "error": str(exc)[:5000]})
            self.tracker.log_text(self.run_id, str(exc), "error.txt")
        if self._started:
            self.tracker.end_run(self._run_id, exc is None)
