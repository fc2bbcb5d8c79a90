"""MLflow tracking: batch → asset → stage runs, each stage with params, step metrics and files.

The tracking URI is `MLFLOW_TRACKING_URI` when set (an `mlflow server`), else an SQLite file
`<out>/mlflow.db` with artifacts under `<out>/mlartifacts`. Tracking never fails generation work:
every MLflow call is guarded, a failure is logged as a warning and kept in `Tracker.failures`,
which the asset record and the batch summary report. Once the server is unreachable the tracker
stops calling it (each call would wait out MLflow's HTTP retries while the GPU idles); the next
asset run connects afresh. Bound the wait for a dead server with `MLFLOW_HTTP_REQUEST_MAX_RETRIES` /
`MLFLOW_HTTP_REQUEST_TIMEOUT` (set in prefect.yaml).

A call that fails or is not sent is not lost: it goes to the tracker's spool file
`<out>/.tracking-spool/<time>-<pid>-<id>.jsonl` (a header line, then one entry a line, appended and
flushed one by one so that a crash keeps what was written), with copies of the files to upload under
`files/` (the config and stats files are temporary). A run that could not be created gets a
placeholder id `pending-<hex>`, which its later calls, its child runs and `asset.json` use.

`replay_spool` uploads a spool: `csd-asset sync-tracking --out OUT` by hand, and every tracker that
reaches its server does it for what earlier trackers spooled for that server. It creates the runs of
placeholders (parents first) and records `placeholder → real id` in `run-ids.json` (so a rerun of an
asset whose `asset.json` holds a placeholder logs under the real run), sends the other entries in
order and removes a spool file once all of it is sent. `<file>.sent` counts the entries sent, so a
replay cut short by the server going down again resumes where it stopped; an entry is sent twice only
when a replay dies between sending it and counting it. A live tracker keeps an exclusive `flock` on
its spool file, and a replay skips a file it cannot lock, so a file is never replayed while it grows
or by two replays at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from flows.pipeline import PlannedStage, StageOutcome
from stages.common import atomic_write_text
from stages.config import config_to_dict, flatten

log = logging.getLogger(__name__)

DATABASE = "mlflow.db"
ARTIFACTS = "mlartifacts"
SPOOL = ".tracking-spool"
"""Folder of the output root that holds what could not be sent to MLflow, until `replay_spool` sends it."""
PENDING = "pending-"
"""Prefix of the placeholder id of a run that is spooled, not created yet."""
RUN_IDS = "run-ids.json"
"""`{placeholder: real run id}` of the replayed runs, in the spool folder ("" for a run the server refused)."""
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


def default_spool(out: Path) -> Path:
    return Path(out) / SPOOL


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


# MLflow 3.17's UI picks its page type from the link's `workflowType` (else the browser's last choice,
# else GenAI traces): without it our runs open under "Evaluations" (tests/flows/test_mlflow_ui.py)
RUNS_VIEW = "?workflowType=machine_learning"


def experiment_link(server: str, experiment_id: str | None) -> str:
    """The experiment's runs table on an MLflow server (or `mlflow ui`) at `server`."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}{RUNS_VIEW}"


def run_link(uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """A browser link for a run on an MLflow server, else the run id (open it with `mlflow ui`)."""
    if not run_id:
        return "not logged"
    if run_id.startswith(PENDING):
        return f"{run_id} (in the tracking spool, not uploaded yet)"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{RUNS_VIEW}"
    return run_id


def _is_connection_error(error: BaseException) -> bool:
    """Whether the server could not be reached (as opposed to rejecting one request)."""
    import requests

    while error is not None:
        if isinstance(error, (requests.ConnectionError, requests.Timeout)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _now_ms() -> int:
    return int(time.time() * 1000)


# MLflow 3's UI opens an experiment on the page its kind names; without it, on the GenAI traces overview
# (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT = "custom_model_development" → the runs table)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client, name: str | None, artifact_location: str | None) -> str:
    """The id of experiment `name`, created (with `artifact_location`) when it does not exist."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
        except MlflowException:
            # another batch or worker created it first
            experiment = client.get_experiment_by_name(name)
    if any(experiment.tags.get(key) != value for key, value in EXPERIMENT_TAGS.items()):
        for key, value in EXPERIMENT_TAGS.items():  # an experiment made before the tag existed
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _send(client, entry: dict[str, Any]) -> str | None:
    """Make the MLflow call an entry describes (its run ids real); returns the id of a created run.

    Live calls and the spool's replay both go through here, so a replayed entry does what the call
    would have done. Entries: `create_run` (placeholder, name, parent, tags, experiment_id, time),
    `log_batch` (run, tags | params | metrics `[[key, value, timestamp ms, step]]`), `log_artifact`
    (run, path, artifact_path), `log_text` (run, text, name), `set_terminated` (run, status, time)."""
    from mlflow.entities import Metric, Param, RunTag

    op = entry["op"]
    if op == "create_run":
        tags = {**entry["tags"], "mlflow.parentRunId": entry["parent"]} if entry["parent"] else entry["tags"]
        # a run spooled before its tracker knew the experiment (a rerun under a placeholder) goes where its parent is
        experiment_id = entry["experiment_id"] or client.get_run(entry["parent"]).info.experiment_id
        return client.create_run(experiment_id, start_time=entry["time"], tags=tags, run_name=entry["name"]).info.run_id
    if op == "log_batch":
        client.log_batch(entry["run"], metrics=[Metric(*metric) for metric in entry.get("metrics", [])],
                         params=[Param(k, v) for k, v in entry.get("params", {}).items()],
                         tags=[RunTag(k, v) for k, v in entry.get("tags", {}).items()])
    elif op == "log_artifact":
        client.log_artifact(entry["run"], entry["path"], entry["artifact_path"])
    elif op == "log_text":
        client.log_text(entry["run"], entry["text"], entry["name"])
    elif op == "set_terminated":
        client.set_terminated(entry["run"], entry["status"], end_time=entry["time"])
    else:
        raise ValueError(f"unknown tracking entry {op!r}; valid: create_run, log_batch, log_artifact, log_text, set_terminated")
    return None


def _placeholders(entry: dict[str, Any]) -> list[str]:
    """The placeholder ids an entry names: its run's, and for a run creation its parent's."""
    return [entry[key] for key in ("run", "parent") if str(entry.get(key) or "").startswith(PENDING)]


def _resolve(entry: dict[str, Any], run_ids: dict[str, str]) -> dict[str, Any] | None:
    """`entry` with its placeholder ids replaced by the real run ids; None while one has no real run."""
    resolved = dict(entry)
    for key in ("run", "parent"):
        if str(entry.get(key) or "").startswith(PENDING):
            if not run_ids.get(entry[key]):
                return None
            resolved[key] = run_ids[entry[key]]
    return resolved


def _load_run_ids(spool_dir: Path) -> dict[str, str]:
    path = Path(spool_dir) / RUN_IDS
    return json.loads(path.read_text()) if path.exists() else {}


def _record_run_id(spool_dir: Path, placeholder: str, run_id: str) -> None:
    """Add `placeholder → run_id` to the spool's mapping; under a lock, as replays in other processes add theirs."""
    with open(Path(spool_dir) / f"{RUN_IDS}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run_ids = _load_run_ids(spool_dir)
        run_ids[placeholder] = run_id
        atomic_write_text(Path(spool_dir) / RUN_IDS, json.dumps(run_ids, indent=1))


class Tracker:
    """Guarded MLflow client for one experiment. `Tracker.for_output(out, name)` for the default store.

    With a `spool_dir`, what cannot be sent is spooled there (see the module docstring), and a tracker
    that connects uploads what earlier trackers spooled for its server."""

    def __init__(self, uri: str, experiment_name: str | None = None, experiment_id: str | None = None,
                 artifact_location: str | None = None, spool_dir: Path | None = None):
        self.uri = uri
        self.experiment_name = experiment_name
        self.experiment_id = experiment_id
        self.artifact_location = artifact_location
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.failures: list[str] = []
        self._client = None
        self._unreachable = False
        # named now, created at the first entry: names sort like the trackers' start, so parents come first
        self._spool_path = self._new_spool_path()
        self._spool = None
        self._spooled = 0
        try:
            with _LOCK:
                self._connect()
        except Exception as error:
            self._failed(f"connect to {uri}", error)
        else:
            self._replay_earlier()

    @classmethod
    def for_output(cls, out: Path, experiment_name: str) -> "Tracker":
        uri = tracking_uri(out)
        # a server stores artifacts where it is configured to; a local database keeps them next to it
        local = not uri.startswith(("http://", "https://"))
        artifacts = (Path(out) / ARTIFACTS).resolve().as_uri() if local else None
        if uri == default_uri(out):
            Path(out).mkdir(parents=True, exist_ok=True)
        return cls(uri, experiment_name=experiment_name, artifact_location=artifacts, spool_dir=default_spool(out))

    def close(self) -> None:
        """Release the spool file to replays (a live tracker keeps it locked: it may still grow). Calls
        after this go to a new spool file. A tracker that is never closed releases it when collected."""
        with _LOCK:
            if self._spool is not None:
                self._spool.close()
                self._spool = None
                self._spool_path = self._new_spool_path()

    def _new_spool_path(self) -> Path | None:
        if self.spool_dir is None:
            return None
        return self.spool_dir / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"

    def context(self, parent_run_id: str | None) -> dict[str, Any]:
        """What a per-asset flow (possibly on another machine) needs to log under `parent_run_id`."""
        return {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": parent_run_id}

    def _connect(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        # without a name (a rerun under a run that is still a placeholder) runs go to their parent's experiment
        if self.experiment_id is None and self.experiment_name is not None:
            self.experiment_id = _experiment_id(client, self.experiment_name, self.artifact_location)
        self._client = client

    def _replay_earlier(self) -> None:
        """Upload what earlier trackers spooled for this server. Never raises: the pipeline goes on
        without it, and the files stay for the next tracker or `csd-asset sync-tracking`."""
        if self.spool_dir is None or not self.spool_dir.is_dir():
            return
        try:
            report = replay_spool(self.spool_dir, written_for=self.uri)
        except Exception as error:
            log.warning("MLflow: replaying %s failed (%s: %s); the pipeline goes on", self.spool_dir, type(error).__name__, error)
            return
        # the replay found the server down: spool from the start instead of waiting for it once more
        self._unreachable = self.uri in report.unreachable
        if report.sent or report.rejected:
            log.info("MLflow: uploaded %d spooled entr(ies) from %s (%d refused, %d file(s) still pending)",
                     report.sent, self.spool_dir, len(report.rejected), len(report.pending))

    def _call(self, what: str, entry: dict[str, Any]) -> str | None:
        """Send `entry` (see `_send`). When it cannot be sent (server unreachable, the call fails, or it
        names a run that is still a placeholder), record it in `failures` and the spool. Returns a created
        run's id, or the placeholder of a spooled run creation; never raises."""
        if self._client is None or self._unreachable:
            return self._not_sent(what, entry, f"{self.uri} unreachable")
        run_ids = _load_run_ids(self.spool_dir) if self.spool_dir is not None and _placeholders(entry) else {}
        resolved = _resolve(entry, run_ids)
        if resolved is None:
            return self._not_sent(what, entry, f"run {_placeholders(entry)[0]} is not created yet")
        try:
            with _LOCK:
                return _send(self._client, resolved)
        except Exception as error:
            self._failed(what, error)
            self._unreachable = _is_connection_error(error)
            return self._spool_entry(entry)

    def _not_sent(self, what: str, entry: dict[str, Any], why: str) -> str | None:
        self.failures.append(f"{what}: not sent, {why}")
        return self._spool_entry(entry)

    def _failed(self, what: str, error: Exception) -> None:
        log.warning("MLflow: %s failed (%s: %s); the pipeline goes on", what, type(error).__name__, error)
        self.failures.append(f"{what}: {type(error).__name__}: {error}")

    def _spool_entry(self, entry: dict[str, Any]) -> str | None:
        """Append `entry` to this tracker's spool file; returns the placeholder of a spooled run creation."""
        if self._spool_path is None:
            return None
        try:
            with _LOCK:
                if entry["op"] == "log_artifact":
                    entry = {**entry, "path": self._keep(Path(entry["path"]))}
                if self._spool is None:
                    self._spool = self._open_spool()
                self._spool.write(json.dumps(entry) + "\n")
                self._spool.flush()
                self._spooled += 1
        except Exception as error:  # a full disk, a file to upload that vanished: tracking never fails the work
            log.warning("MLflow: could not spool %s to %s (%s: %s); it is lost", entry["op"], self.spool_dir, type(error).__name__, error)
            return None
        return entry.get("placeholder")

    def _open_spool(self) -> TextIO:
        """Create the spool file, header first, locked for as long as this tracker lives; it appears under
        its `.jsonl` name only once locked, so no replay takes it meanwhile."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        creating = self._spool_path.with_suffix(".creating")
        spool = open(creating, "x", encoding="utf-8")
        fcntl.flock(spool, fcntl.LOCK_EX)
        weakref.finalize(self, spool.close)
        spool.write(json.dumps({"uri": self.uri, "experiment_name": self.experiment_name,
                                "artifact_location": self.artifact_location}) + "\n")
        spool.flush()
        os.replace(creating, self._spool_path)
        return spool

    def _keep(self, path: Path) -> str:
        """Copy a file to upload into the spool (the original may be temporary); its path in the spool."""
        kept = Path("files") / self._spool_path.stem / str(self._spooled) / path.name
        (self.spool_dir / kept).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.spool_dir / kept)
        return kept.as_posix()

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, Any] | None = None) -> str | None:
        """The new run's id; a placeholder (`pending-…`) when the run is spooled, None when it is lost."""
        entry = {"op": "create_run", "placeholder": f"{PENDING}{uuid.uuid4().hex}", "name": name, "parent": parent_run_id,
                 "tags": {k: str(v) for k, v in (tags or {}).items() if v is not None},
                 "experiment_id": self.experiment_id, "time": _now_ms()}
        return self._call(f"start run {name!r}", entry)

    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        if run_id:
            entry = {"op": "log_batch", "run": run_id, "tags": {k: str(v) for k, v in tags.items() if v is not None}}
            self._call("set tags", entry)

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not run_id:
            return
        entries = [(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(entries), 100):
            self._call("log params", {"op": "log_batch", "run": run_id, "params": dict(entries[i : i + 100])})

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
        self.log_history(run_id, {step: metrics})

    def log_history(self, run_id: str | None, history: dict[int, dict[str, float]]) -> None:
        """Metrics of several steps, `{step: {name: value}}`, in batches of MLflow's maximum size."""
        now = _now_ms()
        entries = [[k, float(v), now, step] for step, metrics in sorted(history.items())
                   for k, v in metrics.items() if v is not None]
        for i in range(0, len(entries), 1000):
            if run_id:
                self._call("log metrics", {"op": "log_batch", "run": run_id, "metrics": entries[i : i + 1000]})

    def log_files(self, run_id: str | None, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if run_id and Path(path).is_file():
                entry = {"op": "log_artifact", "run": run_id, "path": str(path), "artifact_path": artifact_path}
                self._call(f"upload {Path(path).name}", entry)

    def log_text(self, run_id: str | None, text: str, name: str) -> None:
        if run_id:
            self._call(f"upload {name}", {"op": "log_text", "run": run_id, "text": text, "name": name})

    def end_run(self, run_id: str | None, succeeded: bool) -> None:
        if run_id:
            status = "FINISHED" if succeeded else "FAILED"
            self._call("end run", {"op": "set_terminated", "run": run_id, "status": status, "time": _now_ms()})

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


@dataclass
class ReplayReport:
    """What `replay_spool` did."""

    runs: dict[str, str] = field(default_factory=dict)
    """Placeholder id → id of the run created for it."""
    sent: int = 0
    """Entries sent: run creations, tags, params, metric batches, files, run ends."""
    done: list[str] = field(default_factory=list)
    """Spool files sent in full, and removed."""
    pending: dict[str, str] = field(default_factory=dict)
    """Spool files kept → why (server unreachable, in use, waiting for a parent run)."""
    rejected: list[str] = field(default_factory=list)
    """Entries the server refused, dropped with a warning: sending them again would fail again."""
    unreachable: set[str] = field(default_factory=set)
    """Tracking URIs that did not answer."""


def replay_spool(spool_dir: Path, uri: str | None = None, written_for: str | None = None) -> ReplayReport:
    """Upload the spool files in `spool_dir` in name order (the order their trackers started, so parent
    runs come first), each to the tracking URI it was written for, or to `uri` (the same store under
    another address). `written_for` replays only the files written for that URI. Safe to run again,
    and alongside running trackers: a file that is locked (its tracker lives, or another replay has it)
    is left for later."""
    report = ReplayReport()
    for path in sorted(Path(spool_dir).glob("*.jsonl")):
        try:
            descriptor = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # another replay finished it meanwhile
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.pending[path.name] = "in use (its tracker is still running, or another replay has it)"
            os.close(descriptor)
            continue
        try:
            # removed between our listing and our lock: it was replayed already
            if os.fstat(descriptor).st_nlink:
                _replay_file(path, uri, written_for, report)
        finally:
            os.close(descriptor)
    return report


def _read_spool(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the entries of a spool file; a last line cut short by a crash is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("MLflow spool %s: line %d is not JSON (cut short by a crash?); skipped", path, number)
    return json.loads(lines[0]), entries


def _replay_file(path: Path, uri: str | None, written_for: str | None, report: ReplayReport) -> None:
    """Send the entries of one spool file not sent yet, counting them in `<file>.sent`; remove the file
    (and its copied files) once all are sent. Stops, keeping the file, at an entry whose server does
    not answer or whose run is a placeholder no replay has created yet."""
    from mlflow import MlflowClient

    header, entries = _read_spool(path)
    if written_for is not None and header["uri"] != written_for:
        return
    target = uri or header["uri"]
    if target in report.unreachable:
        report.pending[path.name] = f"{target} unreachable"
        return
    client = MlflowClient(tracking_uri=target)
    marker = path.with_suffix(".sent")
    run_ids = _load_run_ids(path.parent)
    for index in range(int(marker.read_text()) if marker.exists() else 0, len(entries)):
        entry = entries[index]
        waiting = [placeholder for placeholder in _placeholders(entry) if placeholder not in run_ids]
        if waiting:
            report.pending[path.name] = f"waits for run {waiting[0]}, spooled in a file not replayed yet"
            return
        try:
            created = _replay_entry(client, entry, header, run_ids, path.parent)
        except Exception as error:
            if _is_connection_error(error):
                report.pending[path.name] = f"{target} unreachable"
                report.unreachable.add(target)
                return
            log.warning("MLflow: %s entry %d (%s) refused (%s: %s); dropped",
                        path.name, index + 1, entry["op"], type(error).__name__, error)
            report.rejected.append(f"{path.name} entry {index + 1} ({entry['op']}): {type(error).__name__}: {error}"[:500])
            created = None
        else:
            report.sent += 1
        if entry["op"] == "create_run":
            # "" marks a run the server refused: what was spooled for it is dropped, not kept forever
            run_ids[entry["placeholder"]] = created or ""
            _record_run_id(path.parent, entry["placeholder"], created or "")
            if created:
                report.runs[entry["placeholder"]] = created
        atomic_write_text(marker, str(index + 1))
    path.unlink()
    marker.unlink(missing_ok=True)
    shutil.rmtree(path.parent / "files" / path.stem, ignore_errors=True)
    report.done.append(path.name)


def _replay_entry(client, entry: dict[str, Any], header: dict[str, Any], run_ids: dict[str, str], spool_dir: Path) -> str | None:
    """Send one spooled entry: placeholders resolved, a copied file read from the spool, and a run of a
    tracker that never reached its server put in the header's experiment."""
    resolved = _resolve(entry, run_ids)
    if resolved is None:
        raise LookupError(f"its run {_placeholders(entry)[0]} was refused by the server")
    with _LOCK:
        if resolved["op"] == "create_run" and not resolved["experiment_id"] and not resolved["parent"]:
            resolved["experiment_id"] = _experiment_id(client, header["experiment_name"], header["artifact_location"])
        if resolved["op"] == "log_artifact":
            resolved["path"] = str(spool_dir / resolved["path"])
        return _send(client, resolved)
