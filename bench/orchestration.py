"""A batch at `--parallel 1` and `--parallel 2`: wall time, CPU busy, and the orchestration overhead.

    python bench/orchestration.py                  # blue-sphere + yellow-torus of the demo catalog, nerf 150 / texture 40 steps
    python bench/orchestration.py --parallel 1 2 1 2          # each twice, in turn (a noisy machine)
    python bench/orchestration.py --parallel 1 2 4 --only red-cube blue-sphere --set edit.steps=40
    python bench/orchestration.py catalogs/demo.csv --only "" --set nerf.steps=50   # every row

Runs `csd-asset run` once per `--parallel` value, each in a fresh subprocess with a fresh output root
(so every stage runs; a temporary Prefect server unless PREFECT_API_URL is set; MLflow in the output
root unless MLFLOW_TRACKING_URI is set), and prints for each: the wall time, the CPU time of the
whole process tree (user + sys of the CLI, its worker processes, the Prefect server it starts), the
cores busy ((user + sys) / (wall × cores)), the speed-up over the first value, and per asset its
wall time, its stage time and the difference (Prefect task runs, MLflow logging, identity checks).
Issue 20's bars for the 2-asset batch at `--parallel 2`: ≥ 1.25× faster than at 1, cores ≥ 90 % busy.
The machine's load average is printed with each run: on a shared machine other processes' work
slows every run, and the runs take turns, so compare numbers from one invocation.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.pipeline import DEFAULT_PRESET, AssetRecord, load_catalog  # noqa: E402
from flows.workers import usable_cores  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_batch(args, parallel: int, out: Path) -> dict:
    command = [sys.executable, "-m", "flows.cli", "run", str(args.catalog), "--out", str(out), "--preset", args.preset,
               "--parallel", str(parallel), *(f"--set={pair}" for pair in args.set)]
    if args.only:
        command += ["--only", *args.only]
    load = os.getloadavg()[0]
    cpu, started = children_cpu(), time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
        raise SystemExit(f"--parallel {parallel}: csd-asset run exited with {completed.returncode}")
    return {"parallel": parallel, "wall": wall, "cpu": cpu, "load": load, "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalog", nargs="?", type=Path, default=ROOT / "catalogs" / "demo.csv")
    parser.add_argument("--only", nargs="*", default=["blue-sphere", "yellow-torus"], help="asset ids (none: every row)")
    parser.add_argument("--parallel", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--set", action="append", default=None, metavar="SECTION.FIELD=VALUE",
                        help="overrides for every row (default: nerf.steps=150, texture.steps=40)")
    args = parser.parse_args()
    args.only = [a for a in args.only if a]
    args.set = args.set if args.set is not None else ["nerf.steps=150", "texture.steps=40"]
    cores = usable_cores()
    root = Path(tempfile.mkdtemp(prefix="csd-bench-orchestration-"))
    catalog, _ = load_catalog(args.catalog, args.preset, dict(pair.split("=", 1) for pair in args.set), root / "check")
    rows = [r for r in catalog.rows if not args.only or r.asset_id in args.only]
    runs = [run_batch(args, parallel, root / f"{i}-parallel-{parallel}") for i, parallel in enumerate(args.parallel)]

    print(f"{len(rows)} assets ({', '.join(r.asset_id for r in rows)}), {' '.join(args.set)}; {cores} cores")
    print(f"{'parallel':>8} {'wall s':>8} {'CPU s':>8} {'busy':>6} {'speed-up':>8} {'load':>5}   per asset: wall / stages / overhead s")
    for run in runs:
        assets = []
        for row in rows:
            record = AssetRecord.load(run["out"], row.asset_id)
            stages = sum(entry.get("seconds") or 0.0 for entry in record.stages.values())
            assets.append(f"{row.asset_id} {record.wall_seconds:.0f} / {stages:.0f} / {record.wall_seconds - stages:.0f}")
        busy = run["cpu"] / (run["wall"] * cores)
        print(f"{run['parallel']:>8} {run['wall']:>8.1f} {run['cpu']:>8.1f} {busy:>6.0%} {runs[0]['wall'] / run['wall']:>7.2f}× "
              f"{run['load']:>5.1f}   " + "; ".join(assets))
    print(f"(load: 1-min load average when the run started; output roots under {root})")


if __name__ == "__main__":
    main()
