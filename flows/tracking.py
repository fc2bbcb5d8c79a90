"""MLflow runs as a projection of the output root: batch → asset → stage runs, rebuilt from files.

A stage run is made from its folder (`result.json`, `config.yaml`, `history.json`, previews, files)
and its entry in `<asset>/asset.json`, an asset run from that record, a batch run from
`batches/<batch_id>/batch.json`. No spool: a sync that fails loses nothing (the files stay), the work
goes on, and the record's path waits in `<out>/.tracking-pending/` for `csd-asset sync-tracking
--out OUT` or the next batch over the root. The tracking URI is `MLFLOW_TRACKING_URI`, else
`<out>/mlflow.db`; a SQLite store keeps its artifacts beside it in `mlartifacts/` (MLflow's default,
`./mlruns`, depends on the working directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from flows.pipeline import close_abandoned
from stages.common import StepCallback
from stages.config import flatten

log = logging.getLogger(__name__)

DATABASE, ARTIFACTS, PENDING = "mlflow.db", "mlartifacts", ".tracking-pending"
KEY_TAG, DIGEST_TAG = "csd_key", "csd_synced"
METRIC_EVERY = 10
"""Log the step metrics of every 10th step (and the first and last) of a stage's history."""
LIVE_SECONDS = 30.0
"""`Tracker.live` sends a running stage's new points at most this often (the first at once)."""
REVIEWABLE = (".png", ".gif", ".jpg", ".jpeg", ".mp4", ".glb", ".gltf", ".obj", ".mtl", ".ply", ".json", ".yaml", ".txt")
"""Stage files logged as artifacts; weights and checkpoints (.safetensors, .pt) stay in the stage directory."""
STATUS = {"completed": "FINISHED", "failed": "FAILED", "running": "RUNNING"}
# MLflow 3's UI opens an experiment on the page its kind names; without it, on the GenAI traces overview
# (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT = "custom_model_development" → the runs table)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3.17's UI picks its page type from the link's `workflowType` (else the browser's last choice,
# else GenAI traces): without it our runs open under "Evaluations" (tests/flows/test_mlflow_ui.py)
RUNS_VIEW = "?workflowType=machine_learning"
_LOCK = threading.Lock()
"""One sync at a time per process: SQLite has a single writer, and assets may run in threads."""


def tracking_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(out) / DATABASE).resolve()}"


def experiment_link(server: str, experiment_id: str | None) -> str:
    """The experiment's runs table on an MLflow server (or `mlflow ui`) at `server`; the list of
    experiments when the id is not known (the server was down while the records were made)."""
    return f"{server.rstrip('/')}/#/experiments" + (f"/{experiment_id}{RUNS_VIEW}" if experiment_id else "")


def run_link(uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """A browser link for a run on an MLflow server, else the run id (open it with `mlflow ui`)."""
    if not run_id:
        return "not in MLflow yet (csd-asset sync-tracking)"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{RUNS_VIEW}"
    return run_id


@dataclass
class RunView:
    """What one MLflow run must show; `files` are `(path relative to the root, artifact folder)`."""

    key: str
    name: str
    parent: str | None
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    """`(name, value, step)`; summary metrics at step 0."""
    files: list[tuple[str, str | None]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    status: str = "RUNNING"
    start_ms: int | None = None
    end_ms: int | None = None


def _ms(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else None


def _strings(values: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:5000] for k, v in flatten(values).items() if v is not None}


def _json(store, rel: str) -> Any:
    return json.loads(store.read_text(rel) or "null")


def _points(step: int, metrics: dict[str, Any], last: bool = False) -> list[tuple[str, float, int]]:
    """The points of a stage's step that are logged: every `METRIC_EVERY`th step, the first and the last."""
    if not (last or step == 1 or step % METRIC_EVERY == 0):
        return []
    return [(k, float(v), step) for k, v in metrics.items() if k != "step" and v is not None]


def _stage_view(store, asset: dict[str, Any], name: str, entry: dict[str, Any]) -> RunView:
    """The stage's run: status and error from the asset record's `entry`; config, metrics, history and
    files from the stage folder while it still holds this identity (a later run may have replaced it)."""
    link, rel = asset["tracking"], f"{asset['asset_id']}/{name}"
    tags = {"stage": name, "asset_id": asset["asset_id"], "identity": entry.get("identity"), "status": entry["status"],
            "rerun": str(bool(link.get("rerun"))).lower(), "directory": store.path(rel), "error": entry.get("error")}
    view = RunView(f"{link['stage_prefix']}/{name}", name, link["key"], _strings(tags), texts={"error.txt": entry["error"]} if entry.get("error") else {},
                   status="FAILED" if entry["status"] == "failed" else "FINISHED", end_ms=_ms(entry.get("finished_at")))
    result = _json(store, f"{rel}/result.json") or {}
    summary = entry.get("metrics", {})
    if result.get("identity") == entry.get("identity"):
        view.params = _strings(yaml.safe_load(store.read_text(f"{rel}/config.yaml") or "{}") or {})
        summary = {**result.get("metrics", {}), **{f"time_{k}": v for k, v in result.get("timings", {}).items()}}
        history = (_json(store, f"{rel}/history.json") or []) if "history" in result.get("outputs", {}) else []
        for i, point in enumerate(history):
            view.metrics += _points(point["step"], point, last=i == len(history) - 1)
        if entry["status"] == "ran":
            previews = set(result.get("previews", []))
            view.files += [(f"{rel}/{p}", "previews") for p in sorted(previews)]
            view.files += [(f"{rel}/{f}", "files") for f in sorted(set(result["outputs"].values()) - previews)
                           if Path(f).suffix.lower() in REVIEWABLE and f != "config.yaml"]
            view.files += [(f"{rel}/config.yaml", None), (f"{rel}/result.json", None)]
    view.metrics += [(k, float(v), 0) for k, v in summary.items() if v is not None]
    return view


def asset_views(store, asset: dict[str, Any]) -> list[RunView]:
    """The asset's run and its stage runs, from an asset record (a reran asset adds runs for the
    stages it recomputed under the asset's earlier run)."""
    link = asset["tracking"]
    params = {"preset": asset["preset"], "overrides": asset["overrides"], "stages": ",".join(asset["stages"])}
    views = [RunView(link["key"], asset["asset_id"], link.get("parent_key"), _strings({**link.get("tags", {}), "status": asset["status"]}),
                     _strings(params), status=STATUS.get(asset["status"], "RUNNING"), start_ms=_ms(asset["started_at"]),
                     end_ms=_ms(asset["finished_at"]))]
    return views + [_stage_view(store, asset, name, entry) for name, entry in asset["stages"].items()
                    if entry["status"] in ("ran", "failed") or (entry["status"] == "reused" and not link.get("rerun"))]


def batch_views(store, batch: dict[str, Any]) -> list[RunView]:
    """The batch's run (summary and contact sheet as artifacts), then each collected asset's runs."""
    view = RunView(batch["tracking"]["key"], batch["name"], None, _strings(batch["tags"]), _strings(batch["params"]),
                   [(k, float(v), 0) for k, v in batch.get("metrics", {}).items()], [(f, None) for f in batch.get("files", [])],
                   {"summary.md": batch["summary"]} if batch.get("summary") else {}, STATUS.get(batch["status"], "RUNNING"),
                   _ms(batch["started_at"]), _ms(batch.get("finished_at")))
    return [view] + [v for asset in batch.get("assets", {}).values() if asset for v in asset_views(store, asset)]


class Tracker:
    """Syncs records of an output root to the MLflow experiment `experiment` at `uri`; never raises.

    `sync` finds each run by its tag `csd_key`, creates a missing one under its parent, sends what it
    lacks, then tags it with a digest of what it projected: syncing again costs one search and sends
    nothing. After one failed sync (the server down, a parent run missing) it tries no more and leaves
    the rest to `sync_pending`: a dead server costs a process one timeout (`MLFLOW_HTTP_REQUEST_*` in
    prefect.yaml), not one per stage."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        self.uri, self.experiment = uri, experiment
        sqlite = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        self.artifact_location = artifact_location or (sqlite and (sqlite.parent / ARTIFACTS).resolve().as_uri())
        self.experiment_id: str | None = None
        self.failures: list[str] = []
        """What failed, first the reason this tracker gave up."""
        self.run_ids: dict[str, str] = {}
        """`csd_key` → run id of the runs this tracker synced."""
        self._client = None

    def link(self) -> dict[str, Any]:
        """What a record needs to be synced later, by any process."""
        return {"uri": self.uri, "experiment": self.experiment}

    def sync(self, store, rel: str, record: dict[str, Any] | None = None) -> bool:
        """Make MLflow match the batch or asset record at `rel` (or `record`, being written there); False if not
        done yet. `rel` stays in `.tracking-pending/` until synced as ended, so `sync_pending` ends a dead owner's."""
        marker = f"{PENDING}/{hashlib.sha256(rel.encode()).hexdigest()[:16]}.txt"
        record = record or _json(store, rel)
        views = lambda: (batch_views if "assets" in record else asset_views)(store, record)  # noqa: E731
        synced = record is None or self._push(rel, store, views)  # None: removed since it was listed
        if synced and (record or {}).get("status") != "running":
            store.remove(marker)
        else:
            store.write_text(marker, rel)
        return synced

    def live(self, link: dict[str, Any], stage: str) -> StepCallback:
        """A step callback for stage `stage` of the asset record whose `tracking` is `link`, so a long
        stage can be watched in the UI: it sends the points `sync` logs as they come (the first at once,
        then at most every `LIVE_SECONDS`) to the stage's run; the stage's sync adds what is missing."""
        view, sent_at = RunView(f"{link['stage_prefix']}/{stage}", stage, link["key"], {}), [float("-inf")]

        def step(number: int, metrics: dict[str, float]) -> None:
            view.metrics += _points(number, metrics)
            if view.metrics and not self.failures and time.monotonic() - sent_at[0] >= LIVE_SECONDS:
                sent_at[0] = time.monotonic()
                if self._push(f"{view.key} (live)", None, lambda: [view]):
                    view.metrics = []

        return step

    def _push(self, what: str, store, views) -> bool:
        try:
            if self.failures:
                raise ConnectionError(f"not tried again after: {self.failures[0]}")
            with _LOCK:
                self._sync(store, views())
            return True
        except Exception as error:
            log.warning("MLflow: %s not synced (%s: %s); the pipeline goes on, `csd-asset sync-tracking` syncs it later",
                        what, type(error).__name__, error)
            self.failures.append(f"{what}: {type(error).__name__}: {error}"[:500])
            return False

    def _runs(self, key: str, prefix: bool = False) -> dict[str, Any]:
        """The live runs whose key is `key` (or starts with it; a batch's runs fit in one page of 50 000),
        by key; of duplicates (two processes created one run at once) the oldest stays, the others go.
        Keys are made of checked asset ids, stage names and run ids: nothing to quote."""
        found: dict[str, Any] = {}
        where = f"tags.{KEY_TAG} LIKE '{key}%'" if prefix else f"tags.{KEY_TAG} = '{key}'"
        for run in self._client.search_runs([self.experiment_id], where, max_results=50_000, order_by=["attributes.start_time"]):
            if run.data.tags[KEY_TAG] in found:
                self._client.delete_run(run.info.run_id)
            else:
                found[run.data.tags[KEY_TAG]] = run
        return found

    def _sync(self, store, views: list[RunView]) -> None:
        """Find or make each view's run (views come parent first, all under the first one) and send
        what it lacks: params not yet set (MLflow's are immutable), metric points by (name, step), so
        none goes twice (a sync cut short, `live`), the files whole, read through the store (any
        machine can sync), the status; the digest tag last, so a sync cut short is redone."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        if self._client is None:
            client = MlflowClient(tracking_uri=self.uri)
            if client.get_experiment_by_name(self.experiment) is None:
                with contextlib.suppress(MlflowException):  # another process created it first
                    client.create_experiment(self.experiment, artifact_location=self.artifact_location, tags=EXPERIMENT_TAGS)
            self._client, self.experiment_id = client, client.get_experiment_by_name(self.experiment).experiment_id
        client, runs = self._client, self._runs(views[0].key, prefix=True)
        if views[0].parent:
            runs.update(self._runs(views[0].parent))
        for view in views:
            if view.parent and view.parent not in runs:
                raise LookupError(f"its parent run {view.parent!r} is not in MLflow yet")
            if view.key not in runs:
                tags = {KEY_TAG: view.key, **({"mlflow.parentRunId": runs[view.parent].info.run_id} if view.parent else {})}
                client.create_run(self.experiment_id, start_time=view.start_ms, tags=tags, run_name=view.name)
                runs.update(self._runs(view.key))
            run, digest = runs[view.key], hashlib.sha256(json.dumps(asdict(view), sort_keys=True).encode()).hexdigest()[:16]
            self.run_ids[view.key] = run_id = run.info.run_id
            if run.data.tags.get(DIGEST_TAG) == digest:
                continue
            sent = {(m.key, m.step) for key in run.data.metrics for m in client.get_metric_history(run_id, key)}
            stamp = int(time.time() * 1000)  # a run's points in the order they were sent: live ones first
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v, step in view.metrics if (k, step) not in sent],
                             params=[Param(k, v) for k, v in view.params.items() if k not in run.data.params],
                             tags=[RunTag(k, v) for k, v in view.tags.items() if run.data.tags.get(k) != v])
            with tempfile.TemporaryDirectory() as scratch:
                for rel, folder in view.files:
                    if (content := store.read_bytes(rel)) is not None:
                        (Path(scratch) / (folder or "")).mkdir(exist_ok=True)
                        (Path(scratch) / (folder or "") / Path(rel).name).write_bytes(content)
                for name, text in view.texts.items():
                    (Path(scratch) / name).write_text(text)
                if view.files or view.texts:
                    client.log_artifacts(run_id, scratch)
            if view.status != "RUNNING" or run.info.status != "RUNNING":  # RUNNING again: a rerun under its key
                client.set_terminated(run_id, view.status, end_time=view.end_ms)
            client.set_tag(run_id, DIGEST_TAG, digest)


def sync_pending(store, rels: list[str] | None = None) -> list[str]:
    """Sync each record listed in `.tracking-pending/` (or `rels`; batches first: they hold the parents) to its store and
    experiment, ending first one that a dead process left running (`close_abandoned`); returns those not synced."""
    trackers: dict[tuple[str, str], Tracker] = {}
    left = []
    listed = filter(None, map(store.read_text, store.glob(f"{PENDING}/*.txt"))) if rels is None else rels
    for rel in sorted(listed, key=lambda r: not r.startswith("batches/")):
        close_abandoned(store, rel)
        link = (_json(store, rel) or {}).get("tracking") or {}
        where = (link.get("uri") or tracking_uri(store.local), link.get("experiment") or "csd-asset")
        tracker = trackers.setdefault(where, Tracker(*where))
        if not tracker.sync(store, rel):
            left.append(f"{rel}: {tracker.failures[-1]}")
    return left
