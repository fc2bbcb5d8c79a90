"""Stage `mesh`: the nerf field's density → marching cubes → clean, remeshed, decimated triangle mesh.

`run(config, out_dir, inputs={"nerf": <nerf stage dir>})` samples the saved field on a grid (coarse
pass, then a fine grid on the tightened box), extracts the isosurface and cleans it with pymeshlab.
`inputs={"user_mesh": <OBJ/GLB/PLY file>}` (texture-only rows) instead normalises a given mesh into the
bounding sphere and only repairs it. Commits `mesh.ply`, `stats.json` (counts, topology, box, area,
volume, the level used, every step's time), the config and normal-shaded turntable previews.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from csd.checks import at_least, validate, whole
from csd.fields import load_field
from csd.mesh import (
    CleanupConfig,
    ExtractionConfig,
    clean_mesh,
    extract_isosurface,
    mesh_stats,
    normalize_to_sphere,
)
from csd.models import device_check
from csd.raster import MeshRenderer, MeshRendererConfig
from stages.assets import Z_UP_TO_Y_UP
from stages.common import StageResult, StageWorkspace, StepCallback, Timer, json_ready, write_previews
from stages.config import dump_yaml

log = logging.getLogger(__name__)

MESH_PLY, STATS_JSON = "mesh.ply", "stats.json"
# glTF is y-up by specification
_Y_UP_SUFFIXES = (".glb", ".gltf")
PREVIEW_RENDERER = MeshRendererConfig(background="solid", normals="flat")
"""Mesh previews: white background, face normals (the facets marching cubes and decimation left)."""
PREVIEW_ALBEDO = 0.8
"""Grey of the untextured mesh in its previews (a face lit head-on stays distinct from the white background)."""


@dataclass(frozen=True)
class MeshConfig:
    """Everything the `mesh` stage needs; presets fill it, catalog rows override it."""

    extraction: ExtractionConfig = ExtractionConfig()
    cleanup: CleanupConfig = CleanupConfig()
    user_mesh_radius: float = 0.8
    """A user mesh is centred and scaled so its farthest vertex lies at this radius (world units)."""
    user_mesh_up: Literal["z", "y"] = "z"
    """Up axis of user OBJ/PLY files (`z` as our world, or `y`); GLB/glTF files are always y-up."""
    device: str = "cpu"
    """Torch device for the field queries (`cpu`, `cuda`, `cuda:1`, …)."""
    preview_views: int = 8
    """Orbit views in the turntable preview."""
    preview_resolution: int = 128
    """Preview side in pixels."""

    def __post_init__(self):
        validate(self, {
            "user_mesh_radius": at_least(0, exclusive=True), "device": device_check(auto=False),
            "preview_views": whole(1), "preview_resolution": whole(8),
        })


def _check_inputs(inputs: dict[str, Path] | None) -> tuple[str, Path]:
    names = sorted(inputs or {})
    if names not in (["nerf"], ["user_mesh"]):
        raise ValueError(f"mesh: needs exactly one input, 'nerf' (a nerf stage directory) or 'user_mesh' (a mesh file); got {names}")
    path = Path(inputs[names[0]])
    if not path.exists():
        raise FileNotFoundError(f"mesh: input {names[0]!r} {path} does not exist")
    return names[0], path


def load_user_mesh(path: Path, up: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A mesh file → z-up vertices `(V, 3)`, faces `(F, 3)` and vertex colours `(V, 4)` in [0, 1] when it
    has any (a texture is sampled at the vertices), else None."""
    import trimesh

    mesh = trimesh.load(path, force="mesh", process=False)
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"mesh: {path} holds no triangles")
    if path.suffix.lower() in _Y_UP_SUFFIXES or up == "y":
        mesh.apply_transform(np.linalg.inv(Z_UP_TO_Y_UP))
    colors = None
    if mesh.visual.kind == "texture":
        colors = mesh.visual.to_color().vertex_colors
    elif mesh.visual.kind == "vertex":
        colors = mesh.visual.vertex_colors
    if colors is not None:
        colors = np.asarray(colors, dtype=np.float64) / 255.0
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64), colors


def run(
    config: MeshConfig, out_dir: Path, *, inputs: dict[str, Path] | None = None, identity: str = "", callback: StepCallback = None
) -> StageResult:
    """Extract (or take and normalise) the mesh, clean it and commit `out_dir`.

    `callback` is unused: the stage has no step loop (it exists so every stage has the same signature)."""
    kind, source = _check_inputs(inputs)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with StageWorkspace(out_dir, "mesh", identity) as workspace:
        work = workspace.path
        stats: dict[str, Any] = {"source": kind}
        timer = Timer()
        if kind == "nerf":
            with timer("load_field"):
                field = load_field(source, torch.device(config.device))
            surface = extract_isosurface(field, config.extraction, config.device)
            timer.totals.update(surface.timings)
            stats.update(
                threshold=surface.level,
                density_range=list(surface.density_range),
                grid_shape=list(surface.grid_shape),
                grid_box=[surface.box_min.tolist(), surface.box_max.tolist()],
                marching_cubes_faces=len(surface.faces),
            )
            cleaned = clean_mesh(surface.vertices, surface.faces, config.cleanup)
        else:
            vertices, faces, colors = load_user_mesh(source, config.user_mesh_up)
            vertices, scale, center = normalize_to_sphere(vertices, config.user_mesh_radius)
            stats["normalization"] = {"scale": scale, "center": center.tolist(), "formula": "world = scale * (file - center)"}
            stats["input_faces"] = len(faces)
            cleaned = clean_mesh(vertices, faces, config.cleanup, remesh=False, vertex_colors=colors)
        timer.totals.update(cleaned.timings)
        if len(cleaned.faces) == 0:
            raise ValueError(f"mesh: clean-up left no faces (from {source}); check the threshold and min_component_ratio")

        with timer("write"):
            _write_ply(work / MESH_PLY, cleaned.vertices, cleaned.faces, cleaned.vertex_colors)
        with timer("previews"):
            # the untextured mesh: uniform grey albedo, diffuse shading from the camera's point light
            renderer = MeshRenderer(PREVIEW_RENDERER, cleaned.vertices, cleaned.faces, np.zeros((len(cleaned.vertices), 2)), config.device)
            grey = torch.full((1, 1, 3), PREVIEW_ALBEDO, device=renderer.device)
            frames = renderer.turntable(grey, config.preview_views, config.preview_resolution, "diffuse")
            previews = write_previews(frames, work, "turntable")
        timings = {**timer.totals, "total": time.perf_counter() - started}
        stats.update(mesh_stats(cleaned.vertices, cleaned.faces), vertex_colors=cleaned.vertex_colors is not None, timings=timings)
        (work / STATS_JSON).write_text(json.dumps(stats, indent=2))
        dump_yaml(config, work / "config.yaml")
        log.info("mesh: %d faces, %d components, watertight %s", stats["faces"], stats["components"], stats["watertight"])
        metrics = {key: stats[key] for key in ("vertices", "faces", "components", "euler_characteristic", "area", "volume")}
        metrics.update(watertight=float(stats["watertight"]), threshold=stats.get("threshold"))
        result = StageResult(
            stage="mesh",
            directory=str(out_dir),
            outputs={"mesh": MESH_PLY, "stats": STATS_JSON, "config": "config.yaml"},
            metrics=json_ready(metrics),
            timings=timings,
            previews=previews,
        )
        return workspace.commit(result)


def _write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray, vertex_colors: np.ndarray | None) -> None:
    import trimesh

    colors = None if vertex_colors is None else (np.clip(vertex_colors, 0, 1) * 255).round().astype(np.uint8)
    trimesh.Trimesh(vertices, faces, vertex_colors=colors, process=False).export(path)
