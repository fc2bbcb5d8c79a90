"""Ground-truth scores of stage folders (stages/score.py) and in the export card (toy presets)."""

import json
from pathlib import Path

import numpy as np
import pytest

from csd.toy.world import COLOURS
from stages.assets import TexturedMesh, write_textured_mesh
from stages.common import StageResult, StageWorkspace
from stages.export import ExportConfig, run
from stages.score import NOT_TOY, score_stage, stage_prompt


def textured_cube(colour=COLOURS["red"], radius: float = 0.6) -> TexturedMesh:
    """The world's cube (corners on `radius`), subdivided, one solid colour."""
    import trimesh

    box = trimesh.creation.box(extents=[2 * radius / 3**0.5] * 3).subdivide().subdivide()
    uvs = 0.25 + 0.5 * (box.vertices[:, :2] - box.vertices[:, :2].min(0)) / np.ptp(box.vertices[:, :2], 0)
    texture = np.full((32, 32, 3), (np.array(colour) * 255).round(), np.uint8)
    return TexturedMesh(box.vertices, box.faces, uvs, texture)


def commit_uv(directory: Path, mesh: TexturedMesh, identity: str = "uv-id") -> None:
    with StageWorkspace(directory, "uv", identity) as ws:
        ws.commit(StageResult("uv", "", outputs=write_textured_mesh(mesh, ws.path), timings={"total": 1.0}))


def test_textured_stage_scores_its_primitive_and_colour(tmp_path):
    commit_uv(tmp_path / "uv", textured_cube())
    numbers = score_stage("uv", tmp_path / "uv", "a red cube")
    assert numbers["best_shape"] == "cube" and numbers["shape_iou"] >= 0.97 and numbers["shape_margin"] > 0.2
    assert numbers["colour_error"] < 0.01 and numbers["nearest_colour"] == "red" and numbers["hueless_fraction"] == 0.0
    assert numbers["views"] == 8 and sum(numbers["view_shapes"].values()) == 8
    assert 0.0 <= numbers["colour_accuracy"] <= 1.0 and 0.0 <= numbers["shape_accuracy"] <= 1.0
    wrong = score_stage("uv", tmp_path / "uv", "a blue sphere")
    assert wrong["shape_margin"] < -0.2 and wrong["colour_error"] > 0.4 and wrong["best_shape"] == "cube"


def test_non_toy_prompt_is_an_entry_not_an_error(tmp_path):
    commit_uv(tmp_path / "uv", textured_cube())
    assert score_stage("uv", tmp_path / "uv", "a wooden chair")["not_scored"] == NOT_TOY
    with pytest.raises(FileNotFoundError, match="mesh.obj"):
        score_stage("texture", tmp_path / "missing", "a red cube")


def test_edit_and_export_after_an_edit_are_scored_against_the_edit_prompt():
    row = {"prompt": "a red cube", "edit_prompt": "a blue cube"}
    assert stage_prompt("texture", row, ["uv", "texture", "edit"]) == "a red cube"
    assert stage_prompt("edit", row, ["uv", "texture", "edit"]) == "a blue cube"
    assert stage_prompt("export", row, ["uv", "texture", "edit", "export"]) == "a blue cube"
    assert stage_prompt("export", row, ["uv", "texture", "export"]) == "a red cube"


def test_export_card_holds_the_ground_truth_for_toy_presets(tmp_path):
    commit_uv(tmp_path / "uv", textured_cube(COLOURS["green"]))
    config = ExportConfig(prompt="a green cube", preset="toy-cpu", scorer="toy", turntable_frames=16, video="gif")
    result = run(config, tmp_path / "export", inputs={"asset": tmp_path / "uv", "uv": tmp_path / "uv"}, identity="export-id")
    quality = json.loads((tmp_path / "export" / "card.json").read_text())["quality"]["prompt"]
    assert quality["scorer"] == "toy" and quality["best_shape"] == "cube" and quality["shape_iou"] >= 0.97
    assert quality["colour_error"] < 0.01 and quality["nearest_colour"] == "green"
    assert 0.0 <= quality["shape_accuracy"] <= 1.0 and quality["views"] == 8
    assert result.metrics["shape_iou"] == pytest.approx(quality["shape_iou"])
    # scorer none (the real presets score with CLIP instead): no toy ground truth in the card
    run(ExportConfig(prompt="a green cube", scorer="none", turntable_frames=16, video="gif"), tmp_path / "plain",
        inputs={"asset": tmp_path / "uv"}, identity="export-2")
    assert json.loads((tmp_path / "plain" / "card.json").read_text())["quality"] == {}


def test_nerf_stage_is_scored_at_the_mesh_level(tmp_path):
    import torch

    from csd.fields import FieldConfig, ImplicitVolume, save_field

    torch.manual_seed(0)
    # a freshly initialised field is the density blob: a sphere wherever the level cuts it
    (tmp_path / "nerf").mkdir()
    save_field(ImplicitVolume(FieldConfig(n_levels=4, log2_hashmap_size=12, max_resolution=64)), tmp_path / "nerf")
    with pytest.raises(FileNotFoundError, match="stats.json"):
        score_stage("nerf", tmp_path / "nerf", "a red sphere")
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "stats.json").write_text(json.dumps({"threshold": 3.0}))
    numbers = score_stage("nerf", tmp_path / "nerf", "a red cube")
    assert numbers["level"] == 3.0 and numbers["best_shape"] == "sphere"
    assert numbers["shape_ious"]["sphere"] >= 0.97 and numbers["shape_margin"] < -0.1
    assert 0.0 <= numbers["colour_error"] <= 1.0 and numbers["views"] == 8
