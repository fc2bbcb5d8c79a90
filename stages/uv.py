"""Stage `uv`: xatlas unwrap of the `mesh` stage's mesh and an albedo texture baked from the nerf field.

`run(config, out_dir, inputs={"mesh": <mesh stage dir>, "nerf": <nerf stage dir>})` splits the mesh
along chart seams, rasterizes it in UV space, queries the field's albedo at every texel's surface
point and inpaints the rest of the texture. Without `nerf` the texture is the mesh's vertex colours
(a user mesh that had some) or a neutral grey. Commits the textured mesh with
`stages.assets.write_textured_mesh` (`mesh.obj`, `mesh.mtl`, `texture.png`, `asset.glb`, the hand-off
to `texture`/`edit`/`export`), `stats.json` (charts, utilisation, coverage, times), the config and
textured turntable previews.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from csd.checks import between, unit_rgb, validate, whole
from csd.fields import load_field
from csd.models import device_check
from csd.raster import MeshRenderer, MeshRendererConfig
from csd.uv import UnwrapConfig, bake_albedo, bake_vertex_colors, rasterize_uv, unwrap
from stages.assets import TexturedMesh, write_textured_mesh
from stages.common import StageResult, StageWorkspace, StepCallback, Timer, completed, write_previews
from stages.config import dump_yaml

log = logging.getLogger(__name__)

STATS_JSON = "stats.json"
PREVIEW_RENDERER = MeshRendererConfig(background="solid")


@dataclass(frozen=True)
class UVConfig:
    """Everything the `uv` stage needs; presets fill it, catalog rows override it."""

    unwrap: UnwrapConfig = UnwrapConfig()
    base_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Texture colour in [0, 1] when there is neither a field nor vertex colours (neutral grey)."""
    bake_depth: float = 0.1
    """How far (a fraction of the field's bound) outside and inside the surface the bake composites the
    field's albedo along the normal, as a view straight onto the surface sees it (`csd.uv.bake_albedo`);
    0: the albedo at the surface point."""
    bake_samples: int = 32
    """Points along each texel's normal for that composite."""
    chunk_size: int = 262_144
    """Points per field query."""
    device: str = "cpu"
    """Torch device for the field queries (`cpu`, `cuda`, `cuda:1`, …)."""
    preview_views: int = 8
    """Orbit views in the turntable preview."""
    preview_resolution: int = 128
    """Preview side in pixels."""

    def __post_init__(self):
        validate(self, {
            "base_color": unit_rgb, "bake_depth": between(0, 1), "bake_samples": whole(2), "chunk_size": whole(1),
            "device": device_check(auto=False), "preview_views": whole(1), "preview_resolution": whole(8),
        })


def _mesh_file(inputs: dict[str, Path] | None) -> Path:
    unknown = sorted(set(inputs or {}) - {"mesh", "nerf"})
    if not inputs or "mesh" not in inputs or unknown:
        raise ValueError(f"uv: needs input 'mesh' (a mesh stage directory) and optionally 'nerf'; got {sorted(inputs or {})}")
    result = completed(Path(inputs["mesh"]))
    if result is None:
        raise FileNotFoundError(f"uv: {inputs['mesh']} is not a completed mesh stage; run the mesh stage first")
    return result.path("mesh")


def run(
    config: UVConfig, out_dir: Path, *, inputs: dict[str, Path] | None = None, identity: str = "", callback: StepCallback = None
) -> StageResult:
    """Unwrap, bake and commit `out_dir`.

    `callback` is unused: the stage has no step loop (it exists so every stage has the same signature)."""
    import trimesh

    mesh_path = _mesh_file(inputs)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with StageWorkspace(out_dir, "uv", identity) as workspace:
        work = workspace.path
        timer = Timer()
        source = trimesh.load(mesh_path, process=False)
        vertices, faces = np.asarray(source.vertices), np.asarray(source.faces)
        with timer("unwrap"):
            uv_mesh = unwrap(vertices, faces, config.unwrap)
        with timer("rasterize"):
            raster = rasterize_uv(uv_mesh.uvs, uv_mesh.faces, config.unwrap.resolution)
        with timer("bake"):
            if "nerf" in inputs:
                field = load_field(Path(inputs["nerf"]), torch.device(config.device))
                texture = bake_albedo(field, uv_mesh, raster, config.chunk_size, config.device, config.bake_depth, config.bake_samples)
                texture_source = "field"
            elif source.visual.kind == "vertex":
                texture = bake_vertex_colors(uv_mesh, np.asarray(source.visual.vertex_colors)[:, :3] / 255.0, raster)
                texture_source = "vertex_colors"
            else:
                texture = np.empty((config.unwrap.resolution, config.unwrap.resolution, 3), dtype=np.uint8)
                texture[:] = (np.array(config.base_color) * 255).round().astype(np.uint8)
                texture_source = "base_color"
        textured = TexturedMesh(uv_mesh.vertices, uv_mesh.faces, uv_mesh.uvs, texture)
        with timer("write"):
            outputs = write_textured_mesh(textured, work)
        with timer("previews"):
            # unlit textured renders on white
            renderer = MeshRenderer(PREVIEW_RENDERER, textured.vertices, textured.faces, textured.uvs, config.device)
            image = torch.from_numpy(texture).to(renderer.device).float() / 255
            previews = write_previews(renderer.turntable(image, config.preview_views, config.preview_resolution), work, "turntable")
        timings = {**timer.totals, "total": time.perf_counter() - started}

        stats = {
            "texture_source": texture_source,
            "vertices": len(uv_mesh.vertices),
            "faces": len(uv_mesh.faces),
            "input_vertices": len(vertices),
            "charts": uv_mesh.charts,
            "atlas_size": uv_mesh.atlas_size,
            "texture_size": config.unwrap.resolution,
            "utilization": uv_mesh.utilization,
            "texel_coverage": float(raster.mask.mean()),
            "timings": timings,
        }
        (work / STATS_JSON).write_text(json.dumps(stats, indent=2))
        dump_yaml(config, work / "config.yaml")
        log.info("uv: %d charts, %.0f%% of the texture covered, texture from %s", stats["charts"], 100 * stats["texel_coverage"], texture_source)
        result = StageResult(
            stage="uv",
            directory=str(out_dir),
            outputs={**outputs, "stats": STATS_JSON, "config": "config.yaml"},
            metrics={key: float(stats[key]) for key in ("vertices", "faces", "charts", "utilization", "texel_coverage")},
            timings=timings,
            previews=previews,
        )
        return workspace.commit(result)
