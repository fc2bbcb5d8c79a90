"""Stage registry, per-asset plans with stage identities, and running one asset's stages.

No Prefect and no MLflow here: `flows.flow` wraps `execute_stage` in a Prefect task and
`flows.tracking` projects the records and stage folders written here into MLflow runs, so
everything below is testable with plain function calls.

A stage's identity is `hash(asset_id, stage, resolved config, upstream identities or input-file
digests, the stage's source files, the prior's weights)` (`stages.identity`); its files live in `<out>/<asset_id>/<stage>/`. A completed directory
with the same identity is reused unless an upstream stage was committed after it (then it runs again,
and so does everything after it): two batches over one output root compute each stage once.
The output root may be a local folder or an fsspec URL (`flows.store`).
`<out>/<asset_id>/asset.json` records what the last run of the asset did (for `csd-asset status`
and `csd-asset rerun`). A record (asset or batch) that says running is owned by the process holding
its lock (`asset.lock`, `batch.lock` beside it) and always ends in a terminal status: written by its
owner, or by `close_abandoned` once the lock shows the owner gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import socket
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from csd.models import ModelNotFoundError
from flows.catalog import Catalog, CatalogError, CatalogRow, location, read_catalog
from flows.store import Store, open_store
from stages.common import RESULT_FILE, StageResult, StepCallback, completed
from stages.config import ConfigError, build_config, config_hash, load_preset
from stages.identity import file_digest, source_fingerprint, weights_fingerprints

log = logging.getLogger(__name__)

DEFAULT_PRESET = "toy-cpu"
ASSET_RECORD = "asset.json"
BATCH_RECORDS = "batches"
"""`<out>/<asset_id>/batches/<batch_id>.json`: the record an asset run hands to its batch (two batches over
the same output root each read their own, while `asset.json` holds whichever ran last)."""
FAULT_ENV = "CSD_ASSET_FAIL_STAGE"
"""Fault injection for tests and drills: `asset_id/stage[,asset_id/stage…]` makes those stages raise."""

Upstream = dict[str, Path]
"""Directories of the stages planned before this one, by stage name."""


@dataclass(frozen=True)
class StageSpec:
    """One entry of the registry: a stage module and how a catalog row feeds it.

    The module exposes `run(config, out_dir, *, inputs, identity, callback)`; the config
    class is the annotation of `run`'s `config`; the config checks its own fields when built, at planning."""

    name: str
    module: str
    inputs: Callable[[CatalogRow, Upstream], dict[str, Path]]
    runs_for: Callable[[CatalogRow], bool] = lambda row: True
    row_fields: Callable[[CatalogRow, str], dict[str, Any]] = lambda row, preset: {
        "prompt": row.prompt, "seed": row.seed, **({"negative_prompt": row.negative_prompt} if row.negative_prompt else {})
    }
    """Config fields taken from the row and the preset name (only those the config class has are set)."""

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_class(self) -> type:
        return typing.get_type_hints(self.load().run)["config"]


def _edit_fields(row: CatalogRow, preset: str) -> dict[str, Any]:
    # CSD editing: the target description is the prompt; the source description is the negative prompt
    return {"prompt": row.edit_prompt, "source_prompt": row.prompt, "seed": row.seed}


def _export_fields(row: CatalogRow, preset: str) -> dict[str, Any]:
    return {"prompt": row.prompt, "negative_prompt": row.negative_prompt, "edit_prompt": row.edit_prompt or "",
            "seed": row.seed, "preset": preset}


STAGES: tuple[StageSpec, ...] = (
    StageSpec("nerf", "stages.nerf", inputs=lambda row, up: {}, runs_for=lambda row: row.mesh is None),
    StageSpec(
        "mesh", "stages.mesh",
        inputs=lambda row, up: {"user_mesh": Path(row.mesh)} if row.mesh else {"nerf": up["nerf"]},
    ),
    StageSpec("uv", "stages.uv", inputs=lambda row, up: {"mesh": up["mesh"], **({"nerf": up["nerf"]} if "nerf" in up else {})}),
    StageSpec("texture", "stages.texture", inputs=lambda row, up: {"uv": up["uv"]}),
    StageSpec("edit", "stages.edit", inputs=lambda row, up: {"texture": up["texture"]}, runs_for=lambda row: bool(row.edit_prompt),
              row_fields=_edit_fields),
    StageSpec("export", "stages.export", inputs=lambda row, up: {"asset": up.get("edit", up.get("texture")), **up},
              row_fields=_export_fields),
)
STAGE_NAMES = tuple(spec.name for spec in STAGES)
OVERRIDE_SECTIONS = ("model", *STAGE_NAMES)


@dataclass(frozen=True)
class PlannedStage:
    asset_id: str
    spec: StageSpec
    config: Any
    identity: str
    directory: Path
    """In the store's working copy (the root itself for a local root)."""
    inputs: dict[str, Path]
    store: Store

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class AssetPlan:
    row: CatalogRow
    preset: str
    overrides: dict[str, Any]
    store: Store
    stages: list[PlannedStage]

    def stage(self, name: str) -> PlannedStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"asset {self.row.asset_id!r} has no stage {name!r}; its stages: {', '.join(s.name for s in self.stages)}")


def _field_type(cls: type, dotted: str, where: str) -> Any:
    """The annotation of `cls`'s field `a.b.c`, raising ConfigError naming the valid fields."""
    tp: Any = cls
    for part in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return Any
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ConfigError(f"{where}: {tp.__name__} has no field {part!r}; valid: {', '.join(sorted(hints))}")
        tp = hints[part]
    return tp


def coerce_override(cls: type, dotted: str, value: Any, where: str) -> Any:
    """A catalog cell or `--set` value as the type of field `dotted` of `cls` (`"5"` → 5 for an int)."""
    tp = _field_type(cls, dotted, where)
    if not isinstance(value, str):
        return value
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2:  # Optional[X]
        if value.lower() in ("", "null", "none"):
            return None
        tp = args[0]
    if tp is str or (typing.get_origin(tp) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return value
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a whole number") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    if tp is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{where}: {value!r} is not true/false")
        return value.lower() in ("true", "1", "yes")
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"{where}: {value!r} is not valid YAML") from None


def _config_path(spec: StageSpec, key: str) -> str:
    """The field an override key sets, as a path from the stage (`model.dtype` → `nerf.model.dtype`)."""
    return key if key.partition(".")[0] == spec.name else f"{spec.name}.{key}"


def _locate(spec: StageSpec, row: CatalogRow, preset_name: str, overrides: dict[str, Any], field: str | None, text: str) -> str:
    """A config problem as a catalog message: the row's column (or the `--set`) that gave the
    offending value, else the preset; always the line and the asset."""
    row_where = location(row.line, asset_id=row.asset_id)
    if field is None:
        return text if text.startswith(("line ", "--set")) else f"{row_where}, {text}"

    def sets(key: str) -> bool:
        path = _config_path(spec, key)
        return path == field or path.startswith(f"{field}.") or field.startswith(f"{path}.")

    for key in row.overrides:
        if sets(key):
            about = "" if _config_path(spec, key) == field else f"{field}: "
            return f"{location(row.line, key, row.asset_id)}: {about}{text}"
    for key in overrides:
        if sets(key):
            return f"--set {key} (asset {row.asset_id!r}): {text}"
    return f"{row_where}, preset {preset_name!r}, {field}: {text}"


def stage_config(spec: StageSpec, row: CatalogRow, preset_name: str, preset: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Resolve the config of `spec` for `row`: preset section (with the preset's `model` section
    merged under it), then the row's prompt/seed, then batch `overrides`, then the row's overrides.

    Every nested config is built and checked here, at planning; a ConfigError lists each problem as
    a message naming the line, the column (or `--set`, or the preset), the asset and the value."""
    cls = spec.config_class()
    fields = {f.name for f in dataclasses.fields(cls)}
    section = dict(preset.get(spec.name) or {})
    if "model" in fields:
        section["model"] = {**(preset.get("model") or {}), **(section.get("model") or {})}
    values = {k: v for k, v in spec.row_fields(row, preset_name).items() if k in fields}
    sources = [(overrides, lambda key: f"--set {key}"), (row.overrides, lambda key: location(row.line, key, row.asset_id))]
    problems: list[tuple[str | None, str]] = []
    for source, where in sources:
        for key, value in source.items():
            section_name, _, name = key.partition(".")
            if section_name == spec.name or (section_name == "model" and "model" in fields):
                target = name if section_name == spec.name else key
                try:
                    values[target] = coerce_override(cls, target, value, where(key))
                except ConfigError as error:
                    problems += error.problems
    if problems:
        raise ConfigError(problems=problems)
    try:
        config = build_config(cls, section, values, where=spec.name)
    except ConfigError as error:
        raise ConfigError(problems=[(None, _locate(spec, row, preset_name, overrides, f, t)) for f, t in error.problems]) from error
    return config


def plan_asset(row: CatalogRow, out: Store | str | Path, preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None) -> AssetPlan:
    """Configs, identities, directories and inputs of every stage the row runs. Raises ConfigError
    (naming the row's line) when a config does not resolve."""
    overrides = dict(overrides or {})
    preset_name = row.preset or preset
    try:
        preset_data = load_preset(preset_name)
    except ConfigError as error:
        raise ConfigError(f"{location(row.line, asset_id=row.asset_id)}: {error}") from error
    store = open_store(out)
    stages: list[PlannedStage] = []
    upstream: Upstream = {}
    identities: dict[Path, str] = {}
    problems: list[str] = []
    for spec in (spec for spec in STAGES if spec.runs_for(row)):
        directory = store.local / row.asset_id / spec.name
        upstream_before, upstream[spec.name] = dict(upstream), directory
        try:
            config = stage_config(spec, row, preset_name, preset_data, overrides)
        except ConfigError as error:
            problems += [text for _, text in error.problems]
            continue
        try:
            weights = weights_fingerprints(config)
        except ModelNotFoundError as error:
            problems.append(f"{location(row.line, asset_id=row.asset_id)}, model: {error}")
            continue
        if problems:
            continue  # the asset is refused; the later stages are still checked
        inputs = spec.inputs(row, upstream_before)
        linked = {key: identities[path] if path in identities else file_digest(path)[:16] for key, path in inputs.items()}
        identity = config_hash(row.asset_id, spec.name, config, linked, source_fingerprint(spec.module), weights)
        stages.append(PlannedStage(row.asset_id, spec, config, identity, directory, inputs, store))
        identities[directory] = identity
    if problems:
        raise ConfigError(problems=[(None, text) for text in dict.fromkeys(problems)])
    return AssetPlan(row, preset_name, overrides, store, stages)


def _check_override_key(key: str, where: str) -> str | None:
    """Why the dotted override `key` names no config field of a stage, or None."""
    section, _, name = key.partition(".")
    if section not in OVERRIDE_SECTIONS:
        return f"{where}: unknown config section {section!r}; valid: {', '.join(OVERRIDE_SECTIONS)}"
    owners = [spec.config_class() for spec in STAGES if spec.name == section]
    if section == "model":
        owners = [cls for cls in (spec.config_class() for spec in STAGES) if "model" in typing.get_type_hints(cls)][:1]
        name = key
    try:
        for cls in owners:
            _field_type(cls, name, where)
    except ConfigError as error:
        return str(error)
    return None


def load_catalog(
    path: Path, preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None, out: Store | str | Path = "out"
) -> tuple[Catalog, list[AssetPlan]]:
    """Read the catalog and plan every row; raise one CatalogError listing every problem found."""
    catalog, problems = read_catalog(path, lambda column: _check_override_key(column, f"header: column {column!r}"))
    problems += [p for key in overrides or {} if (p := _check_override_key(key, f"--set {key}"))]
    plans = []
    store = open_store(out)
    for row in catalog.rows:
        try:
            plans.append(plan_asset(row, store, preset, overrides))
        except ConfigError as error:
            problems += [f"{field}: {text}" if field else text for field, text in error.problems]
    if problems:
        raise CatalogError(catalog.path, sorted(set(problems), key=problems.index))
    return catalog, plans


class InjectedFault(RuntimeError):
    """Raised by a stage named in CSD_ASSET_FAIL_STAGE."""


class StageFailed(RuntimeError):
    """A stage raised; the message says which stage of which asset, and why."""


def describe_failure(stage: PlannedStage, error: BaseException) -> str:
    import torch

    where = f"stage {stage.name!r} of asset {stage.asset_id!r}"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return (
            f"CUDA out of memory in {where}: another process may hold the GPU (check nvidia-smi), or lower this "
            f"stage's resolution/batch_size (e.g. a `{stage.name}.batch_size` catalog column). {error}"
        )
    return f"{where} failed: {type(error).__name__}: {error}"


@dataclass
class StageOutcome:
    """What happened to one stage in one run. `status`: ran, reused or failed."""

    stage: str
    status: str
    identity: str
    seconds: float = 0.0
    result: StageResult | None = None
    error: str | None = None


def _committed_at(store: Store, directory: Path) -> float:
    """When the stage was committed: recorded in its result (older results: the file's time)."""
    result = store.committed(directory)
    local = Path(directory) / RESULT_FILE
    return result.committed_at or (local.stat().st_mtime if local.exists() else 0.0)


def older_than_inputs(stage: PlannedStage) -> bool:
    """Whether an upstream stage was committed after this stage's completed directory (the upstream
    ran again, e.g. a rerun or a failed stage computed anew), so this stage must run again although
    its identity matches. Like make, by commit times: a stage that another batch computed from the
    current upstream files is reused, not computed twice."""
    store = stage.store
    upstream = [path for path in stage.inputs.values() if store.committed(path) is not None]
    return bool(upstream) and max(_committed_at(store, p) for p in upstream) > _committed_at(store, stage.directory)


def execute_stage(stage: PlannedStage, force: bool = False, callback: StepCallback = None) -> StageOutcome:
    """Reuse the completed stage directory with this identity (unless `force`, or an upstream stage was
    committed after it), or run the stage module. With an object-store root (`flows.store`) a stage
    is reused from the root without downloading it; a stage that runs first pulls its upstream stages
    and the checkpoint of an unfinished run, and its result goes back to the root."""
    faults = {f.strip() for f in os.environ.get(FAULT_ENV, "").split(",")}
    store = stage.store
    # a second run of the same stage (another batch, another worker) waits here, then reuses the result
    with store.lock(stage.directory):
        if not force:
            if completed(stage.directory, stage.identity) is not None:
                store.push_stage(stage.directory)  # in a bucket root: a run that died between commit and upload
            done = store.committed(stage.directory, stage.identity)
            if done is not None and not older_than_inputs(stage):
                log.info("asset %s: %s reused (%s)", stage.asset_id, stage.name, stage.identity)
                return StageOutcome(stage.name, "reused", stage.identity, result=done)
        started = time.perf_counter()
        try:
            if f"{stage.asset_id}/{stage.name}" in faults:
                raise InjectedFault(f"{FAULT_ENV} names {stage.asset_id}/{stage.name}")
            callback = store.prepare(stage.directory, stage.inputs.values(), stage.identity, callback)
            result = stage.spec.load().run(stage.config, stage.directory, inputs=stage.inputs, identity=stage.identity, callback=callback)
            store.push_stage(stage.directory)
        except Exception as error:
            raise StageFailed(describe_failure(stage, error)) from error
    return StageOutcome(stage.name, "ran", stage.identity, time.perf_counter() - started, result)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def current_worker() -> dict[str, Any]:
    """This process: host, process id, parent process id (the Prefect worker) and the GPUs it sees."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _abandoned(worker: dict[str, Any]) -> str:
    """Why a record whose process (`worker`) died is ended by this one, for the stage's error and its MLflow tag."""
    here = current_worker()
    return (f"did not finish: the process that ran it ({worker.get('host', '?')} pid {worker.get('pid', '?')}) ended without "
            f"recording an outcome (killed, out of memory, or its machine lost); closed by {here['host']} pid {here['pid']} "
            "once its lock was free")


@dataclass
class AssetRecord:
    """`<out>/<asset_id>/asset.json`: the row, preset and per-stage status of the asset's last run."""

    asset_id: str
    row: dict[str, Any]
    preset: str
    overrides: dict[str, Any]
    status: str = "running"
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)
    """Where and under which keys `flows.tracking` syncs this record: the MLflow URI and experiment,
    the asset run's key (a stage rerun logs under it), its parent's, the run tags; once synced, the run id;
    `batch_record`, the record of the batch that submitted it (`close_abandoned` leaves it to a live batch)."""
    started_at: str = ""
    finished_at: str = ""
    wall_seconds: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)
    """Where the asset ran: host, process id, parent process id (the Prefect worker) and the GPUs it saw."""

    @classmethod
    def start(cls, plan: AssetPlan, tracking: dict[str, Any]) -> "AssetRecord":
        record = cls(plan.row.asset_id, plan.row.to_dict(), plan.preset, plan.overrides, tracking=tracking, started_at=_now(),
                     worker=current_worker())
        record.stages = {s.name: {"status": "pending", "identity": s.identity} for s in plan.stages}
        return record

    @property
    def rel(self) -> str:
        return f"{self.asset_id}/{ASSET_RECORD}"

    def end(self, reason: str) -> None:
        """Fail a run that cannot finish (`reason`: "did not finish: …"): the stage it was in, or would
        have started, fails with that error, the later ones are blocked, as after a stage's own failure."""
        unfinished = [(name, entry) for name, entry in self.stages.items() if entry["status"] in ("running", "pending")]
        for i, (name, entry) in enumerate(unfinished):
            if i == 0:
                entry.update(status="failed", error=f"stage {name!r} of asset {self.asset_id!r} {reason}", finished_at=_now())
            else:
                entry["status"] = "blocked"
        self.status, self.finished_at = "failed", _now()

    @classmethod
    def _read(cls, store: Store, rel: str) -> "AssetRecord | None":
        try:
            return cls(**json.loads(store.read_text(rel) or "null"))
        except (json.JSONDecodeError, TypeError):
            return None

    @classmethod
    def load(cls, out: Store | str | Path, asset_id: str) -> "AssetRecord | None":
        return cls._read(open_store(out), f"{asset_id}/{ASSET_RECORD}")

    def save(self, out: Store | str | Path) -> None:
        open_store(out).write_text(f"{self.asset_id}/{ASSET_RECORD}", json.dumps(dataclasses.asdict(self), indent=2))

    def hand_to_batch(self, out: Store | str | Path, batch_id: str) -> None:
        """Leave a copy for the batch `batch_id`, which collects it with `collect`."""
        open_store(out).write_text(f"{self.asset_id}/{BATCH_RECORDS}/{batch_id}.json", json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def collect(cls, out: Store | str | Path, asset_id: str, batch_id: str) -> "AssetRecord | None":
        """The record the asset's run left for batch `batch_id` (removed once read), or None when the
        run ended before writing one (crashed)."""
        store, rel = open_store(out), f"{asset_id}/{BATCH_RECORDS}/{batch_id}.json"
        record = cls._read(store, rel)
        if record is not None:
            store.remove(rel)
        return record


@dataclass
class BatchRecord:
    """`<out>/batches/<batch_id>/batch.json`: what the batch's MLflow run shows (tags, params,
    metrics, summary, files relative to the root) and the records of the assets it collected."""

    batch_id: str
    name: str
    tracking: dict[str, Any]
    tags: dict[str, Any]
    params: dict[str, Any]
    started_at: str = field(default_factory=lambda: _now())
    status: str = "running"
    metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    files: list[str] = field(default_factory=list)
    assets: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    finished_at: str = ""
    worker: dict[str, Any] = field(default_factory=dict)
    """The process that runs the batch (`current_worker`)."""

    @property
    def rel(self) -> str:
        return f"{BATCH_RECORDS}/{self.batch_id}/batch.json"

    def end(self, reason: str) -> None:
        """Fail a batch that cannot finish: `reason` ("did not finish: …") is its summary and its tag `error`."""
        self.status, self.finished_at, self.summary = "failed", _now(), f"# {self.name}: {reason}\n"
        self.tags["error"] = reason

    def save(self, out: Store | str | Path) -> None:
        open_store(out).write_text(self.rel, json.dumps(dataclasses.asdict(self), indent=2))


Executor = Callable[[PlannedStage, bool], StageOutcome]


def _lock_of(store: Store, rel: str) -> Path:
    """What the record at `rel` is owned by: the lock `<record>.lock` beside it (`store.lock`)."""
    return store.local / rel.removesuffix(".json")


@contextlib.contextmanager
def owning(store: Store, record: AssetRecord | BatchRecord, saved: Callable[[Any], None]) -> Iterator[None]:
    """Own `record` while it runs: hold its lock throughout, so that a record left running by a dead
    process can be told from a live one (`close_abandoned`), and end it as failed (then `saved(record)`)
    when an error escapes — an interrupt, a cancellation, the store failing — before the error goes on."""
    with store.lock(_lock_of(store, record.rel)):
        try:
            yield
        except BaseException as error:
            if record.status == "running":
                record.end(f"did not finish: {type(error).__name__}: {error}")
                with contextlib.suppress(Exception):  # the store may be what failed: `close_abandoned` ends it later
                    record.save(store)
                    saved(record)
            raise


def close_abandoned(store: Store, rel: str, wait: float = 0.0, by_its_batch: bool = False) -> bool:
    """End the record at `rel` (an `asset.json` or a `batch.json`) as failed if it says running while
    no process owns it, i.e. its lock is free or frees within `wait` seconds (a dead process's flock is
    released by the kernel, its lease expires); True when it did. A held lock means running, on this
    machine or another: that record is left alone; so is an asset's while its batch runs (the batch's
    lock held), unless `by_its_batch`: the batch may submit the asset again, continuing its MLflow runs,
    and ends the record itself otherwise. Failed (MLflow FAILED), not killed: MLflow's KILLED is a run a
    user stopped, while how this one ended is not known, and like any failed asset it needs another run."""
    try:
        with store.lock(_lock_of(store, rel), timeout=wait):
            data = json.loads(store.read_text(rel) or "null")
            if not data or data.get("status") != "running":
                return False
            batch = None if by_its_batch else (data.get("tracking") or {}).get("batch_record")
            with store.lock(_lock_of(store, batch), timeout=0) if batch else contextlib.nullcontext():
                record = (BatchRecord if "assets" in data else AssetRecord)(**data)
                record.end(_abandoned(record.worker))
                record.save(store)
                return True
    except TimeoutError:
        return False


def run_asset(
    plan: AssetPlan, *, rerun_stage: str | None = None, execute: Executor = execute_stage, tracking: dict[str, Any] | None = None,
    saved: Callable[[AssetRecord], None] = lambda record: None,
) -> AssetRecord:
    """Run (or reuse) the plan's stages in order; stop at the first failure. `rerun_stage` forces
    that stage to run, and so every later one (`execute_stage` recomputes a stage whose upstream was
    committed after it). Writes `asset.json` (with `tracking`) at the start and after every stage,
    calling `saved(record)` then (the flow syncs MLflow there and notes the runs' ids in `tracking`,
    which the last write keeps), all under the asset's lock (`owning`).

    An earlier run's record found still running once the lock is taken was left by a dead process: it
    is ended (and `saved`) first, unless this run continues its MLflow runs (a resubmitted attempt of
    the same batch: the same `stage_prefix`), so that no run of it stays RUNNING in MLflow."""
    if rerun_stage is not None:
        plan.stage(rerun_stage)
    store, record = plan.store, AssetRecord.start(plan, tracking or {})
    with owning(store, record, saved):
        previous = AssetRecord.load(store, record.asset_id)
        if previous and previous.status == "running" and previous.tracking.get("stage_prefix") != record.tracking.get("stage_prefix"):
            previous.end(_abandoned(previous.worker))
            previous.save(store)
            saved(previous)
        record.started_at = _now()  # not while it waited for the lock
        record.save(store)
        saved(record)
        started = time.perf_counter()
        for stage in plan.stages:
            entry = record.stages[stage.name]
            if record.status == "failed":
                entry["status"] = "blocked"
                continue
            entry["status"] = "running"
            record.save(store)
            try:
                outcome = execute(stage, stage.name == rerun_stage)
            except Exception as error:
                log.error("asset %s: %s", plan.row.asset_id, error)
                outcome = StageOutcome(stage.name, "failed", stage.identity, error=str(error))
                record.status = "failed"
            entry.update(status=outcome.status, seconds=round(outcome.seconds, 3), error=outcome.error, finished_at=_now())
            if outcome.result is not None:
                entry["metrics"] = outcome.result.metrics
            record.save(store)
            saved(record)
        if record.status != "failed":
            record.status = "completed"
        record.finished_at = _now()
        record.wall_seconds = round(time.perf_counter() - started, 3)
        record.save(store)
        saved(record)
        record.save(store)  # with what `saved` noted
    return record


def stage_states(out: Store | str | Path) -> dict[str, dict[str, str]]:
    """`{asset_id: {stage: done | failed | running | blocked | stale | missing}}` from `asset.json`
    records checked against the stage directories (a `done` stage whose directory no longer holds
    the recorded identity is `stale`)."""
    store = open_store(out)
    table: dict[str, dict[str, str]] = {}
    for rel in store.glob(f"*/{ASSET_RECORD}"):
        record = AssetRecord.load(store, rel.split("/")[0])
        if record is None:
            continue
        row: dict[str, str] = {}
        for name, entry in record.stages.items():
            status = entry.get("status", "missing")
            if status in ("ran", "reused"):
                done = store.committed(store.local / record.asset_id / name, entry.get("identity"))
                status = "done" if done is not None else "stale"
            elif status == "pending":
                status = "missing"
            row[name] = status
        table[record.asset_id] = row
    return table
