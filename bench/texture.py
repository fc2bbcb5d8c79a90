"""Texture synthesis and edit on user meshes, judged by the ground truth (toy prior, CPU).

    python bench/texture.py --jobs 2 --out runs/bench-texture
    python bench/texture.py --seeds 1 --steps 50 --out /tmp/bt     # plumbing
    python bench/texture.py --set texture.lr=0.05 --set edit.lr=0.05 --out /tmp/bt-lr   # a variant

The world's four primitives (`csd.toy.world`: sphere, cube, cone, torus) are written as grey OBJ
files (no colours, no texture) and each (shape, colour) prompt runs as a catalog row with a `mesh`
column does (`flows.pipeline.plan_asset`: `mesh` normalises the user mesh, `uv` unwraps it with a
grey texture, `texture` synthesises one from the prompt; the `--preset`'s configs). One prompt also
carries an `edit_prompt` (colour A → colour B, same shape), so its `edit` stage runs on the
textured result. `export` is not run.

Per asset the textured surface is scored with `csd.toy.groundtruth.score_colours` (points uniform
by area, read through the UVs): `colour_error`, `colour_spread`, `hueless_fraction`; the edit against
colour B, with `geometry_unchanged` (vertices, faces and UVs equal to the `texture` stage's input).
Bars (issue 18): error ≤ 0.08, spread ≤ 0.15, hueless ≤ 5 %; edit error to B ≤ 0.10, geometry
unchanged. Prints one table and writes `results.json` and `contact_sheet.png` into `--out` (one
row per asset and stage; unlit views around the asset, from above and from below). Stages already
committed under `--out` with the same identity (config, inputs, code) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = (("cone", "red", "blue"), ("cube", "green", None), ("sphere", "purple", None), ("torus", "orange", None))
"""(shape, colour, edit colour): every shape once; the edit row first, as its job runs two stages."""
RADIUS = 0.6
"""Bounding radius of the written meshes (the world draws 0.45–0.7; the `mesh` stage rescales anyway)."""
SHEET_VIEWS = ((15.0, 0.0), (15.0, 90.0), (15.0, 180.0), (15.0, -90.0), (75.0, 45.0), (-75.0, 45.0))
"""(elevation, azimuth) of the contact sheet's views: four around, one from above, one from below."""
CELL = 80
BARS = {"colour_error": 0.08, "colour_spread": 0.15, "hueless_fraction": 0.05, "edit_error": 0.10}


def primitive(shape: str):
    """A trimesh of the toy world's `shape` at `RADIUS`, z up, dimensions as `csd.toy.world.primitive_sdf`."""
    import trimesh

    r = RADIUS
    if shape == "sphere":
        return trimesh.creation.icosphere(subdivisions=3, radius=r)
    if shape == "cube":
        return trimesh.creation.box((2 * r / 3**0.5,) * 3)
    if shape == "cone":  # base radius 0.8 r at z = −0.7 r, apex at +0.7 r
        cone = trimesh.creation.cone(radius=0.8 * r, height=1.4 * r, sections=48)
        cone.apply_translation((0, 0, -0.7 * r))
        return cone
    if shape == "torus":
        return trimesh.creation.torus(major_radius=0.68 * r, minor_radius=0.32 * r, major_sections=48, minor_sections=16)
    raise ValueError(f"unknown shape {shape!r}; valid: sphere, cube, cone, torus")


def write_grey_obj(shape: str, directory: Path) -> Path:
    """The primitive as an OBJ with positions and faces only (what `uv` textures grey)."""
    path = directory / f"{shape}.obj"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        primitive(shape).export(path, include_normals=False, include_color=False, include_texture=False)
    return path


def colour_numbers(directory: Path, colour: str) -> dict:
    from csd.toy import groundtruth as gt
    from stages.assets import read_textured_mesh

    mesh = read_textured_mesh(directory)
    score = gt.score_colours(gt.textured_surface_colours(mesh.vertices, mesh.faces, mesh.uvs, mesh.texture), colour)
    return {"colour_error": score.colour_error, "colour_spread": score.colour_spread, "hueless_fraction": score.hueless_fraction,
            "nearest_colour": score.nearest_colour}


def _one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from flows.catalog import CatalogRow
    from flows.pipeline import execute_stage, plan_asset
    from stages.assets import read_textured_mesh

    shape, colour, edit_colour, seed = job["shape"], job["colour"], job["edit_colour"], job["seed"]
    row = CatalogRow(asset_id=f"{colour}-{shape}-s{seed}", prompt=f"a {colour} {shape}", seed=seed, mesh=job["mesh"],
                     edit_prompt=f"a {edit_colour} {shape}" if edit_colour else None)
    overrides = {**({f"{stage}.steps": job["steps"] for stage in ("texture", "edit")} if job["steps"] else {}), **job["overrides"]}
    plan = plan_asset(row, job["out"], job["preset"], overrides)
    seconds = {}
    for stage in plan.stages:
        if stage.name != "export":
            outcome = execute_stage(stage)
            seconds[stage.name] = outcome.result.timings.get("total", 0.0) if outcome.status == "ran" else 0.0
    out = {**job, "asset_id": row.asset_id, "dir": str(plan.stage("texture").directory.parent), "seconds": seconds,
           "texture": colour_numbers(plan.stage("texture").directory, colour)}
    if edit_colour:
        before, after = read_textured_mesh(plan.stage("texture").directory), read_textured_mesh(plan.stage("edit").directory)
        same = all(np.array_equal(getattr(before, k), getattr(after, k)) for k in ("vertices", "faces", "uvs"))
        out["edit"] = {**colour_numbers(plan.stage("edit").directory, edit_colour), "geometry_unchanged": same}
    return out


def _views(directory: Path):
    import torch

    from csd.cameras import make_cameras
    from csd.raster import MeshRenderer, MeshRendererConfig
    from stages.assets import read_textured_mesh
    from stages.common import to_uint8

    mesh = read_textured_mesh(directory)
    renderer = MeshRenderer(MeshRendererConfig(rasterizer="cpu", background="solid"), mesh.vertices, mesh.faces, mesh.uvs)
    elevation, azimuth = (torch.tensor(v, dtype=torch.float32) for v in zip(*SHEET_VIEWS))
    n = len(SHEET_VIEWS)
    cameras = make_cameras(elevation, azimuth, torch.full((n,), 1.8), torch.full((n,), 50.0))
    with torch.no_grad():
        rgb = renderer.render(torch.from_numpy(mesh.texture).float() / 255, cameras, CELL, training=False).rgb
    return to_uint8(rgb)


def contact_sheet(results: list[dict], path: Path) -> None:
    """Rows: each asset's `texture` (and `edit`) result; columns: `SHEET_VIEWS` (unlit albedo on white)."""
    import imageio.v3 as iio
    from PIL import Image, ImageDraw

    rows = [(r, "texture") for r in results] + [(r, "edit") for r in results if "edit" in r]
    label = 190
    sheet = Image.new("RGB", (label + CELL * len(SHEET_VIEWS), 14 + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (elevation, azimuth) in enumerate(SHEET_VIEWS):
        draw.text((label + c * CELL + 2, 1), f"el {elevation:+.0f} az {azimuth:+.0f}", fill="black")
    for i, (r, stage) in enumerate(rows):
        y = 14 + i * CELL
        s = r[stage]
        name = f"{r['asset_id']}" + (f" -> {r['edit_colour']}" if stage == "edit" else "")
        draw.text((2, y + 20), name, fill="black")
        draw.text((2, y + 36), f"err {s['colour_error']:.2f} spr {s['colour_spread']:.2f}", fill="black")
        draw.text((2, y + 50), f"hueless {s['hueless_fraction']:.0%}", fill="black")
        for c, view in enumerate(_views(Path(r["dir"]) / stage)):
            sheet.paste(Image.fromarray(view), (label + c * CELL, y))
    iio.imwrite(path, np.asarray(sheet))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="toy-cpu")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="override the texture and edit step counts (0: preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override as `csd-asset run --set` takes it (texture.lr=0.05), repeatable")
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-texture"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = args.out.resolve()
    overrides = dict(item.split("=", 1) for item in args.set)
    meshes = {shape: str(write_grey_obj(shape, out / "meshes")) for shape, _, _ in PROMPTS}
    jobs = [{"shape": shape, "colour": colour, "edit_colour": edit, "seed": seed, "mesh": meshes[shape], "steps": args.steps,
             "overrides": overrides, "preset": args.preset, "out": str(out)} for shape, colour, edit in PROMPTS for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_one, jobs))
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\ntexture synthesis on grey user meshes, preset {args.preset} {overrides or ''}, seeds 0-{args.seeds - 1}"
          f" (bars: error <= {BARS['colour_error']}, spread <= {BARS['colour_spread']}, hueless <= {BARS['hueless_fraction']:.0%})\n")
    print("| asset | stage | colour error | colour spread | hueless | nearest | geometry unchanged | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for stage in ("texture", "edit"):
            if stage in r:
                s = r[stage]
                target = r["edit_colour"] if stage == "edit" else r["colour"]
                geometry = str(s["geometry_unchanged"]) if stage == "edit" else ""
                print(f"| {r['asset_id']} | {stage} → {target} | {s['colour_error']:.3f} | {s['colour_spread']:.3f} | "
                      f"{s['hueless_fraction']:.1%} | {s['nearest_colour']} | {geometry} | {r['seconds'].get(stage, 0):.0f} |")
    texture = [r["texture"] for r in results]
    edits = [r["edit"] for r in results if "edit" in r]
    mean = {k: float(np.mean([t[k] for t in texture])) for k in ("colour_error", "colour_spread", "hueless_fraction")}
    worst = {k: float(np.max([t[k] for t in texture])) for k in mean}
    print(f"| **texture mean** | | {mean['colour_error']:.3f} | {mean['colour_spread']:.3f} | {mean['hueless_fraction']:.1%} | | | |")
    print(f"| **texture worst** | | {worst['colour_error']:.3f} | {worst['colour_spread']:.3f} | {worst['hueless_fraction']:.1%} | | | |")
    if edits:
        print(f"| **edit mean** | | {np.mean([e['colour_error'] for e in edits]):.3f} | | | | "
              f"{all(e['geometry_unchanged'] for e in edits)} | |")
    contact_sheet(results, out / "contact_sheet.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'contact_sheet.png'}")


if __name__ == "__main__":
    main()
