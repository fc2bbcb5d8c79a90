"""NeRF-stage quality and speed on CPU with the toy prior: CSD vs CSD + annealed negative prompt vs SDS.

    python bench/nerf_quality.py --prompts 8 --seeds 2 --jobs 2 --out runs/bench-nerf
    python bench/nerf_quality.py --prompts 8 --first-seed 1 --seeds 1   # add seed 1 to earlier results

For every (method, prompt, seed) the `nerf` stage runs with the `toy-cpu` preset (same seeds and
steps for every method; `csd-annealed-negative` anneals over the first half of the run, as the
official config does over 5000 of 10 000 steps); 8 turntable views (lit, 32²) are scored by the independent toy evaluator
(fraction of views with the right colour / shape). Prints a markdown table and the per-step time
split; writes results.json next to the stage outputs. Runs already in results.json (same method,
prompt, seed, steps and preset) are kept and counted in the tables, so seeds can be added later; a
stage folder that already holds a finished run with the same config is scored again, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

PROMPTS = [
    "a red cube", "a green sphere", "a blue cone", "a yellow torus",
    "a purple cube", "a orange sphere", "a red torus", "a blue sphere",
    "a green cone", "a yellow cube", "a purple torus", "a orange cone",
]
METHODS = ("csd", "csd-annealed-negative", "sds")
"""The default methods: guidance presets. `--methods` also takes `sds-cfg<S>`, SDS at CFG S (e.g.
`sds-cfg7.5`: prompt_scale 7.5, null_scale -6.5), beside the preset's CFG 100."""


def method_overrides(method: str) -> tuple[str, dict]:
    """A `--methods` label → (guidance preset, guidance overrides): `sds-cfg7.5` → ("sds", CFG 7.5)."""
    if method.startswith("sds-cfg"):
        try:
            scale = float(method[len("sds-cfg"):])
        except ValueError:
            raise ValueError(f"method {method!r}: expected sds-cfg<number>, e.g. sds-cfg7.5") from None
        return "sds", {"prompt_scale": scale, "null_scale": 1.0 - scale}
    from csd.guidance import GUIDANCE_PRESETS

    if method not in GUIDANCE_PRESETS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(GUIDANCE_PRESETS)} or sds-cfg<number>")
    return method, {}


def check_methods(parser: argparse.ArgumentParser, methods: str) -> list[str]:
    """The `--methods` labels, comma-separated; a bad one stops the command (`parser.error`) before any run."""
    labels = methods.split(",")
    for method in labels:
        try:
            method_overrides(method)
        except ValueError as error:
            parser.error(str(error))
    return labels
NEGATIVE = "oversaturated color, ugly, tiling, low quality, noisy"


def _one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from csd.fields import load_field
    from csd.metrics import toy_score
    from csd.renderer import VolumeRenderer
    from stages.common import completed
    from stages.config import build_config, config_to_dict, load_preset
    from stages.nerf import NerfConfig, render_turntable, run

    preset = load_preset(job["preset"])
    method, guidance = method_overrides(job["method"])
    overrides = {"prompt": job["prompt"], "seed": job["seed"], "method": method, "negative_prompt": NEGATIVE}
    if guidance:
        overrides["guidance"] = guidance
    if job["steps"]:
        overrides["steps"] = job["steps"]
    steps = job["steps"] or preset["nerf"]["steps"]
    if method == "csd-annealed-negative":
        # the official anneal spans the first half of the run (0-5000 of 10 000 steps): keep that shape
        half = steps // 2
        overrides["guidance"] = {"negative_scale": [0, 0.0, -1.0, half], "null_scale": [0, -1.0, 0.0, half],
                                 "max_step_percent": [0, 0.98, 0.5, half]}
    config = build_config(NerfConfig, {**preset["nerf"], "model": preset["model"]}, overrides)
    out = Path(job["out"]) / job["method"] / f"{job['prompt'].replace(' ', '_')}-{job['seed']}"
    done = completed(out)
    if done is not None and yaml.safe_load((out / "config.yaml").read_text()) == json.loads(json.dumps(config_to_dict(config))):
        # the same run finished earlier: score it again (the evaluator may be newer), keep its timings
        result, wall = done, done.timings["total"]
    else:
        started = time.perf_counter()
        result = run(config, out)
        wall = time.perf_counter() - started
    volume = load_field(out)
    views = render_turntable(volume, VolumeRenderer(config.renderer, config.field.bound), 8, 32, shading="diffuse")
    score = toy_score(views, job["prompt"])
    return {**job, "colour": score.details["colour_accuracy"], "shape": score.details["shape_accuracy"], "wall": wall, "timings": result.timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed … first-seed + seeds - 1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=0, help="override the preset's step count (0: preset)")
    parser.add_argument("--preset", default="toy-cpu")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-nerf"))
    args = parser.parse_args()
    check_methods(parser, args.methods)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = [
        {"method": m, "prompt": p, "seed": s, "steps": args.steps, "preset": args.preset, "out": str(args.out)}
        for m in args.methods.split(",") for p in PROMPTS[: args.prompts] for s in range(args.first_seed, args.first_seed + args.seeds)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        new = list(pool.map(_one, jobs))
    key = lambda r: (r["method"], r["prompt"], r["seed"], r["steps"], r["preset"])  # noqa: E731
    path = args.out / "results.json"
    earlier = json.loads(path.read_text()) if path.exists() else []
    results = [r for r in earlier if key(r) not in {key(n) for n in new}] + new
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    wanted = {(m, p) for m in args.methods.split(",") for p in PROMPTS[: args.prompts]}
    results = [r for r in results if (r["method"], r["prompt"]) in wanted and r["steps"] == args.steps and r["preset"] == args.preset]
    seeds = sorted({r["seed"] for r in results})

    print(f"\n{len(PROMPTS[: args.prompts])} prompts x seeds {seeds}, preset {args.preset}, 8 views each\n")
    print("| method | colour | shape | mean stage wall (s) |")
    print("|---|---|---|---|")
    for method in args.methods.split(","):
        rows = [r for r in results if r["method"] == method]
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        print(f"| {method} | {mean('colour'):.0%} | {mean('shape'):.0%} | {mean('wall'):.0f} |")
    print("\nper prompt (colour/shape, mean over seeds):")
    for prompt in PROMPTS[: args.prompts]:
        cells = []
        for method in args.methods.split(","):
            rows = [r for r in results if r["method"] == method and r["prompt"] == prompt]
            cells.append(f"{method}: {sum(r['colour'] for r in rows) / len(rows):.0%}/{sum(r['shape'] for r in rows) / len(rows):.0%}")
        print(f"  {prompt:<18} " + "  ".join(cells))
    split = {}
    for r in results:
        for k, v in r["timings"].items():
            split.setdefault(k, []).append(v)
    print("\nper-step time split (s, mean over runs): " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in split.items()))


if __name__ == "__main__":
    main()
