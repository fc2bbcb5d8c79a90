"""Does the pipeline keep what the NeRF learned? nerf views vs the baked (`uv`) and refined (`texture`)
assets, scored by the toy evaluator on the same 8 orbit views.

    python bench/pipeline_fidelity.py --nerf-root runs/bench-nerf/csd --jobs 2

Takes every finished nerf stage under `--nerf-root` (e.g. the `csd` runs of bench/nerf_quality.py),
runs `mesh → uv → texture` on it with the `toy-cpu` preset, and prints colour / shape accuracy of
the NeRF's views, the baked asset's and the textured asset's (bar: textured colour ≥ NeRF colour).
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml


def _one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from csd.cameras import orbit_cameras
    from csd.fields import load_field
    from csd.metrics import toy_score
    from csd.raster import MeshRenderer, MeshRendererConfig
    from csd.renderer import VolumeRenderer
    from stages import mesh, texture, uv
    from stages.assets import read_textured_mesh
    from stages.config import build_config, load_preset
    from stages.nerf import NerfConfig, render_turntable

    nerf_dir, out = Path(job["nerf"]), Path(job["out"])
    nerf_config = build_config(NerfConfig, yaml.safe_load((nerf_dir / "config.yaml").read_text()))
    prompt = nerf_config.prompt
    preset = load_preset("toy-cpu")
    views = render_turntable(load_field(nerf_dir), VolumeRenderer(nerf_config.renderer, nerf_config.field.bound), 8, 32, shading="diffuse")
    scores = {"nerf": toy_score(views, prompt)}

    mesh.run(build_config(mesh.MeshConfig, preset["mesh"]), out / "mesh", inputs={"nerf": nerf_dir})
    uv.run(build_config(uv.UVConfig, preset["uv"]), out / "uv", inputs={"mesh": out / "mesh", "nerf": nerf_dir})
    texture_config = build_config(
        texture.TextureConfig, {**preset["texture"], "model": preset["model"]}, {"prompt": prompt, "seed": nerf_config.seed}
    )
    texture.run(texture_config, out / "texture", inputs={"uv": out / "uv"})

    cameras = orbit_cameras(8)
    for name in ("uv", "texture"):
        asset = read_textured_mesh(out / name)
        renderer = MeshRenderer(MeshRendererConfig(rasterizer="cpu", background="solid"), asset.vertices, asset.faces, asset.uvs)
        with torch.no_grad():
            rendered = renderer.render(torch.from_numpy(asset.texture).float() / 255, cameras, 32, shading="diffuse", training=False).rgb
        scores[name] = toy_score(rendered, prompt)
    return {"prompt": prompt, "asset": nerf_dir.name, **{k: s.details for k, s in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nerf-root", type=Path, default=Path("runs/bench-nerf/csd"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-fidelity"))
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    args = parser.parse_args()
    nerfs = sorted(p for p in args.nerf_root.iterdir() if (p / "result.json").exists())
    if not nerfs:
        raise SystemExit(f"no finished nerf stages under {args.nerf_root}; run bench/nerf_quality.py first")
    jobs = [{"nerf": str(p), "out": str(args.out / p.name)} for p in nerfs]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_one, jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("| asset | nerf colour/shape | uv (baked) | texture (refined) |")
    print("|---|---|---|---|")
    for r in results:
        cell = lambda k: f"{r[k]['colour_accuracy']:.0%} / {r[k]['shape_accuracy']:.0%}"  # noqa: E731
        print(f"| {r['asset']} | {cell('nerf')} | {cell('uv')} | {cell('texture')} |")
    mean = lambda k, m: sum(r[k][m] for r in results) / len(results)  # noqa: E731
    print(f"| **mean** | {mean('nerf', 'colour_accuracy'):.0%} / {mean('nerf', 'shape_accuracy'):.0%} "
          f"| {mean('uv', 'colour_accuracy'):.0%} / {mean('uv', 'shape_accuracy'):.0%} "
          f"| {mean('texture', 'colour_accuracy'):.0%} / {mean('texture', 'shape_accuracy'):.0%} |")


if __name__ == "__main__":
    main()
