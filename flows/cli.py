"""The `csd-asset` command line."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


OUT_HELP = "output root: a folder or an fsspec URL such as s3://bucket/csd (default ./out)"


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def doctor(args: argparse.Namespace) -> int:
    """Report what this machine can run: packages, torch/CUDA, rasterizer backends, model caches."""
    import torch
    from huggingface_hub import constants

    from csd.models import TOY_PRIOR
    from csd.prompts import default_cache_dir

    rows = [("csd-asset", _version("csd-asset")), ("python", sys.version.split()[0])]
    rows += [(p, _version(p)) for p in ("torch", "diffusers", "transformers", "prefect", "mlflow", "trimesh", "pymeshlab", "xatlas")]
    cuda = torch.cuda.is_available()
    rows.append(("cuda", f"yes ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})" if cuda else "no (CPU only)"))
    # find_spec only: nvdiffrast must never be imported on a machine without CUDA
    nvdiffrast = importlib.util.find_spec("nvdiffrast") is not None
    rows.append(("nvdiffrast", "installed" if nvdiffrast else "not installed (pip install 'csd-asset[gpu]' on CUDA machines)"))
    rows.append(("rasterizer 'auto'", "nvdiffrast" if cuda and nvdiffrast else "cpu"))
    rows.append(("toy prior", str(TOY_PRIOR) if (TOY_PRIOR / "model_index.json").exists() else f"MISSING at {TOY_PRIOR}"))
    rows.append(("hugging face cache", f"{constants.HF_HUB_CACHE} (offline: {constants.HF_HUB_OFFLINE})"))
    rows.append(("text embedding cache", str(default_cache_dir())))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set expects SECTION.FIELD=VALUE (e.g. nerf.steps=200), got {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def _check_catalog(args: argparse.Namespace, only: list[str] | None = None):
    """The asset plans of the catalog's rows (the `only` ones), or None after printing every problem."""
    from flows.catalog import CatalogError
    from flows.pipeline import load_catalog

    try:
        catalog, plans = load_catalog(args.catalog, args.preset, _overrides(args.set), args.out)
        selected = {row.asset_id for row in catalog.select(only)}
    except CatalogError as error:
        print(error, file=sys.stderr)
        return None
    return [plan for plan in plans if plan.row.asset_id in selected]


def validate(args: argparse.Namespace) -> int:
    """Check a catalog (columns, values, presets, meshes, config overrides) without running anything."""
    plans = _check_catalog(args)
    if plans is None:
        return 1
    for plan in plans:
        print(f"{plan.row.asset_id:<24} {plan.preset:<10} {' → '.join(s.name for s in plan.stages)}")
    print(f"{args.catalog}: {len(plans)} asset(s), no problems")
    return 0


def config(args: argparse.Namespace) -> int:
    """Print the resolved config of every planned stage as YAML: the same plan `run` executes
    (`load_catalog` → `plan_asset` → `stage_config`), nothing re-resolved here."""
    import dataclasses

    import yaml

    from csd.guidance import guidance_config
    from stages.config import config_to_dict

    def resolved(stage) -> dict:
        entry = {"identity": stage.identity, "config": config_to_dict(stage.config)}
        method, overrides = getattr(stage.config, "method", None), getattr(stage.config, "guidance", None)
        if method is not None and overrides is not None:
            # the preset's coefficients with the overrides applied: what ScoreDistillation will use
            entry["guidance_resolved"] = dataclasses.asdict(guidance_config(method, **overrides))
        return entry

    if args.catalog is None:
        return _config_without_catalog(args)
    plans = _check_catalog(args, [args.asset] if args.asset else None)
    if plans is None:
        return 1
    if args.asset and not plans:
        print(f"{args.catalog}: no asset {args.asset!r}", file=sys.stderr)
        return 1
    for plan in plans:
        stages = [plan.stage(args.stage)] if args.stage else plan.stages
        document = {
            "asset": plan.row.asset_id,
            "preset": plan.preset,
            "stages": {stage.name: resolved(stage) for stage in stages},
        }
        sys.stdout.write("---\n" + yaml.safe_dump(document, sort_keys=False, width=120, default_flow_style=None))
    return 0


PLACEHOLDER_PROMPT = "a red cube"
"""The prompt of `csd-asset config --preset P` without a catalog: a toy-world prompt, valid for every preset."""


def _config_without_catalog(args: argparse.Namespace) -> int:
    """`config` for one row `example,<--prompt>` under `--preset`: a one-row catalog planned the same way."""
    import tempfile

    from stages.config import ConfigError, load_preset

    if args.asset:
        print("config: --asset needs a catalog", file=sys.stderr)
        return 2
    try:
        load_preset(args.preset)
    except ConfigError as error:
        print(f"config: --preset: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="csd-asset-config-") as folder:
        catalog = Path(folder) / "example.csv"
        with catalog.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow(["asset_id", "prompt"])
            csv.writer(handle).writerow(["example", args.prompt or PLACEHOLDER_PROMPT])
        return config(argparse.Namespace(**{**vars(args), "catalog": catalog}))


def _print_status(out: str, only: list[str] | None = None) -> None:
    from flows.pipeline import STAGE_NAMES, stage_states

    table = {k: v for k, v in stage_states(out).items() if not only or k in only}
    if not table:
        print(f"no assets under {out}")
        return
    width = max(len("asset"), *map(len, table))
    print(f"{'asset':<{width}}  " + "  ".join(f"{name:<8}" for name in STAGE_NAMES))
    for asset_id, stages in table.items():
        print(f"{asset_id:<{width}}  " + "  ".join(f"{stages.get(name, '-'):<8}" for name in STAGE_NAMES))


def status(args: argparse.Namespace) -> int:
    """Table of assets × stages under the output root: done, failed, blocked, running, stale, missing.
    Exits 1 when a stage failed."""
    from flows.pipeline import stage_states

    _print_status(args.out)
    if args.sheet:
        from flows.sheet import write_sheet

        entries = write_sheet(args.out, args.sheet)
        print(f"contact sheet of {len(entries)} assets: {args.sheet}")
    return 1 if any("failed" in stages.values() for stages in stage_states(args.out).values()) else 0


def _print_outputs(out: str, asset_ids: list[str]) -> None:
    from flows.pipeline import AssetRecord
    from flows.store import open_store
    from flows.tracking import experiment_link, tracking_uri

    store = open_store(out)
    experiment_id = None
    for asset_id in asset_ids:
        record = AssetRecord.load(store, asset_id)
        experiment_id = (record.tracking.get("experiment_id") if record else None) or experiment_id
        done = [name for name, entry in (record.stages if record else {}).items() if entry.get("status") in ("ran", "reused")]
        glbs = store.glob(f"{asset_id}/{done[-1]}/*.glb") if done else []
        print(f"{asset_id}: {store.path(glbs[0]) if glbs else (store.path(f'{asset_id}/{done[-1]}') if done else 'nothing finished')}")
    uri = tracking_uri(store.local)
    server = "http://127.0.0.1:5000" if uri.startswith("sqlite") else uri
    review = f"mlflow ui --backend-store-uri {uri} --port 5000, then " if uri.startswith("sqlite") else ""
    print(f"MLflow: {uri}\n  review with: {review}open {experiment_link(server, experiment_id)}")


def run(args: argparse.Namespace) -> int:
    """Run a catalog as the Prefect flow `csd-asset` (temporary local Prefect server unless PREFECT_API_URL is set)."""
    plans = _check_catalog(args, args.only)
    if plans is None:
        return 1
    from flows.flow import batch, stage_workers

    with stage_workers(min(args.parallel, len(plans))):  # started before the batch's Prefect server
        state = batch(
            catalog=str(args.catalog), preset=args.preset, out=str(args.out), only=args.only, overrides=_overrides(args.set),
            max_parallel_assets=args.parallel, stage_retries=args.retries, return_state=True,
        )
    ids = [plan.row.asset_id for plan in plans]
    _print_status(args.out, ids)
    _print_outputs(args.out, ids)
    return 0 if state.is_completed() else 1


def rerun(args: argparse.Namespace) -> int:
    """Force one stage of one asset (and its later stages) to run again; logs under the asset's MLflow run."""
    from flows.flow import asset
    from flows.pipeline import AssetRecord

    if args.catalog is not None:
        plans = _check_catalog(args, [args.asset_id])
        if plans is None:
            return 1
        row = plans[0].row.to_dict()
        preset, overrides = args.preset, _overrides(args.set)
    else:
        record = AssetRecord.load(args.out, args.asset_id)
        if record is None:
            print(f"no record of asset {args.asset_id!r} under {args.out}; pass --catalog", file=sys.stderr)
            return 1
        row, preset, overrides = record.row, record.preset, {**record.overrides, **_overrides(args.set)}
    state = asset(row=row, out=str(args.out), preset=preset, overrides=overrides, rerun_stage=args.stage,
                  stage_retries=args.retries, return_state=True)
    _print_status(args.out, [args.asset_id])
    return 0 if state.is_completed() else 1


def sync_tracking(args: argparse.Namespace) -> int:
    """Make MLflow match the batch and asset records that could not be synced when they were written
    (server down), and those still running, ending as failed each whose process is gone (its lock is
    free). Exits 1 while some stay unsynced, so that a cron job or CI step notices."""
    from flows.store import open_store
    from flows.tracking import PENDING, sync_pending

    store = open_store(args.out)
    left = sync_pending(store)
    print(f"{args.out}: {len(left)} record(s) still not synced to MLflow" if left else f"{args.out}: MLflow is in sync")
    if running := len(store.glob(f"{PENDING}/*.txt")) - len(left):
        print(f"  {running} record(s) still running: their processes hold their locks")
    for problem in left:
        print(f"  {problem}")
    return 1 if left else 0


def score(args: argparse.Namespace) -> int:
    """Ground-truth shape/colour and open-set evaluator scores of each finished stage with geometry or a
    texture, per asset: a table, or one JSON object per asset with `--json`. Exits 1 when an asked-for
    asset is missing."""
    import json

    from flows.pipeline import AssetRecord, stage_states
    from flows.store import open_store
    from stages.score import SCORED_STAGES, score_asset

    store = open_store(args.out)
    table = stage_states(store)
    missing = [a for a in args.asset or [] if a not in table]
    for asset_id in missing:
        print(f"no asset {asset_id!r} under {args.out}", file=sys.stderr)
    wanted = [a for a in table if not args.asset or a in args.asset]
    if not wanted and not missing:
        print(f"no assets under {args.out}")
    for asset_id in wanted:
        record = AssetRecord.load(store, asset_id)
        done = [name for name, state in table[asset_id].items() if state == "done" and name in SCORED_STAGES]
        result = score_asset(store.local / asset_id, record.row if record else {}, done)
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        print(f"{asset_id}: {result['prompt']!r}" + (f" → edit {result['edit_prompt']!r}" if result.get("edit_prompt") else ""))
        if not result["stages"]:
            print("  no finished stage with geometry or a texture")
        for stage, numbers in result["stages"].items():
            if "not_scored" in numbers or "error" in numbers:
                print(f"  {stage:<8} {numbers.get('not_scored') or numbers['error']}")
                continue

            def cell(key: str, fmt: str = ".3f") -> str:
                value = numbers.get(key)
                return "-" if value is None else format(value, fmt) if isinstance(value, float) else str(value)

            print(f"  {stage:<8} shape_iou {cell('shape_iou')}  margin {cell('shape_margin'):>6}  best {cell('best_shape'):<6}  "
                  f"colour_error {cell('colour_error')}  nearest {cell('nearest_colour'):<6}  "
                  f"open-set colour {cell('colour_accuracy', '.2f')} shape {cell('shape_accuracy', '.2f')} ({cell('views')} views)")
    return 1 if missing else 0


def build_parser() -> argparse.ArgumentParser:
    from flows.pipeline import DEFAULT_PRESET, STAGE_NAMES

    parser = argparse.ArgumentParser(prog="csd-asset", description="CSV prompt catalogs to textured 3D assets with CSD.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version('csd-asset')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="report torch/CUDA/nvdiffrast availability and model caches").set_defaults(func=doctor)

    def common(command: argparse.ArgumentParser, catalog_required: bool = True, catalog_optional: bool = False) -> None:
        if catalog_optional:
            command.add_argument("catalog", type=Path, nargs="?",
                                 help="CSV catalog (schema: catalogs/README.md); without it, one row "
                                      f"'example' with --prompt (default {PLACEHOLDER_PROMPT!r}) under --preset")
        elif catalog_required:
            command.add_argument("catalog", type=Path, help="CSV catalog (schema: catalogs/README.md)")
        command.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset for rows without a preset column (default {DEFAULT_PRESET})")
        command.add_argument("--out", default="out", help=OUT_HELP)
        command.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                             help="config override for every row, e.g. --set nerf.steps=200 (repeatable)")

    command = sub.add_parser("run", help="make every asset of a catalog (Prefect flow csd-asset)")
    common(command)
    command.add_argument("--only", nargs="+", metavar="ID", help="only these asset ids")
    command.add_argument("--parallel", type=int, default=1, help="assets at a time (default 1); above 1 each runs its stages in a worker process with cores/N torch threads")
    command.add_argument("--retries", type=int, default=1, help="Prefect retries of a failed stage (default 1)")
    command.set_defaults(func=run)

    command = sub.add_parser("rerun", help="run one stage of one asset again, and every later stage")
    command.add_argument("asset_id")
    command.add_argument("--stage", required=True, choices=STAGE_NAMES)
    command.add_argument("--catalog", type=Path, help="take the row from this catalog (default: as the asset last ran)")
    common(command, catalog_required=False)
    command.add_argument("--retries", type=int, default=0, help="Prefect retries of a failed stage (default 0)")
    command.set_defaults(func=rerun)

    command = sub.add_parser("status", help="assets x stages under an output root: done / failed / missing")
    command.add_argument("--out", default="out", help=OUT_HELP)
    command.add_argument("--sheet", type=Path, metavar="FILE", help="also write the batch contact sheet (PNG) there")
    command.set_defaults(func=status)

    command = sub.add_parser("score", help="ground-truth shape/colour and open-set scores of finished assets (toy-world prompts)")
    command.add_argument("out", help="output root: a folder or an fsspec URL (scores its working copy)")
    command.add_argument("--asset", nargs="+", metavar="ID", help="only these asset ids")
    command.add_argument("--json", action="store_true", help="one JSON object per asset instead of the table")
    command.set_defaults(func=score)

    command = sub.add_parser("validate", help="check a catalog and report every problem; runs nothing")
    common(command)
    command.set_defaults(func=validate)

    command = sub.add_parser("config", help="print the fully resolved config of each planned stage as YAML; runs nothing")
    common(command, catalog_optional=True)
    command.add_argument("--prompt", help=f"the prompt of the one-row plan when no catalog is given (default {PLACEHOLDER_PROMPT!r})")
    command.add_argument("--asset", metavar="ID", help="only this asset id")
    command.add_argument("--stage", choices=STAGE_NAMES, help="only this stage")
    command.set_defaults(func=config)

    command = sub.add_parser("sync-tracking", help="sync MLflow with the records written while the tracking server was down")
    command.add_argument("--out", default="out", help=OUT_HELP)
    command.set_defaults(func=sync_tracking)
    return parser


def main(argv: list[str] | None = None) -> int:
    # the temporary Prefect server (no PREFECT_API_URL) migrates a fresh database first: on a small,
    # busy machine that takes longer than Prefect's default 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # offline machines: the servers' phone-home services only print name-resolution errors (and the
    # temporary Prefect server's telemetry heartbeat races the flow for its SQLite database)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # one line per Prefect API call
    from flows.store import StoreError

    try:
        return args.func(args)
    except StoreError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
