"""Orchestration overhead: wall time minus the time spent inside stages, per asset and per batch.

    python bench/orchestration.py                                   # the demo catalog, toy-cpu, fresh output root
    python bench/orchestration.py catalogs/demo.csv --set nerf.steps=50 --set texture.steps=20

Runs the `csd-asset` flow once (a temporary Prefect server unless PREFECT_API_URL is set; MLflow in
the output root unless MLFLOW_TRACKING_URI is set), one asset at a time, and prints for every asset
its flow wall time, the sum of its stage times and the difference (Prefect task runs, MLflow logging,
identity checks, `asset.json` writes). The batch line adds what no asset accounts for: catalog
validation, the MLflow batch run, subflow creation and the summary artifact.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from flows.pipeline import DEFAULT_PRESET, AssetRecord, load_catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalog", nargs="?", type=Path, default=Path(__file__).parents[1] / "catalogs" / "demo.csv")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--out", type=Path, help="output root (default: a fresh temporary folder, so every stage runs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = dict(pair.split("=", 1) for pair in args.set)
    out = args.out or Path(tempfile.mkdtemp(prefix="csd-bench-"))
    catalog, _ = load_catalog(args.catalog, args.preset, overrides, out)

    from flows.flow import batch

    started = time.perf_counter()
    state = batch(catalog=str(args.catalog), preset=args.preset, out=str(out), overrides=overrides, return_state=True)
    wall = time.perf_counter() - started

    print(f"{'asset':<24} {'status':<10} {'asset wall s':>12} {'stages s':>9} {'overhead s':>10}")
    stage_total = asset_total = 0.0
    for row in catalog.rows:
        record = AssetRecord.load(out, row.asset_id)
        if record is None:
            print(f"{row.asset_id:<24} {'no record':<10}")
            continue
        stages = sum(entry.get("seconds") or 0.0 for entry in record.stages.values())
        stage_total += stages
        asset_total += record.wall_seconds
        print(f"{row.asset_id:<24} {record.status:<10} {record.wall_seconds:>12.2f} {stages:>9.2f} {record.wall_seconds - stages:>10.2f}")
    print(f"{'batch':<24} {state.type.value.lower():<10} {wall:>12.2f} {stage_total:>9.2f} {wall - stage_total:>10.2f}"
          f"   (outside any asset: {wall - asset_total:.2f} s)")
    print(f"output root: {out}")


if __name__ == "__main__":
    main()
