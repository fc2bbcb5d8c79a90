"""Benchmark of the `texture` and `edit` stages on the toy prior (CPU): speed and quality bars.

    python bench/texture.py                 # everything, toy-cpu preset
    python bench/texture.py --speed-only    # rasterizer and per-step timings only
    python bench/texture.py --model /tmp/tt/prior --steps 50   # plumbing with another prior

Prints:
- rasterizer speed: a 20 480-face icosphere at 256² (1 and 4 cameras), and the supersampled 512²
  the `cpu` backend rasterizes for a 256² render;
- per-step time split of the texture stage (raster, texture lookup + shading, guidance, backward,
  optimizer) and its total wall time (bar: ≤ 2 min on 2 cores);
- texture synthesis: grey meshes of the toy world's shapes textured from "a green cube" and three
  other colour/shape prompts → share of 8 turntable views the toy evaluator gives the prompted
  colour (bar ≥ 90 %) and shape, before (grey) and after;
- edit: an asset made for "a red cube" edited to "a blue cube" → share of views classified blue
  (bar ≥ 80 %), still a cube, geometry byte-identical.
Quality needs the trained prior (`csd/toy/prior`) and the evaluator weights; without them the
quality part says so and is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csd.cameras import orbit_cameras  # noqa: E402
from csd.raster import MeshRenderer, get_rasterizer  # noqa: E402
from stages.assets import MESH_OBJ, TexturedMesh, read_textured_mesh, write_textured_mesh  # noqa: E402
from stages.config import build_config, load_preset  # noqa: E402
from stages.edit import EditConfig  # noqa: E402
from stages.edit import run as run_edit  # noqa: E402
from stages.texture import TextureConfig, evaluate, texture_tensor  # noqa: E402
from stages.texture import run as run_texture  # noqa: E402

SYNTHESIS_PROMPTS = (("cube", "a green cube"), ("sphere", "a purple sphere"), ("cone", "a red cone"), ("torus", "a blue torus"))
"""Colour/shape pairs in the toy world's caption form; not yellow, the colour the evaluator gives plain grey."""
RADIUS = 0.6
"""Bounding radius of the benchmark meshes (the toy world draws 0.45–0.7)."""


def primitive(shape: str):
    """A trimesh of the toy world's `shape` at `RADIUS`, z up (as `csd.toy.world._sdf` draws them)."""
    import trimesh

    r = RADIUS
    if shape == "sphere":
        return trimesh.creation.icosphere(subdivisions=3, radius=r)
    if shape == "cube":
        return trimesh.creation.box((2 * r / 3**0.5,) * 3)
    if shape == "cone":
        cone = trimesh.creation.cone(radius=0.8 * r, height=1.4 * r, sections=48)
        cone.apply_translation((0, 0, -0.7 * r))
        return cone
    if shape == "torus":
        return trimesh.creation.torus(major_radius=0.68 * r, minor_radius=0.32 * r, major_sections=48, minor_sections=16)
    raise ValueError(f"unknown shape {shape!r}; valid: sphere, cube, cone, torus")


def write_grey_asset(shape: str, directory: Path, size: int = 64) -> Path:
    """A `uv`-stage hand-off: the primitive unwrapped by xatlas with a flat mid-grey texture."""
    import xatlas

    mesh = primitive(shape)
    mapping, faces, uvs = xatlas.parametrize(mesh.vertices, mesh.faces)
    directory.mkdir(parents=True, exist_ok=True)
    write_textured_mesh(TexturedMesh(mesh.vertices[mapping], faces, uvs, np.full((size, size, 3), 128, np.uint8)), directory)
    return directory


def _best_of(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def rasterizer_speed() -> dict[str, float]:
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.7)
    vertices, faces = torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces)
    rasterizer = get_rasterizer("cpu")
    cameras = orbit_cameras(4)
    results = {"faces": float(len(faces))}
    for size, batch in ((256, 1), (256, 4), (512, 1)):
        seconds = _best_of(lambda: rasterizer.rasterize(vertices, faces, cameras[:batch], size, size), 5)
        results[f"raster_{size}px_{batch}cam_ms"] = 1000 * seconds
    return results


def _section(preset: dict, stage: str, model: str | None) -> dict:
    section = {**preset[stage], "model": {**preset["model"], **preset[stage].get("model", {})}}
    if model:
        section["model"]["model"] = model
    return section


def _grey_scores(config: TextureConfig, uv: Path, prompt: str) -> dict[str, float]:
    """Evaluator scores of the untextured (grey) asset against `prompt`, the baseline of synthesis."""
    mesh = read_textured_mesh(uv)
    renderer = MeshRenderer(config.renderer, mesh.vertices, mesh.faces, mesh.uvs)
    return evaluate(config, renderer, texture_tensor(mesh.texture), {"prompt": prompt})


def quality_available(model: str | None) -> str | None:
    """None when the trained prior and evaluator exist, else why not."""
    from csd.models import TOY_PRIOR
    from csd.toy.evaluator import EVALUATOR_WEIGHTS

    if model is None and not (TOY_PRIOR / "model_index.json").exists():
        return f"the trained toy prior is missing ({TOY_PRIOR})"
    if not EVALUATOR_WEIGHTS.exists():
        return f"the toy evaluator weights are missing ({EVALUATOR_WEIGHTS})"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="toy-cpu")
    parser.add_argument("--model", default=None, help="override the preset's model (e.g. an untrained prior for plumbing)")
    parser.add_argument("--steps", type=int, default=None, help="override the stages' step counts")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    parser.add_argument("--work", type=Path, default=None, help="keep stage directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report: dict[str, object] = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}

    speed = rasterizer_speed()
    report["raster"] = speed
    print(f"rasterizer cpu, {int(speed['faces'])} faces, torch threads {torch.get_num_threads()}:")
    for key, value in speed.items():
        if key != "faces":
            print(f"  {key:28s} {value:8.1f} ms")

    preset = load_preset(args.preset)
    steps = {"steps": args.steps} if args.steps else {}
    missing = None if args.speed_only else quality_available(args.model)
    evaluator = {"evaluator": "toy"} if not args.speed_only and missing is None else {"evaluator": "none"}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-texture-"))

    grey_cube = write_grey_asset("cube", work / "cube" / "uv")
    config = build_config(TextureConfig, _section(preset, "texture", args.model), {"prompt": "a green cube", **steps, **evaluator})
    result = run_texture(config, work / "cube" / "texture-green", inputs={"uv": grey_cube})
    split = {k: v for k, v in result.timings.items() if k.endswith("_per_step")}
    report["texture_timings"] = result.timings
    print(f"\ntexture stage, {args.preset}, {int(result.metrics['steps'])} steps × batch {config.batch_size} at {config.resolution}²:")
    for key, value in split.items():
        print(f"  {key:28s} {1000 * value:8.1f} ms")
    print(f"  {'per step':28s} {1000 * sum(split.values()):8.1f} ms")
    print(f"  {'stage total':28s} {result.timings['total']:8.1f} s   (bar: <= 120 s)")

    if args.speed_only:
        _finish(report, args.out)
        return
    if missing is not None:
        print(f"\nquality: unavailable — {missing}")
        report["quality"] = f"unavailable: {missing}"
        _finish(report, args.out)
        return

    synthesis = {"a green cube": (_grey_scores(config, grey_cube, "a green cube"), result.metrics)}
    for shape, prompt in SYNTHESIS_PROMPTS[1:]:
        uv = write_grey_asset(shape, work / shape / "uv")
        config = build_config(TextureConfig, _section(preset, "texture", args.model), {"prompt": prompt, **steps, **evaluator})
        synthesis[prompt] = (_grey_scores(config, uv, prompt), run_texture(config, work / shape / "texture", inputs={"uv": uv}).metrics)
    report["synthesis"] = {prompt: {"grey": grey, "textured": textured} for prompt, (grey, textured) in synthesis.items()}
    print("\ntexture synthesis from a grey mesh (8 turntable views; bar: colour >= 90 %):")
    print(f"  {'prompt':18s} {'grey colour':>12s} {'colour':>7s} {'shape':>7s} {'both':>7s}")
    for prompt, (grey, metrics) in synthesis.items():
        print(
            f"  {prompt:18s} {grey['prompt_colour_accuracy']:12.0%} {metrics['prompt_colour_accuracy']:7.0%} {metrics['prompt_shape_accuracy']:7.0%} "
            f"{metrics['prompt_accuracy']:7.0%}"
        )

    red = build_config(TextureConfig, _section(preset, "texture", args.model), {"prompt": "a red cube", **steps, **evaluator})
    run_texture(red, work / "cube" / "texture-red", inputs={"uv": grey_cube})
    edit_config = build_config(
        EditConfig, _section(preset, "edit", args.model), {"prompt": "a blue cube", "source_prompt": "a red cube", **steps, **evaluator}
    )
    edit = run_edit(edit_config, work / "cube" / "edit-blue", inputs={"texture": work / "cube" / "texture-red"})
    same_geometry = (work / "cube" / "edit-blue" / MESH_OBJ).read_bytes() == (grey_cube / MESH_OBJ).read_bytes()
    report["edit"] = {**edit.metrics, "geometry_identical": same_geometry, "total_s": edit.timings["total"]}
    m = edit.metrics
    print(f"\nedit 'a red cube' -> 'a blue cube' (λ = {edit_config.negative_weight}; bar: blue >= 80 %, still a cube):")
    print(f"  {'':8s} {'red':>7s} {'blue':>7s} {'cube':>7s}")
    print(f"  {'before':8s} {m['before_source_colour_accuracy']:7.0%} {m['before_target_colour_accuracy']:7.0%} {m['before_target_shape_accuracy']:7.0%}")
    print(f"  {'after':8s} {m['after_source_colour_accuracy']:7.0%} {m['after_target_colour_accuracy']:7.0%} {m['after_target_shape_accuracy']:7.0%}")
    print(f"  geometry byte-identical: {same_geometry}; stage total {edit.timings['total']:.1f} s")
    _finish(report, args.out)


def _finish(report: dict, out: Path | None) -> None:
    if out is not None:
        out.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
