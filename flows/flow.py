"""Prefect flows: `csd-asset` runs a catalog, `csd-asset-single` runs one asset, one task per stage.

The batch validates the whole catalog before any work, opens an MLflow batch run and runs one
`csd-asset-single` flow per row: in-process, `max_parallel_assets` at a time (default; with more
than one, the stages compute in worker processes, see `StagePool`), or, with
`asset_deployment="csd-asset-single/asset"`, as deployment runs on a work pool so that every
worker (one per GPU) takes assets from the same batch; an asset run that crashes (worker killed,
machine lost) is submitted again and resumes from its stage's last checkpoint. Each asset flow
writes its record to `<out>/<asset_id>/asset.json` and a copy for its batch under
`<out>/<asset_id>/batches/`; the batch collects its copies, so it needs no result storage, works
the same in both modes, and two batches over one output root do not read each other's records.
The batch ends Failed when an asset failed, with a markdown summary artifact saying what failed
where; running it again recomputes only what did not complete. Retrying a failed batch run
(`prefect flow-run retry`) reuses the assets it completed and runs the failed and crashed ones
again, which recompute only their failed stage and the later ones.

Caching is by stage directory (see `flows.pipeline`), not by Prefect's task cache: the stage files
are the results, and a directory whose identity matches is reused by any run on any machine that
sees the output root.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# pymeshlab must be imported by the main thread: first imported from a worker thread (where assets
# run), its Qt statics abort the interpreter at exit ("malloc_consolidate(): unaligned fastbin chunk")
import pymeshlab  # noqa: F401
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from csd.models import ModelNotFoundError
from flows.catalog import CatalogRow
from flows.pipeline import (
    ASSET_RECORD, DEFAULT_PRESET, STAGE_NAMES, AssetPlan, AssetRecord, BatchRecord, PlannedStage, StageOutcome, close_abandoned,
    current_worker, execute_stage, load_catalog, owning, plan_asset, run_asset,
)
from flows.store import LEASE_SECONDS, open_store
from flows.tracking import Tracker, run_link, sync_pending, tracking_uri
from flows.workers import StagePool
from stages.common import StepCallback

log = logging.getLogger(__name__)
SHEET_NAME = "contact_sheet.png"
BATCH_FLOW = "csd-asset"
ASSET_FLOW = "csd-asset-single"
SUMMARY_ARTIFACT = "csd-asset-batch"
DEFAULT_EXPERIMENT = "csd-asset"
PERMANENT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ModelNotFoundError)
"""Errors a retry cannot fix (bad config, missing file or model); anything else is retried."""


class AssetFailed(RuntimeError):
    """A stage of the asset failed; the asset flow run ends Failed with the stage's error."""


class BatchFailed(RuntimeError):
    """At least one asset failed or crashed; the message holds the batch summary."""


def _worth_retrying(task, task_run, state) -> bool:
    error = state.result(raise_on_failure=False)
    return not isinstance(getattr(error, "__cause__", None), PERMANENT_ERRORS)


_STAGE_POOL: StagePool | None = None
"""Set by `stage_workers` while a batch runs assets in worker processes; `run_stage` then runs stages there."""


@contextlib.contextmanager
def stage_workers(parallel: int) -> Iterator[StagePool | None]:
    """`parallel` worker processes for the stages of this process's batches (none for 1, or while an
    outer `stage_workers` holds some). `batch` opens its own; `csd-asset run` opens them before the
    batch, so the workers' imports overlap the temporary Prefect server's start-up."""
    global _STAGE_POOL
    if parallel <= 1 or _STAGE_POOL is not None:
        yield _STAGE_POOL
        return
    _STAGE_POOL = StagePool(parallel)
    log.info("batch: %d assets at a time in worker processes, %d torch thread(s) each", parallel, _STAGE_POOL.threads)
    try:
        yield _STAGE_POOL
    finally:
        _STAGE_POOL.close()
        _STAGE_POOL = None


@task(name="stage", task_run_name="{stage.asset_id}/{stage.spec.name}", cache_policy=NO_CACHE)
def run_stage(stage: PlannedStage, force: bool, callback: StepCallback = None) -> StageOutcome:
    """Run or reuse one stage (its MLflow run is synced from the folder and the asset record; `callback`
    gets its steps, `Tracker.live`), in a worker process while `batch` runs assets in parallel."""
    execute = _STAGE_POOL.run if _STAGE_POOL is not None else execute_stage
    return execute(stage, force, callback)


def code_version() -> str:
    """The git commit of the checkout this package runs from, or `unknown` (a tag of every run)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _asset_tags(plan: AssetPlan, catalog: str | None) -> dict[str, Any]:
    row = plan.row
    return {
        "asset_id": row.asset_id, "prompt": row.prompt, "negative_prompt": row.negative_prompt or None, "seed": row.seed,
        "preset": plan.preset, "edit_prompt": row.edit_prompt, "mesh": row.mesh, "catalog": catalog,
        "prefect_flow_run_id": flow_run.id, "prefect_flow_run_url": flow_run.ui_url, "git_commit": code_version(),
    }


def _asset_link(plan: AssetPlan, tracking: dict[str, Any] | None, rerun: bool) -> tuple[Tracker, dict[str, Any]]:
    """The tracker and the record's `tracking`: a stage rerun logs under the asset's previous MLflow
    run (key `…/<asset_id>`, stage runs `…/rerun-<flow run>/<stage>`); otherwise a new asset run,
    under the batch's run when `tracking` (from the batch) names it."""
    previous = AssetRecord.load(plan.store, plan.row.asset_id)
    earlier = previous.tracking if previous else {}
    if rerun and earlier.get("key"):
        tracker = Tracker(earlier["uri"], earlier["experiment"])
        return tracker, {**earlier, "stage_prefix": f"{earlier['key']}/rerun-{flow_run.id or uuid.uuid4().hex}", "rerun": True,
                         "batch_record": None}  # not its batch's to end
    tracker = Tracker(tracking["uri"], tracking["experiment"]) if tracking else Tracker(tracking_uri(plan.store.local), DEFAULT_EXPERIMENT)
    tracking = tracking or {}
    key = f"{tracking.get('key') or 'asset/' + (flow_run.id or uuid.uuid4().hex)}/{plan.row.asset_id}"
    return tracker, {**tracker.link(), "key": key, "stage_prefix": key, "parent_key": tracking.get("key"),
                     "batch_id": tracking.get("batch_id"), "batch_record": tracking.get("batch_record"),
                     "tags": _asset_tags(plan, tracking.get("catalog"))}


@flow(name=ASSET_FLOW, flow_run_name="{row[asset_id]}")
def asset(
    row: dict[str, Any],
    out: str = "out",
    preset: str = DEFAULT_PRESET,
    overrides: dict[str, Any] | None = None,
    rerun_stage: str | None = None,
    stage_retries: int = 1,
    stage_retry_delay_s: float = 30.0,
    tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Make one asset: run or reuse its stages in order, each as a task with retries.

    `row` is a catalog row (`CatalogRow.to_dict()`); `rerun_stage` forces that stage and the later
    ones to run again; `tracking` (from the batch) names the MLflow store, the batch's MLflow run
    (`parent_run_id`) and the batch (`batch_id`, recorded in `asset.json` for the batch to find)."""
    plan = plan_asset(CatalogRow.from_dict(row), out, preset, overrides)
    if rerun_stage is not None:
        plan.stage(rerun_stage)
    tracker, link = _asset_link(plan, tracking, rerun_stage is not None)
    stage_task = run_stage.with_options(
        retries=stage_retries, retry_delay_seconds=stage_retry_delay_s, retry_condition_fn=_worth_retrying
    )

    def execute(stage: PlannedStage, force: bool) -> StageOutcome:
        return stage_task(stage, force, tracker.live(link, stage.name))

    rel = f"{plan.row.asset_id}/{ASSET_RECORD}"

    def saved(record: AssetRecord) -> None:
        if record.tracking.get("stage_prefix") != link["stage_prefix"]:  # an abandoned earlier run, which run_asset ended
            if record.tracking.get("uri"):  # its runs may be in another experiment
                Tracker(record.tracking["uri"], record.tracking["experiment"]).sync(plan.store, rel, dataclasses.asdict(record))
            return
        tracker.sync(plan.store, rel, dataclasses.asdict(record))
        record.tracking.update(asset_run_id=tracker.run_ids.get(link["key"]), experiment_id=tracker.experiment_id, failures=tracker.failures)

    record = run_asset(plan, rerun_stage=rerun_stage, execute=execute, tracking=link, saved=saved)
    if (tracking or {}).get("batch_id"):
        record.hand_to_batch(plan.store, tracking["batch_id"])
    if record.status == "failed":
        errors = [entry["error"] for entry in record.stages.values() if entry.get("error")]
        raise AssetFailed("; ".join(errors))
    return dataclasses.asdict(record)


def _score(record: AssetRecord) -> str:
    metrics = record.stages.get("export", {}).get("metrics") or {}
    return f"{metrics['quality']:.2f}" if "quality" in metrics else "—"


def _write_contact_sheet(store, asset_ids: list[str], batch_id: str) -> Path | None:
    """`<out>/sheets/<batch_id>/contact_sheet.png` of the batch's assets; a failure only warns."""
    from flows.sheet import write_sheet

    path = store.local / "sheets" / str(batch_id) / SHEET_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_sheet(store, path, asset_ids)
    except Exception as error:  # a review aid: never the reason a finished batch fails
        log.warning("batch contact sheet not written: %s", error)
        return None
    return path


def summary_markdown(
    catalog: str, records: dict[str, AssetRecord | None], tracker: Tracker, batch_run_id: str | None, sheet: Path | None = None,
    out: str = "out",
) -> str:
    """The batch summary: one table row per asset with status, stages, score and MLflow run."""
    lines = [
        f"# csd-asset batch: `{catalog}`", "",
        f"MLflow: `{tracker.uri}`, batch run {run_link(tracker.uri, tracker.experiment_id, batch_run_id)}", "",
    ]
    if sheet is not None:
        lines += [f"Contact sheet (every asset at a glance): artifact `{SHEET_NAME}` of the batch run, file `{sheet}`", ""]
    lines += [
        "| asset | status | stages | quality | MLflow run | problem |", "|---|---|---|---|---|---|",
    ]
    for asset_id, record in records.items():
        if record is None:
            lines.append(f"| {asset_id} | crashed | — | — | — | the asset flow wrote no record; see its Prefect logs |")
            continue
        stages = ", ".join(f"{name} {entry['status']}" for name, entry in record.stages.items())
        errors = [entry["error"] for entry in record.stages.values() if entry.get("error")]
        problem = (errors[0] if errors else "").replace("|", "/").replace("\n", " ")[:300]
        if record.tracking.get("failures"):
            problem += f" (MLflow: {len(record.tracking['failures'])} logging call(s) failed)"
        run = run_link(record.tracking.get("uri", ""), record.tracking.get("experiment_id"), record.tracking.get("asset_run_id"))
        lines.append(f"| {asset_id} | {record.status} | {stages} | {_score(record)} | {run} | {problem} |")
    lost = [(asset_id, record) for asset_id, record in records.items() if record and record.tracking.get("failures")]
    if lost or tracker.failures:
        lines += ["", "## MLflow logs not uploaded", "",
                  "The stage files below are complete; their MLflow runs are made from them by "
                  f"`csd-asset sync-tracking --out {out}` (or automatically at the next batch over this output root).", ""]
    for asset_id, record in lost:
        lines.append(f"- {asset_id}: {len(record.tracking['failures'])} sync(s) failed; first problem: {record.tracking['failures'][0][:300]}")
    if tracker.failures:
        lines.append(f"- batch run: {len(tracker.failures)} call(s); first problem: {tracker.failures[0][:300]}")
    return "\n".join(lines) + "\n"


def asset_key(batch_id: str, catalog_fingerprint: str, parameters: dict[str, Any], batch_try: int = 1) -> str:
    """Idempotency key of an asset's flow runs within one run of a batch: the batch flow run, which
    of its runs this is (`batch_try`, Prefect's run_count: a retried batch keeps its flow-run id), the
    catalog version and the asset's parameters. Within a run the key makes resubmission idempotent;
    a retried batch gets new keys, so its failed and crashed assets run again (its completed ones
    it reuses from the records it kept, see `batch`)."""
    asset_parameters = {k: v for k, v in parameters.items() if k != "tracking"}
    digest = hashlib.sha256(json.dumps(asset_parameters, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{batch_id}/try-{batch_try}/{parameters['row']['asset_id']}/{catalog_fingerprint}/{digest}"


def submit_asset(deployment: str, parameters: dict[str, Any], key: str, attempts: int) -> None:
    """Run the asset as a run of `deployment` on its work pool and wait for it. A run that ends
    Crashed (its worker or machine died; see `automations.yaml` for how Prefect notices) is
    submitted again, up to `attempts` runs in all, and any worker may take it: the stage it was in
    resumes from its last checkpoint. A Failed run is not resubmitted: its stages already had their
    retries, and a deterministic error would only fail again."""
    asset_id = parameters["row"]["asset_id"]
    for attempt in range(1, attempts + 1):
        run = run_deployment(deployment, parameters=parameters, timeout=None, as_subflow=True,
                             idempotency_key=f"{key}/attempt-{attempt}")
        if not run.state.is_crashed():
            return
        where = f" (ran as {run.infrastructure_pid})" if run.infrastructure_pid else ""
        log.warning("asset %s: flow run %s crashed%s: %s; %s", asset_id, run.name, where, run.state.message,
                    f"submitting it again ({attempt + 1} of {attempts})" if attempt < attempts else "no attempts left")


@flow(name=BATCH_FLOW)
def batch(
    catalog: str = "catalogs/demo.csv",
    preset: str = DEFAULT_PRESET,
    out: str = "out",
    only: list[str] | None = None,
    rerun_stage: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_parallel_assets: int = 1,
    asset_deployment: str | None = None,
    stage_retries: int = 1,
    stage_retry_delay_s: float = 30.0,
    experiment: str | None = None,
    asset_attempts: int = 3,
) -> dict[str, str]:
    """Make every asset of a catalog (or the `only` ones); returns `{asset_id: status}`.

    `preset` applies to rows without a `preset` column; `overrides` are dotted config keys for every
    row (`{"nerf.steps": 200}`); `rerun_stage` forces that stage (and later ones) of the selected
    assets; `asset_deployment` fans assets out as runs of that deployment instead of in-process,
    `max_parallel_assets` in flight at a time, each run that crashes submitted again until it has
    had `asset_attempts` runs."""
    if rerun_stage is not None and rerun_stage not in STAGE_NAMES:
        raise ValueError(f"unknown stage {rerun_stage!r}; valid: {', '.join(STAGE_NAMES)}")
    if asset_attempts < 1:
        raise ValueError(f"asset_attempts must be at least 1, got {asset_attempts}")
    store = open_store(out)
    if store.remote and not os.environ.get("MLFLOW_TRACKING_URI"):
        log.warning("output root %s is shared but MLflow logs go to %s on this machine; set MLFLOW_TRACKING_URI to a server",
                    store.url, store.local)
    parsed, plans = load_catalog(Path(catalog), preset, overrides, store)
    rows = parsed.select(only)
    stages_of = {plan.row.asset_id: {s.name for s in plan.stages} for plan in plans}
    tracker = Tracker(tracking_uri(store.local), experiment or f"{DEFAULT_EXPERIMENT}/{Path(catalog).stem}")
    sync_pending(store)  # what earlier runs could not sync, and the records dead runs left running
    started = datetime.now(timezone.utc)
    batch_id = flow_run.id or uuid.uuid4().hex
    batch_try = flow_run.run_count or 1
    run_key = batch_id if batch_try == 1 else f"{batch_id}-try-{batch_try}"  # one MLflow batch run per run of the flow
    batch_record = BatchRecord(
        run_key, f"{Path(catalog).stem} {started:%Y-%m-%d %H:%M}", {**tracker.link(), "key": f"batch/{run_key}"},
        tags={"catalog": catalog, "catalog_sha256": parsed.fingerprint, "preset": preset, "rerun_stage": rerun_stage,
              "prefect_flow_run_id": flow_run.id, "prefect_flow_run_url": flow_run.ui_url, "git_commit": code_version()},
        params={"catalog": catalog, "preset": preset, "out": out, "assets": len(rows), "only": ",".join(only or []),
                "overrides": overrides or {}, "rerun_stage": rerun_stage},
        worker=current_worker(),
    )
    with owning(store, batch_record, lambda record: tracker.sync(store, record.rel)):  # ended as failed if an error escapes
        batch_record.save(store)
        tracker.sync(store, batch_record.rel)

        def make(row: CatalogRow) -> AssetRecord | None:
            if batch_try > 1:
                # a retried batch reuses the assets its earlier run completed (their records it kept)
                kept = AssetRecord.collect(store, row.asset_id, batch_id)
                if kept is not None and kept.status == "completed":
                    log.info("asset %s: completed in an earlier run of this batch; reused", row.asset_id)
                    return kept
            parameters = {
                "row": row.to_dict(), "out": out, "preset": preset, "overrides": overrides,
                "rerun_stage": rerun_stage if rerun_stage in stages_of[row.asset_id] else None,
                "stage_retries": stage_retries, "stage_retry_delay_s": stage_retry_delay_s,
                "tracking": {**batch_record.tracking, "catalog": catalog, "batch_id": batch_id, "batch_record": batch_record.rel},
            }
            if asset_deployment:
                submit_asset(asset_deployment, parameters, asset_key(batch_id, parsed.fingerprint, parameters, batch_try),
                             asset_attempts)
            else:
                asset(**parameters, return_state=True)
            return AssetRecord.collect(store, row.asset_id, batch_id)

        wall = time.perf_counter()
        parallel = max(1, min(max_parallel_assets, len(rows)))
        with stage_workers(1 if asset_deployment else parallel), \
                ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="asset") as pool:
            futures = {row.asset_id: pool.submit(contextvars.copy_context().run, make, row) for row in rows}
            records = {asset_id: future.result() for asset_id, future in futures.items()}
        # an asset whose every attempt crashed left its record running: ended once its lock frees (a dead
        # machine's lease lapses within LEASE_SECONDS), unless a run of it is still going
        crashed = [f"{asset_id}/{ASSET_RECORD}" for asset_id, record in records.items() if record is None]
        for rel in crashed:
            close_abandoned(store, rel, LEASE_SECONDS, by_its_batch=True)
        sync_pending(store, crashed)
        statuses = {asset_id: record.status if record else "crashed" for asset_id, record in records.items()}
        sheet = _write_contact_sheet(store, list(records), batch_id)
        failed = sorted(a for a, status in statuses.items() if status in ("failed", "crashed"))
        markdown = summary_markdown(catalog, records, tracker, tracker.run_ids.get(batch_record.tracking["key"]), sheet, out)
        create_markdown_artifact(markdown, key=SUMMARY_ARTIFACT, description=f"csd-asset batch over {catalog}")
        batch_record.status, batch_record.summary, batch_record.finished_at = "failed" if failed else "completed", markdown, \
            datetime.now(timezone.utc).isoformat(timespec="seconds")
        batch_record.metrics = {"assets_failed": len(failed), "assets_total": len(rows), "wall_seconds": time.perf_counter() - wall}
        batch_record.files = [store.rel(sheet)] if sheet else []
        batch_record.assets = {asset_id: dataclasses.asdict(record) if record else None for asset_id, record in records.items()}
        batch_record.save(store)
        tracker.sync(store, batch_record.rel)
        if failed:
            # keep the completed assets' records for a retry of this batch run (`prefect flow-run retry`),
            # which reuses those assets and runs the failed and crashed ones again
            for record in records.values():
                if record is not None and record.status == "completed":
                    record.hand_to_batch(store, batch_id)
            raise BatchFailed(f"{len(failed)} of {len(rows)} asset(s) failed: {', '.join(failed)}\n{markdown}")
        return statuses
