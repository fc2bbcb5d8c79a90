"""Scale-out speed-up: the same 4-asset batch on one asset worker, then on two.

    python bench/scale_out.py                                   # nerf.steps=200, texture.steps=40
    python bench/scale_out.py --set nerf.steps=600 --set texture.steps=200

Starts a local cluster on 127.0.0.1 under a temporary folder: a `prefect server`, an `mlflow server`,
the `csd-gpu` pool with this repository's deployments, a batch worker, and asset workers that take
one asset at a time with one CPU thread each (a worker per "GPU"). The batch runs as
`prefect deployment run csd-asset/batch --watch` into a fresh output root, first with one asset
worker and then, after a second one is started, again. For each run it prints every asset's flow-run
time and stage time, the batch wall time, and the sum of the asset flow runs; the speed-up is the
one-worker wall time over the two-worker wall time. A machine with fewer than 2 free cores cannot
show one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests" / "flows"))

from servers import Cluster  # noqa: E402

from flows.pipeline import AssetRecord  # noqa: E402

PROMPTS = [("red-cube", "a red cube"), ("blue-sphere", "a blue sphere"), ("green-cube", "a green cube"), ("yellow-sphere", "a yellow sphere")]
DEFAULTS = {"nerf.steps": "200", "texture.steps": "40", "export.scorer": "none"}


def run_batch(cluster: Cluster, catalog: Path, out: Path, overrides: dict[str, str]) -> dict:
    """Run the batch deployment; per-asset times from the flow runs and the asset records."""
    parameters = {"catalog": str(catalog), "preset": "toy-cpu", "out": str(out), "overrides": overrides, "stage_retries": 0,
                  "experiment": "bench-scale-out", "asset_deployment": "csd-asset-single/asset"}
    started = time.perf_counter()
    cluster.prefect("deployment", "run", "csd-asset/batch", "--params", json.dumps(parameters), "--watch", timeout=3600)
    wall = time.perf_counter() - started
    records = {asset_id: AssetRecord.load(out, asset_id) for asset_id, _ in PROMPTS}
    missing = [asset_id for asset_id, record in records.items() if record is None or record.status != "completed"]
    if missing:
        raise SystemExit(f"assets not completed: {missing}; logs in {cluster.root}")
    runs = cluster.asset_runs(records[PROMPTS[0][0]].tracking["batch_id"])
    flow_seconds = {r.name: (r.end_time - r.start_time).total_seconds() for r in runs if r.state.is_completed()}
    workers = {process.pid: name for name, process in cluster.processes.items()}
    return {"wall": wall, "assets": {asset_id: {"flow_run_s": flow_seconds[asset_id], "stages_s": record.wall_seconds,
                                                 "worker": workers.get(record.worker["parent_pid"], "?")}
                                     for asset_id, record in records.items()}}


def report(label: str, result: dict) -> None:
    print(f"\n{label}")
    for asset_id, entry in result["assets"].items():
        print(f"  {asset_id:<14} {entry['worker']:<6} flow run {entry['flow_run_s']:6.1f} s, stages {entry['stages_s']:6.1f} s")
    total = sum(entry["flow_run_s"] for entry in result["assets"].values())
    print(f"  sum of asset flow runs {total:.1f} s; batch wall time {result['wall']:.1f} s; sum / wall {total / result['wall']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override for every asset")
    parser.add_argument("--keep", action="store_true", help="keep the cluster folder (logs, outputs)")
    args = parser.parse_args()
    overrides = {**DEFAULTS, **dict(pair.split("=", 1) for pair in args.set)}
    root = Path(tempfile.mkdtemp(prefix="csd-scale-out-"))
    catalog = root / "catalog.csv"
    catalog.write_text("asset_id,prompt,seed\n" + "".join(f"{asset_id},{prompt},{i}\n" for i, (asset_id, prompt) in enumerate(PROMPTS)))
    cluster = Cluster(root)
    try:
        print(f"starting the cluster in {root} …", flush=True)
        cluster.start_services(crash_after_s=600)
        cluster.start_worker("batch-worker", "batch", 4)
        cluster.start_worker("gpu-a", "assets", 1, CUDA_VISIBLE_DEVICES="0")
        one = run_batch(cluster, catalog, root / "out-1", overrides)
        report("1 asset worker", one)
        cluster.start_worker("gpu-b", "assets", 1, CUDA_VISIBLE_DEVICES="1")
        two = run_batch(cluster, catalog, root / "out-2", overrides)
        report("2 asset workers", two)
        print(f"\noverrides {overrides}\nspeed-up from the second worker: {one['wall'] / two['wall']:.2f}x "
              f"(batch wall {one['wall']:.1f} s → {two['wall']:.1f} s)")
    finally:
        cluster.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
