"""Ground-truth and open-set scores of a finished stage folder, for toy-world prompts.

`score_stage(stage, directory, prompt)` reads what the stage committed — `field.safetensors` /
`field.json` for `nerf`, `mesh.ply` for `mesh`, the textured OBJ + `texture.png` for `uv`, `texture`,
`edit` and `export` — and returns a flat dict of numbers:

* `shape_iou`, `shape_margin`, `best_shape` (`csd.toy.groundtruth`: volumetric IoU with the prompted
  primitive fitted over the world's radius, yaw and centre; margin over the best other primitive);
* `colour_error`, `colour_spread`, `nearest_colour`, `hueless_fraction` (area-weighted surface albedo
  vs the palette; the share of the surface without a hue);
* `colour_accuracy`, `shape_accuracy`, `views`, `view_shapes` (the toy evaluator over orbit views
  rendered as the `export` stage renders its score views; the evaluator may answer a shape that is
  none of the world's, so the counts are keyed by whatever it answers).

A prompt that is not "a <palette colour> <world shape>" gets `{"not_scored": NOT_TOY}`. The scores
judge only: nothing in the pipeline reads them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from csd.metrics import view_accuracy
from csd.raster import MeshRenderer, MeshRendererConfig
from csd.toy import groundtruth as gt
from stages.assets import MESH_OBJ, TexturedMesh, read_textured_mesh

log = logging.getLogger(__name__)

NOT_TOY = "not a toy-world prompt"
SCORED_STAGES = ("nerf", "mesh", "uv", "texture", "edit", "export")
"""Stages with geometry or a texture, in pipeline order (`mesh` has no texture: geometry only)."""
TEXTURED_STAGES = ("uv", "texture", "edit", "export")
# the export stage's defaults for its score views (ExportConfig: score_views, score_resolution,
# elevation, renderer): the same views the card's toy score has always used
VIEWS, VIEW_RESOLUTION, VIEW_ELEVATION = 8, 32, 15.0
VIEW_RENDERER = MeshRendererConfig(background="solid", normals="smooth")


def toy_target(prompt: str) -> tuple[str, str] | None:
    """`("red", "cube")` for a toy-world prompt, None for any other."""
    from csd.toy.evaluator import parse_prompt

    try:
        return parse_prompt(prompt)
    except ValueError:
        return None


def view_scores(views: Tensor, prompt: str) -> dict[str, Any]:
    """The toy evaluator over `views` `(B, 3, H, W)`: fractions right on colour and shape, and what it saw."""
    from csd.toy.evaluator import load_evaluator

    result = load_evaluator().score(views, prompt)
    accuracy = view_accuracy(result)
    return {
        "colour_accuracy": accuracy["colour_accuracy"],
        "shape_accuracy": accuracy["shape_accuracy"],
        "views": len(views),
        "view_shapes": dict(Counter(result.predicted_shapes)),
        "view_colours": dict(Counter(result.predicted_colours)),
    }


def render_views(mesh: TexturedMesh, count: int = VIEWS, resolution: int = VIEW_RESOLUTION, elevation: float = VIEW_ELEVATION,
                 renderer: MeshRendererConfig = VIEW_RENDERER) -> Tensor:
    """`(count, 3, R, R)` diffuse-shaded orbit views of a textured mesh, as `export` scores them."""
    with torch.no_grad():
        render = MeshRenderer(renderer, mesh.vertices, mesh.faces, mesh.uvs)
        texture = torch.from_numpy(mesh.texture).float() / 255
        return render.turntable(texture, count, resolution, "diffuse", elevation, chunk=count)


def _shape_numbers(score: gt.ShapeScore) -> dict[str, Any]:
    fit = score.fits.get(score.prompted)
    return {"shape_iou": score.shape_iou, "shape_margin": score.shape_margin, "best_shape": score.best_shape,
            "fit_radius": fit.radius if fit else None, "shape_ious": {name: f.iou for name, f in score.fits.items()}}


def _colour_numbers(score: gt.ColourScore) -> dict[str, Any]:
    return {"colour_error": score.colour_error, "colour_spread": score.colour_spread, "nearest_colour": score.nearest_colour,
            "hueless_fraction": score.hueless_fraction, "mean_albedo": score.mean_rgb}


def score_textured_mesh(mesh: TexturedMesh, prompt: str, views: Tensor | None = None) -> dict[str, Any]:
    """Scores of a textured mesh against a toy prompt; `views` (rendered by the caller) or `render_views`."""
    target = toy_target(prompt)
    if target is None:
        return {"not_scored": NOT_TOY}
    colour, shape = target
    out = {"prompt": prompt, **_shape_numbers(gt.score_mesh_shape(mesh.vertices, mesh.faces, shape))}
    out.update(_colour_numbers(gt.score_colours(gt.textured_surface_colours(mesh.vertices, mesh.faces, mesh.uvs, mesh.texture), colour)))
    out.update(view_scores(render_views(mesh) if views is None else views, prompt))
    return out


def _field_level(asset_dir: Path) -> float:
    """The density level the asset's `mesh` stage extracted at (its `stats.json` `threshold`): the nerf
    is judged at the surface the pipeline took from it, whatever the threshold rule (`auto` or a number)."""
    stats = asset_dir / "mesh" / "stats.json"
    if stats.exists():
        level = json.loads(stats.read_text()).get("threshold")
        if level is not None:
            return float(level)
    raise FileNotFoundError(f"{stats}: no mesh stage with a recorded threshold; the nerf field is scored at the level the mesh stage used")


def score_field_dir(directory: Path, prompt: str, level: float, device: str = "cpu") -> dict[str, Any]:
    """Scores of a saved nerf field (`field.safetensors` + `field.json`) at density `level`; views by
    the volume renderer, as the nerf stage renders its turntable, at the export's score resolution."""
    from csd.fields import load_field
    from csd.renderer import RendererConfig, VolumeRenderer
    import yaml

    from stages.config import build_config
    from stages.nerf import render_turntable

    target = toy_target(prompt)
    if target is None:
        return {"not_scored": NOT_TOY}
    colour, shape = target
    field = load_field(Path(directory), torch.device(device))
    out = {"prompt": prompt, "level": level, **_shape_numbers(gt.score_field_shape(field, level, shape, device))}
    out.update(_colour_numbers(gt.score_colours(gt.field_surface_colours(field, level, device=device), colour)))

    config_path = Path(directory) / "config.yaml"
    saved = (yaml.safe_load(config_path.read_text()) or {}).get("renderer", {}) if config_path.exists() else {}
    # the learned background is not saved with the field; score on the export's solid white
    config = dataclasses.replace(build_config(RendererConfig, saved, where=f"{config_path}: renderer"), background="solid")
    renderer = VolumeRenderer(config, field.bound, device)
    views = render_turntable(field, renderer, VIEWS, VIEW_RESOLUTION, "diffuse", VIEW_ELEVATION)
    out.update(view_scores(views, prompt))
    return out


def score_mesh_ply(path: Path, prompt: str) -> dict[str, Any]:
    """Geometry score of an untextured `mesh.ply` (its views would be grey: no open-set score)."""
    import trimesh

    target = toy_target(prompt)
    if target is None:
        return {"not_scored": NOT_TOY}
    mesh = trimesh.load(path, force="mesh", process=False)
    return {"prompt": prompt, **_shape_numbers(gt.score_mesh_shape(np.asarray(mesh.vertices), np.asarray(mesh.faces), target[1]))}


def stage_prompt(stage: str, row: dict[str, Any], stages_done: list[str]) -> str:
    """What a stage was made for: the edit prompt for `edit`, and for `export` when an edit ran; else the prompt."""
    edit_prompt = str(row.get("edit_prompt") or "")
    if edit_prompt and (stage == "edit" or (stage == "export" and "edit" in stages_done)):
        return edit_prompt
    return str(row.get("prompt") or "")


def score_stage(stage: str, directory: Path, prompt: str, device: str = "cpu") -> dict[str, Any]:
    """Scores of one committed stage folder (see the module docstring)."""
    directory = Path(directory)
    if toy_target(prompt) is None:
        return {"not_scored": NOT_TOY, "prompt": prompt}
    if stage == "nerf":
        return score_field_dir(directory, prompt, _field_level(directory.parent), device)
    if stage == "mesh":
        return score_mesh_ply(directory / "mesh.ply", prompt)
    if stage in TEXTURED_STAGES:
        if not (directory / MESH_OBJ).exists():
            raise FileNotFoundError(f"{directory}: no {MESH_OBJ} (stage {stage!r} holds no textured mesh)")
        return score_textured_mesh(read_textured_mesh(directory), prompt)
    raise ValueError(f"stage {stage!r} has nothing to score; scored stages: {', '.join(SCORED_STAGES)}")


def score_asset(asset_dir: Path, row: dict[str, Any], stages_done: list[str], device: str = "cpu") -> dict[str, Any]:
    """`{"asset_id", "prompt", "stages": {stage: scores}}` for the finished `stages_done` under `asset_dir`.
    A stage that cannot be scored gets `{"error": …}` and the others are still scored."""
    asset_dir = Path(asset_dir)
    out: dict[str, Any] = {"asset_id": asset_dir.name, "prompt": row.get("prompt", ""), "edit_prompt": row.get("edit_prompt", ""), "stages": {}}
    for stage in (s for s in SCORED_STAGES if s in stages_done):
        try:
            out["stages"][stage] = score_stage(stage, asset_dir / stage, stage_prompt(stage, row, stages_done), device)
        except (FileNotFoundError, ValueError) as error:
            log.warning("score %s/%s: %s", asset_dir.name, stage, error)
            out["stages"][stage] = {"error": str(error)}
    return out
