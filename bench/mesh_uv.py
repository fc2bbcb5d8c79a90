"""Benchmark of the `mesh` and `uv` stages (issue 4): prints seconds per step, asserts nothing.

1. A 256³ analytic field (a bumpy ball with a two-colour albedo) → marching cubes → 20 k-face remesh
   → xatlas unwrap + 1024² bake: the GPU-preset sizes, timed on this machine's CPU (target ≤ 30 s on
   2 cores).
2. The `toy-cpu` preset's `mesh` and `uv` stages end to end on a toy-sized implicit volume — the one
   `--nerf DIR` names (a finished nerf stage), else a freshly initialised blob (target ≤ 10 s).

    python bench/mesh_uv.py [--nerf DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from csd.fields import FieldConfig, ImplicitVolume, save_field
from csd.mesh import CleanupConfig, ExtractionConfig, clean_mesh, extract_isosurface
from csd.uv import UnwrapConfig, bake_albedo, rasterize_uv, unwrap
from stages import mesh as mesh_stage
from stages import uv as uv_stage
from stages.config import build_config, load_preset


class BumpyBall:
    """Density 50 inside a ball of radius 0.5 with ±0.04 bumps (official-scale level 25 at the edge);
    albedo red for x > 0, blue for x < 0."""

    bound = 1.0

    def density(self, points: torch.Tensor) -> torch.Tensor:
        bumps = 0.04 * torch.sin(8 * points[:, 0]) * torch.sin(8 * points[:, 1]) * torch.sin(8 * points[:, 2])
        return 50.0 * torch.sigmoid((0.5 + bumps - points.norm(dim=-1)) / 0.01)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        red = (points[:, :1] > 0).float()
        return torch.cat([red, torch.zeros_like(red), 1 - red], dim=-1)


def _report(title: str, timings: dict[str, float]) -> None:
    print(f"\n{title}")
    for name, seconds in timings.items():
        print(f"  {name:<20s} {seconds:7.2f} s")


def bench_gpu_sizes() -> None:
    field, timings = BumpyBall(), {}
    surface = extract_isosurface(field, ExtractionConfig(resolution=256, threshold=25.0))
    timings.update(surface.timings)
    mesh = clean_mesh(surface.vertices, surface.faces, CleanupConfig(target_faces=20_000))
    timings.update(mesh.timings)
    start = time.perf_counter()
    atlas = unwrap(mesh.vertices, mesh.faces, UnwrapConfig(resolution=1024))
    timings["unwrap"] = time.perf_counter() - start
    start = time.perf_counter()
    raster = rasterize_uv(atlas.uvs, atlas.faces, 1024)
    timings["rasterize"] = time.perf_counter() - start
    start = time.perf_counter()
    bake_albedo(field, atlas, raster)
    timings["bake"] = time.perf_counter() - start
    timings["TOTAL"] = sum(timings.values())
    _report(
        f"256³ analytic field → {len(surface.faces)} marching-cubes faces → {len(mesh.faces)} faces → "
        f"{atlas.charts} charts, 1024² texture (target ≤ 30 s)",
        timings,
    )


def bench_toy_cpu(nerf: Path | None) -> None:
    preset = load_preset("toy-cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if nerf is None:
            nerf = tmp / "nerf"
            nerf.mkdir()
            torch.manual_seed(0)
            save_field(ImplicitVolume(build_config(FieldConfig, preset["nerf"]["field"])), nerf)
        mesh_config = build_config(mesh_stage.MeshConfig, preset["mesh"])
        uv_config = build_config(uv_stage.UVConfig, preset["uv"])
        start = time.perf_counter()
        mesh_result = mesh_stage.run(mesh_config, tmp / "mesh", inputs={"nerf": nerf})
        uv_result = uv_stage.run(uv_config, tmp / "uv", inputs={"mesh": tmp / "mesh", "nerf": nerf})
        total = time.perf_counter() - start
    _report(f"toy-cpu mesh stage ({int(mesh_result.metrics['faces'])} faces, level {mesh_result.metrics['threshold']:.3g})", mesh_result.timings)
    _report(f"toy-cpu uv stage ({int(uv_result.metrics['charts'])} charts)", uv_result.timings)
    print(f"\ntoy-cpu mesh + uv stages: {total:.2f} s (target ≤ 10 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nerf", type=Path, default=None, help="a finished nerf stage directory for the toy-cpu run")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    bench_gpu_sizes()
    bench_toy_cpu(args.nerf)


if __name__ == "__main__":
    main()
