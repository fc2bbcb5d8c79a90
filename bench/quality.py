"""Toy-world quality that cannot be fooled: ground-truth shape IoU and colour error (and the open-set
evaluator's accuracies) per method and stage, through `nerf → mesh → uv → texture`.

    python bench/quality.py --prompts 12 --seeds 2 --jobs 2 --out runs/bench-quality
    python bench/quality.py --prompts 12 --first-seed 2 --seeds 1      # add seed 2 to earlier results

For every (method, prompt, seed) the `nerf` stage runs as in bench/nerf_quality.py (same preset,
seeds, steps and annealing; a finished run with the same config is reused), then `mesh`, `uv` and
`texture` with the `toy-cpu` preset (each reused when already committed). Every stage is scored again
on each call with `stages.score` (so a newer scorer re-scores old runs): `shape_iou`, `shape_margin`,
`best_shape`, `colour_error`, and the evaluator's colour / shape accuracy over 8 orbit views.
Prints per method and stage the mean, minimum and quartiles of `shape_iou` and `colour_error` and the
mean accuracies; writes `results.json` and `contact_sheet.png` (rows: prompts; columns: seeds ×
methods; each cell the final textured asset with its IoU) into `--out`. The 12 default prompts cover
every shape and every palette colour twice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nerf_quality import METHODS, PROMPTS, check_methods  # noqa: E402  (the same prompts and methods as the nerf table)

STAGES = ("nerf", "mesh", "uv", "texture")
CELL = 96
SCORES = "scores.json"
"""A run's scores, with the fingerprint of what they depend on (`_scorer_fingerprint`)."""


def _one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import nerf_quality

    from stages import mesh, texture, uv
    from stages.common import atomic_write_text, completed
    from stages.config import build_config, load_preset
    from stages.score import score_stage

    from csd.mesh import EmptyIsosurfaceError
    from stages.nerf import FieldCollapsed

    run_dir = Path(job["out"]) / job["method"] / f"{job['prompt'].replace(' ', '_')}-{job['seed']}"
    try:
        nerf_quality._one(job)  # runs the nerf stage, or reuses a finished one with the same config
    except (FieldCollapsed, EmptyIsosurfaceError) as error:
        # a run that made no object is a miss, counted with IoU 0 (an empty field overlaps no primitive)
        return {**job, "dir": str(run_dir), "failed": str(error), "scores": {stage: {"shape_iou": 0.0, "failed": True} for stage in STAGES}}
    nerf_dir, later = run_dir, run_dir / "pipeline"
    preset = load_preset(job["preset"])
    texture_overrides = {"prompt": job["prompt"], "seed": job["seed"]}
    if job["texture_steps"]:
        texture_overrides["steps"] = job["texture_steps"]
    runs = [
        (mesh, build_config(mesh.MeshConfig, preset["mesh"]), {"nerf": nerf_dir}),
        (uv, build_config(uv.UVConfig, preset["uv"]), {"mesh": later / "mesh", "nerf": nerf_dir}),
        (texture, build_config(texture.TextureConfig, {**preset["texture"], "model": preset["model"]}, texture_overrides), {"uv": later / "uv"}),
    ]
    for module, config, inputs in runs:
        name = module.__name__.split(".")[-1]
        identity = f"bench-{name}-{json.dumps(texture_overrides, sort_keys=True) if name == 'texture' else ''}"
        if completed(later / name, identity) is None:
            module.run(config, later / name, inputs=inputs, identity=identity)
    # scores are kept beside the run with the scorer's fingerprint: a re-run re-scores only when the
    # scorer (stages.score and what it imports, the evaluator's weights) or a stage changed
    scorer = _scorer_fingerprint(run_dir)
    cached = _read_json(run_dir / SCORES)
    if cached is not None and cached.get("scorer") == scorer:
        return {**job, "dir": str(run_dir), "scores": cached["scores"]}
    # the nerf is scored at the level its mesh was extracted at: stages.score reads <asset>/mesh/stats.json
    scores = {"nerf": _score_nerf(nerf_dir, later, job["prompt"])}
    for name in ("mesh", "uv", "texture"):
        scores[name] = score_stage(name, later / name, job["prompt"])
    atomic_write_text(run_dir / SCORES, json.dumps({"scorer": scorer, "scores": scores}, indent=2))
    return {**job, "dir": str(run_dir), "scores": scores}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _scorer_fingerprint(run_dir: Path) -> str:
    """What the scores depend on: the scoring code, the evaluator's weights and each stage's result."""
    from stages.identity import evaluator_fingerprint, file_digest, source_fingerprint

    stages = [run_dir / "result.json"] + [run_dir / "pipeline" / name / "result.json" for name in ("mesh", "uv", "texture")]
    return ":".join([source_fingerprint("stages.score"), evaluator_fingerprint(), *(file_digest(f) for f in stages)])


def _score_nerf(nerf_dir: Path, later: Path, prompt: str) -> dict:
    from stages.score import score_field_dir

    level = json.loads((later / "mesh" / "stats.json").read_text())["threshold"]
    return score_field_dir(nerf_dir, prompt, float(level))


def _quartiles(values: list[float]) -> str:
    q = np.percentile(values, [25, 50, 75])
    return f"{np.mean(values):.3f} | {np.min(values):.3f} | {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}"


def _contact_sheet(results: list[dict], methods: list[str], prompts: list[str], seeds: list[int], path: Path) -> None:
    import imageio.v3 as iio
    from PIL import Image, ImageDraw

    from stages.assets import read_textured_mesh
    from stages.common import to_uint8
    from stages.score import render_views

    columns = [(m, s) for m in methods for s in seeds]
    label = 150
    sheet = Image.new("RGB", (label + CELL * len(columns), 16 + CELL * len(prompts)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (method, seed) in enumerate(columns):
        draw.text((label + c * CELL + 2, 2), f"{method[:14]} s{seed}", fill="black")
    index = {(r["method"], r["prompt"], r["seed"]): r for r in results}
    for row, prompt in enumerate(prompts):
        draw.text((2, 16 + row * CELL + CELL // 2), prompt, fill="black")
        for c, (method, seed) in enumerate(columns):
            r = index.get((method, prompt, seed))
            x, y = label + c * CELL, 16 + row * CELL
            if r is None or r.get("failed"):
                draw.text((x + 2, y + CELL // 2), "no object" if r else "", fill="red")
                continue
            view = render_views(read_textured_mesh(Path(r["dir"]) / "pipeline" / "texture"), count=1, resolution=CELL)
            sheet.paste(Image.fromarray(to_uint8(view)[0]), (x, y))
            iou = r["scores"]["texture"].get("shape_iou")
            draw.text((x + 2, y + CELL - 12), f"IoU {iou:.2f}" if iou is not None else "-", fill="black")
    iio.imwrite(path, np.asarray(sheet))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed … first-seed + seeds - 1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=0, help="override the preset's nerf step count (0: preset)")
    parser.add_argument("--texture-steps", type=int, default=0, help="override the preset's texture step count (0: preset)")
    parser.add_argument("--preset", default="toy-cpu")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    args = parser.parse_args()
    check_methods(parser, args.methods)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from stages.common import atomic_write_text

    methods, prompts = args.methods.split(","), PROMPTS[: args.prompts]
    key = lambda r: (r["method"], r["prompt"], r["seed"], r["steps"], r["texture_steps"], r["preset"])  # noqa: E731
    path = args.out / "results.json"
    earlier = json.loads(path.read_text()) if path.exists() else []
    seeds = set(range(args.first_seed, args.first_seed + args.seeds))
    # earlier runs are re-scored too (their stages are reused, not recomputed)
    seeds |= {r["seed"] for r in earlier if r["steps"] == args.steps and r["texture_steps"] == args.texture_steps}
    jobs = [
        {"method": m, "prompt": p, "seed": s, "steps": args.steps, "texture_steps": args.texture_steps, "preset": args.preset,
         "out": str(args.out)}
        # seed-major, methods side by side: a benchmark cut short still holds whole method comparisons
        for s in sorted(seeds) for p in prompts for m in methods
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    new: list[dict] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        # results.json is rewritten as each run finishes, so an interrupted benchmark keeps what it did
        for future in as_completed([pool.submit(_one, job) for job in jobs]):
            new.append(future.result())
            done = {key(n) for n in new}
            atomic_write_text(path, json.dumps([r for r in earlier if key(r) not in done] + new, indent=2))
            print(f"[{len(new)}/{len(jobs)}] {new[-1]['method']} {new[-1]['prompt']} seed {new[-1]['seed']}", flush=True)
    order = {key(job): i for i, job in enumerate(jobs)}
    results = sorted(new, key=lambda r: order[key(r)])
    print(f"\n{len(prompts)} prompts x seeds {sorted(seeds)}, preset {args.preset}\n")
    print("| method | stage | shape_iou mean | min | quartiles | colour_error mean | min | quartiles | open-set colour | open-set shape | no object |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        for stage in STAGES:
            rows = [r["scores"][stage] for r in results if r["method"] == method and "shape_iou" in r["scores"][stage]]
            if not rows:
                continue
            iou = _quartiles([s["shape_iou"] for s in rows])
            colour = [s["colour_error"] for s in rows if "colour_error" in s]
            accuracy = [(s["colour_accuracy"], s["shape_accuracy"]) for s in rows if "colour_accuracy" in s]
            colour_cell = _quartiles(colour) if colour else "- | - | -"
            acc = f"{np.mean([a[0] for a in accuracy]):.0%} | {np.mean([a[1] for a in accuracy]):.0%}" if accuracy else "- | -"
            failed = sum(1 for s in rows if s.get("failed"))
            print(f"| {method} | {stage} | {iou} | {colour_cell} | {acc} | {failed} of {len(rows)} |")
    worst = sorted(results, key=lambda r: r["scores"]["texture"].get("shape_iou", 0.0))[:5]
    print("\nworst textured assets (shape_iou, best_shape, colour_error):")
    for r in worst:
        s = r["scores"]["texture"]
        print(f"  {r['method']:<22} {r['prompt']:<18} seed {r['seed']}: {s.get('shape_iou', 0):.3f} {s.get('best_shape')} {s.get('colour_error', 0):.3f}")
    _contact_sheet(results, methods, prompts, sorted(seeds), args.out / "contact_sheet.png")
    print(f"\nwrote {path} and {args.out / 'contact_sheet.png'}")


if __name__ == "__main__":
    main()
