"""Stage `export`: the bundle a user picks up — GLB, OBJ/MTL/PNG, turntable video, contact sheet,
and `card.json` with prompts, per-stage identities and timings, mesh stats and a quality score (toy presets: also
the ground-truth shape IoU and surface colour error of `stages.score`).

Input `asset` is the last geometry+texture stage that ran (edit > texture > uv); the other stage
directories (`nerf`, `mesh`, `uv`, `texture`, `edit`) are read only for the card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from csd.checks import validate, whole
from csd.metrics import Scorer, score_views
from csd.mesh import mesh_stats
from csd.raster import MeshRenderer, MeshRendererConfig
from stages.assets import TexturedMesh, read_textured_mesh, write_textured_mesh
from stages.common import StageResult, StageWorkspace, StepCallback, Timer, contact_sheet, to_uint8
from stages.config import dump_yaml
from stages.score import score_textured_mesh

log = logging.getLogger(__name__)

STAGE_ORDER = ("nerf", "mesh", "uv", "texture", "edit")


@dataclass(frozen=True)
class ExportConfig:
    """What goes into the bundle and how the asset is scored."""

    prompt: str = ""
    """The row's prompt (the card records it; the score uses it unless an edit ran)."""
    negative_prompt: str = ""
    edit_prompt: str = ""
    """When an edit ran, the asset is scored against this target prompt (and the source prompt)."""
    seed: int = 0
    preset: str = ""
    """Preset name, recorded in the card."""
    scorer: Scorer = "toy"
    """`toy` (the shipped evaluator), `clip` (CLIP score) or `none`."""
    clip_model: str = "openai/clip-vit-base-patch32"
    """transformers CLIP id or local folder, for scorer `clip`."""
    score_views: int = 8
    """Orbit views scored."""
    score_resolution: int = 32
    """Side of the scored renders (toy evaluator: 32; CLIP: 224)."""
    render_resolution: int = 128
    """Side of the turntable renders before upscaling to `turntable_resolution`."""
    turntable_frames: int = 24
    turntable_resolution: int = 256
    fps: int = 12
    video: Literal["mp4", "gif"] = "mp4"
    """`mp4` (H.264 through imageio-ffmpeg) or `gif`."""
    elevation: float = 15.0
    """Elevation of the orbit cameras, degrees."""
    renderer: MeshRendererConfig = MeshRendererConfig(background="solid", normals="smooth")

    def __post_init__(self):
        validate(self, {
            "score_views": whole(1), "score_resolution": whole(1), "render_resolution": whole(1),
            "turntable_frames": whole(16), "turntable_resolution": whole(256), "fps": whole(1),
        })


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("csd-asset", "torch", "diffusers", "transformers", "trimesh", "pymeshlab", "xatlas", "prefect", "mlflow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _stage_records(inputs: dict[str, Path]) -> dict[str, dict]:
    records = {}
    for name in STAGE_ORDER:
        if name in inputs and (Path(inputs[name]) / "result.json").exists():
            result = json.loads((Path(inputs[name]) / "result.json").read_text())
            records[name] = {"identity": result.get("identity", ""), "timings": result.get("timings", {}), "metrics": result.get("metrics", {})}
    return records


def _clean(mesh: TexturedMesh) -> tuple[TexturedMesh, int]:
    """Drop zero-area faces (a GLB must not carry them)."""
    corners = mesh.vertices[mesh.faces]
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    keep = area > 1e-12
    return dataclasses.replace(mesh, faces=mesh.faces[keep]), int((~keep).sum())


def _mesh_stats(mesh: TexturedMesh) -> dict:
    """`csd.mesh.mesh_stats` of the surface (vertices merged across UV seams for the topology) with
    the bundle's own vertex count (seams split) and texture size."""
    import trimesh

    merged = trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)
    stats = mesh_stats(np.asarray(merged.vertices), np.asarray(merged.faces))
    return {**stats, "vertices": int(len(mesh.vertices)), "texture_size": list(mesh.texture.shape[:2])}


def _write_video(frames: np.ndarray, path: Path, fps: int) -> None:
    import imageio
    import imageio.v3 as iio

    if path.suffix == ".gif":
        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
        return
    writer = imageio.get_writer(path, fps=fps, codec="libx264", pixelformat="yuv420p", quality=8, macro_block_size=16)
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def verify_bundle(directory: Path, mesh: TexturedMesh) -> dict[str, bool]:
    """Re-read the GLB with trimesh and pygltflib: faces, UVs and texture pixels must have survived."""
    import pygltflib
    import trimesh

    loaded = trimesh.load(directory / "asset.glb", force="mesh", process=False)
    texture = np.asarray(loaded.visual.material.baseColorTexture)[..., :3]
    gltf = pygltflib.GLTF2().load(str(directory / "asset.glb"))
    primitive = gltf.meshes[0].primitives[0]
    checks = {
        "faces": len(loaded.faces) == len(mesh.faces),
        "uvs": loaded.visual.uv is not None and np.allclose(loaded.visual.uv, mesh.uvs, atol=1e-5),
        "texture": texture.shape == mesh.texture.shape and bool(np.array_equal(texture, mesh.texture)),
        "normals": primitive.attributes.NORMAL is not None,
        "texcoords": primitive.attributes.TEXCOORD_0 is not None,
    }
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        raise RuntimeError(f"export: the written GLB lost {', '.join(failed)} on re-reading {directory / 'asset.glb'}")
    return checks


def run(config: ExportConfig, out_dir: Path, *, inputs: dict[str, Path] | None = None, identity: str = "", callback: StepCallback = None) -> StageResult:
    """Write the bundle for the textured asset in `inputs["asset"]`."""
    inputs = {k: Path(v) for k, v in (inputs or {}).items()}
    if "asset" not in inputs:
        raise ValueError("export: needs inputs['asset'], the directory of the last textured stage (edit > texture > uv)")
    started = time.perf_counter()
    timer = Timer()
    source = read_textured_mesh(inputs["asset"])
    mesh, dropped = _clean(source)
    with StageWorkspace(Path(out_dir), "export", identity) as workspace:
        work = workspace.path
        with timer("write"):
            outputs = write_textured_mesh(mesh, work)
            checks = verify_bundle(work, mesh)
        renderer = MeshRenderer(config.renderer, mesh.vertices, mesh.faces, mesh.uvs)
        texture = torch.from_numpy(mesh.texture).float() / 255
        with timer("render"):
            frames = renderer.turntable(texture, config.turntable_frames, config.render_resolution, "diffuse", config.elevation, chunk=8)
            frames = F.interpolate(frames, size=config.turntable_resolution, mode="bilinear", align_corners=False)
            video = f"turntable.{config.video}"
            _write_video(to_uint8(frames), work / video, config.fps)
            step = max(1, config.turntable_frames // 8)
            iio.imwrite(work / "preview.png", contact_sheet(to_uint8(frames[::step][:8]), columns=4))
        scores = {}
        with timer("score"), torch.no_grad():
            views = renderer.turntable(texture, config.score_views, config.score_resolution, "diffuse", config.elevation, chunk=config.score_views)
            targets = {"prompt": config.prompt}
            if config.edit_prompt:
                targets = {"edit_prompt": config.edit_prompt, "prompt": config.prompt}
            for role, text in targets.items():
                score = score_views(views, text, config.scorer, config.clip_model)
                if score is not None:
                    scores[role] = {"scorer": score.scorer, "score": score.score, **score.details}
                if config.scorer == "toy":
                    # the world's ground truth: shape IoU with the fitted primitive, surface colour error
                    scores.setdefault(role, {}).update(score_textured_mesh(mesh, text, views))
        card = {
            "prompt": config.prompt,
            "negative_prompt": config.negative_prompt,
            "edit_prompt": config.edit_prompt,
            "preset": config.preset,
            "seed": config.seed,
            "source_stage": inputs["asset"].name,
            "stages": _stage_records(inputs),
            "mesh": {**_mesh_stats(mesh), "degenerate_faces_dropped": dropped},
            "quality": scores,
            "bundle_checks": checks,
            "up_axis": "+Y in the GLB (glTF); +Z in mesh.obj (the pipeline's world frame); units: world units ≈ metres, object inside radius 1",
            "software": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (work / "card.json").write_text(json.dumps(card, indent=2))
        dump_yaml(config, work / "config.yaml")
        headline = scores.get("edit_prompt", scores.get("prompt", {}))
        metrics = {"faces": float(len(mesh.faces))}
        if headline:
            metrics["quality"] = headline["score"]
            metrics.update({k: v for k, v in headline.items() if isinstance(v, float)})
        result = StageResult(
            stage="export",
            directory=str(out_dir),
            outputs={**outputs, "card": "card.json", "video": video, "preview": "preview.png", "config": "config.yaml"},
            metrics=metrics,
            timings={**timer.totals, "total": time.perf_counter() - started},
            previews=["preview.png", video],
        )
        return workspace.commit(result)
