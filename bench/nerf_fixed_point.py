"""Does the nerf stage keep a perfect asset? The `toy-cpu` nerf stage started from the world's own
primitive instead of the density blob, per method, judged by the ground truth before and after.

    python bench/nerf_fixed_point.py --jobs 2 --out runs/bench-nerf-fixed-point
    python bench/nerf_fixed_point.py --prompts "a red cube" --methods csd,sds-cfg7.5

For each (prompt, method) the field is first fitted to the prompted primitive (radius 0.6, yaw 0.3,
palette colour: 600 Adam steps of density and albedo regression on random points), then the nerf
stage runs its preset steps from it: the worker swaps the stage's field class for one that returns
the fitted field, nothing else changes. Both fields are scored with `csd.toy.groundtruth` at the
`auto` level (the mesh stage's rule) and the end field with the open-set evaluator too. A guidance
whose optimum is the prompted object keeps the start's IoU (≈ 1); one that drifts shows where it
pulls. Methods are `bench/nerf_quality.py`'s labels (presets and `sds-cfg<S>`). Prints a table and
writes results.json and each run's stage folder (turntables) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nerf_quality import NEGATIVE, check_methods, method_overrides  # noqa: E402

PROMPTS = ["a red cube", "a yellow torus", "a blue cone", "a green sphere"]
START_RADIUS, START_YAW, FIT_STEPS = 0.6, 0.3, 600


def fit_primitive_field(volume, shape: str, colour: str, steps: int = FIT_STEPS, points_per_step: int = 16384):
    """Regress `volume`'s density (40 inside, 0 outside) and albedo (the palette colour) onto the
    world's primitive on random points in the bounding cube; returns the volume."""
    import torch

    from csd.toy import groundtruth as gt
    from csd.toy.world import COLOURS

    optimizer = torch.optim.Adam(volume.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    albedo = torch.tensor(COLOURS[colour])
    for _ in range(steps):
        points = (torch.rand(points_per_step, 3, generator=generator) * 2 - 1) * volume.bound
        inside = gt.primitive_sdf(shape, torch.tensor([START_RADIUS]), torch.tensor([START_YAW]), torch.zeros(1, 3), points)[0] < 0
        density, colours = volume(points)
        loss = ((density - 40.0 * inside) ** 2).mean() / 100 + ((colours - albedo) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return volume


def _level(field) -> float:
    """The `auto` surface level of `field`, as `csd.mesh.extract_isosurface` finds it on its coarse pass."""
    import numpy as np

    from csd.mesh import ExtractionConfig, auto_threshold, sample_density

    config = ExtractionConfig()
    return auto_threshold(sample_density(field, np.full(3, -field.bound), np.full(3, field.bound), config.coarse_resolution, config.chunk_size))


def _one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import stages.nerf as nerf_stage
    from csd.fields import load_field
    from csd.toy import groundtruth as gt
    from csd.toy.evaluator import parse_prompt
    from stages.config import build_config, load_preset
    from stages.score import score_field_dir

    colour, shape = parse_prompt(job["prompt"])
    method, guidance = method_overrides(job["method"])
    preset = load_preset("toy-cpu")
    overrides = {"prompt": job["prompt"], "seed": job["seed"], "method": method, "negative_prompt": NEGATIVE}
    if guidance:
        overrides["guidance"] = guidance
    config = build_config(nerf_stage.NerfConfig, {**preset["nerf"], "model": preset["model"]}, overrides)
    field_class = nerf_stage.ImplicitVolume
    start = fit_primitive_field(field_class(config.field), shape, colour)
    start_score = gt.score_field_shape(start, _level(start), shape)
    nerf_stage.ImplicitVolume = lambda _config: start  # the stage optimises the fitted field in place of a blob
    try:
        out = Path(job["out"]) / job["method"] / f"{job['prompt'].replace(' ', '_')}-{job['seed']}"
        nerf_stage.run(config, out)
    finally:
        nerf_stage.ImplicitVolume = field_class
    end = score_field_dir(out, job["prompt"], _level(load_field(out)))
    return {**job, "dir": str(out), "start_iou": start_score.shape_iou, "start_radius": start_score.fits[shape].radius,
            "end_iou": end["shape_iou"], "end_radius": end["fit_radius"], "end_best_shape": end["best_shape"],
            "end_open_set_shape": end["shape_accuracy"], "end_colour_error": end["colour_error"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--methods", default="csd,sds,sds-cfg7.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-nerf-fixed-point"))
    args = parser.parse_args()
    from csd.toy.evaluator import parse_prompt

    check_methods(parser, args.methods)
    for prompt in args.prompts:
        try:
            parse_prompt(prompt)
        except ValueError as error:
            parser.error(f"prompt {prompt!r}: {error}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = [{"method": m, "prompt": p, "seed": args.seed, "out": str(args.out)} for p in args.prompts for m in args.methods.split(",")]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_one, jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| prompt | method | IoU start → end | fitted radius start → end | best shape (end) | open-set shape (end) | colour error (end) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['prompt']} | {r['method']} | {r['start_iou']:.3f} → {r['end_iou']:.3f} | {r['start_radius']:.2f} → {r['end_radius']:.2f} | "
              f"{r['end_best_shape']} | {r['end_open_set_shape']:.0%} | {r['end_colour_error']:.3f} |")


if __name__ == "__main__":
    main()
