"""The texture and edit stages: outputs, unchanged geometry, resume, guidance of the edit, seam dilation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from csd.guidance import GuidanceConfig
from stages.assets import MESH_OBJ, TexturedMesh, read_textured_mesh, write_textured_mesh
from stages.common import completed
from stages.config import ConfigError, build_config, load_preset
from stages.edit import EditConfig, edit_guidance
from stages.edit import run as run_edit
from csd.texture import TextureImage
from stages.texture import TextureConfig
from stages.texture import run as run_texture

GREY = 128


@pytest.fixture(scope="module")
def uv_dir(tmp_path_factory) -> Path:
    """A `uv` stage's hand-off: a box unwrapped by xatlas with a flat grey 32² texture."""
    import trimesh
    import xatlas

    box = trimesh.creation.box((0.9, 0.9, 0.9))
    mapping, faces, uvs = xatlas.parametrize(box.vertices, box.faces)
    directory = tmp_path_factory.mktemp("uv")
    write_textured_mesh(TexturedMesh(box.vertices[mapping], faces, uvs, np.full((32, 32, 3), GREY, np.uint8)), directory)
    return directory


def _section(stage: str, model_path: Path) -> dict:
    preset = load_preset("toy-cpu")
    return {**preset[stage], "model": {**preset["model"], "model": str(model_path)}}


SMALL = {"steps": 6, "checkpoint_every": 3, "resolution": 16, "batch_size": 2, "preview_views": 4, "preview_resolution": 16,
         "evaluator": "none", "lr": 0.05}


def _texture_config(model_path, **overrides) -> TextureConfig:
    return build_config(TextureConfig, _section("texture", model_path), {"prompt": "a red cube", **SMALL, **overrides})


def _edit_config(model_path, **overrides) -> EditConfig:
    values = {"prompt": "a blue cube", "source_prompt": "a red cube", **SMALL, **overrides}
    return build_config(EditConfig, _section("edit", model_path), values)


def test_texture_then_edit_change_the_texture_and_keep_the_geometry(if_like_model, uv_dir, tmp_path):
    seen = []
    texture = run_texture(_texture_config(if_like_model), tmp_path / "texture", inputs={"uv": uv_dir}, identity="t1",
                          callback=lambda step, metrics: seen.append((step, metrics["loss"])))
    assert [s for s, _ in seen] == list(range(1, 7)) and all(np.isfinite(loss) for _, loss in seen)
    edit = run_edit(_edit_config(if_like_model), tmp_path / "edit", inputs={"texture": tmp_path / "texture"})

    source = read_textured_mesh(uv_dir)
    for result, directory in ((texture, tmp_path / "texture"), (edit, tmp_path / "edit")):
        assert completed(directory) is not None
        for name in ("mesh", "material", "texture", "glb", "config", "history"):
            assert result.path(name).stat().st_size > 0, name
        for name in result.previews:
            assert (directory / name).stat().st_size > 100
        assert (directory / MESH_OBJ).read_bytes() == (uv_dir / MESH_OBJ).read_bytes(), "geometry byte-identical"
        mesh = read_textured_mesh(directory)
        assert np.array_equal(mesh.vertices, source.vertices) and np.array_equal(mesh.uvs, source.uvs)
        assert mesh.texture.shape == source.texture.shape
        assert set(result.timings) >= {"raster_per_step", "texture_per_step", "guidance_per_step", "optimizer_per_step", "total"}
        assert not (directory / "checkpoint.pt").exists()
    textured = read_textured_mesh(tmp_path / "texture").texture
    edited = read_textured_mesh(tmp_path / "edit").texture
    assert texture.metrics["texture_change"] > 0.005 and np.abs(textured.astype(int) - GREY).max() > 10, "texture changed"
    assert edit.metrics["texture_change"] > 0.005 and not np.array_equal(edited, textured), "edit changed it again"
    assert texture.identity == "t1"

    import trimesh

    glb = trimesh.load(tmp_path / "edit" / "asset.glb", force="mesh")
    assert len(glb.faces) == len(source.faces)


def test_crash_resume_matches_uninterrupted_run(if_like_model, uv_dir, tmp_path):
    config = _texture_config(if_like_model)
    run_texture(config, tmp_path / "reference", inputs={"uv": uv_dir})
    reference = json.loads((tmp_path / "reference" / "history.json").read_text())

    class Crash(RuntimeError):
        pass

    def crash_at_5(step, metrics):
        if step == 5:
            raise Crash

    target = tmp_path / "asset" / "texture"
    with pytest.raises(Crash):
        run_texture(config, target, inputs={"uv": uv_dir}, callback=crash_at_5)
    assert not target.exists() and (tmp_path / "asset" / "texture.partial" / "checkpoint.pt").exists()
    seen = []
    result = run_texture(config, target, inputs={"uv": uv_dir}, callback=lambda step, metrics: seen.append(step))
    assert seen == [4, 5, 6] and result.metrics["resumed_at"] == 3
    history = json.loads((target / "history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference], rel=1e-5)
    assert np.array_equal(read_textured_mesh(target).texture, read_textured_mesh(tmp_path / "reference").texture)


def test_edit_guidance_is_target_minus_lambda_source():
    config = EditConfig(prompt="a blue cube", source_prompt="a red cube", negative_weight=0.3)
    guidance = edit_guidance(config)
    assert isinstance(guidance, GuidanceConfig)
    assert guidance.at(0)["prompt_scale"] == 1.0
    assert guidance.at(0)["negative_scale"] == pytest.approx(-0.3) and guidance.at(0)["null_scale"] == pytest.approx(-0.7)
    scheduled = edit_guidance(EditConfig(prompt="a", source_prompt="b", negative_weight=[0, 0.0, 1.0, 100]))
    assert scheduled.at(50)["negative_scale"] == pytest.approx(-0.5) and scheduled.at(50)["null_scale"] == pytest.approx(-0.5)
    assert scheduled.at(100)["null_scale"] == 0.0, "λ = 1: the empty prompt drops out, target minus source"
    with pytest.raises(ValueError, match="set by negative_weight"):
        edit_guidance(EditConfig(prompt="a", source_prompt="b", guidance={"null_scale": -1.0}))


def test_bad_configs_and_inputs_are_rejected_before_work(if_like_model, uv_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown shading mode.*valid: albedo, diffuse"):
        run_texture(_texture_config(if_like_model, shading_probs={"textureless": 1.0}), tmp_path / "t", inputs={"uv": uv_dir})
    with pytest.raises(ValueError, match="TextureConfig.evaluator: 'clip' is not one of none, toy"):
        run_texture(_texture_config(if_like_model, evaluator="clip"), tmp_path / "t", inputs={"uv": uv_dir})
    with pytest.raises(ConfigError, match="TextureConfig.renderer.rasterizer: 'opengl' is not one of cpu, nvdiffrast, auto"):
        _texture_config(if_like_model, **{"renderer.rasterizer": "opengl"})
    with pytest.raises(ValueError, match="needs a textured-mesh directory as input 'uv'; given: mesh"):
        run_texture(_texture_config(if_like_model), tmp_path / "t", inputs={"mesh": uv_dir})
    with pytest.raises(ValueError, match="EditConfig.source_prompt: '' is empty; it is the negative prompt"):
        run_edit(_edit_config(if_like_model, source_prompt=""), tmp_path / "e", inputs={"texture": uv_dir})
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()


def test_texture_image_sampling_agrees_with_the_composed_image():
    from csd.raster import get_rasterizer

    initial = torch.randint(0, 256, (8, 12, 3)).float() / 255
    texture = TextureImage(initial, levels=3)
    assert torch.equal((texture().detach() * 255).round(), initial * 255), "untouched: the uint8 texture comes back"
    with torch.no_grad():
        for residual in texture.residuals:
            residual.normal_()
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(12), indexing="ij")
    centres = torch.stack([(cols + 0.5) / 12, 1 - (rows + 0.5) / 8], -1)[None]  # (1, 8, 12, 2)
    rasterizer = get_rasterizer("cpu")
    sampled = texture.sample(lambda image: rasterizer.texture(image, centres))[0]
    assert torch.allclose(sampled, texture(), atol=1e-5), "lookups at texel centres equal the exported texels"


def test_toy_preset_trains_on_lit_views_from_above_and_below(if_like_model):
    """The toy prior only ever saw lit images (`csd.toy.world` shades every render ambient + lambert):
    unlit views ask it for shade the albedo then bakes in as dark blotches. A user mesh's underside
    must face some of the cameras, or it keeps the grey `uv` gave it."""
    from csd.cameras import sample_cameras

    for config in (_texture_config(if_like_model), _edit_config(if_like_model)):
        assert {mode for mode, p in config.shading_probs.items() if p > 0} == {"diffuse"}
        cameras = sample_cameras(2000, config.cameras, torch.Generator().manual_seed(0))
        assert float((cameras.elevation < -30).float().mean()) > 0.1, "views from well below"
        assert float((cameras.elevation > 30).float().mean()) > 0.1, "and from well above"


def test_coarse_levels_colour_faces_no_camera_sees(if_like_model, tmp_path):
    """With the preset's texture levels (down to 1×1) the colour every view asks for reaches a face
    that no view shows: here the bottom of a box seen only from 30-45° above, on a 256² texture
    like the `uv` stage's (4 levels stop at 32², cells of 8 texels that the bottom's chart keeps
    to itself, and its middle stays grey)."""
    import trimesh
    import xatlas

    box = trimesh.creation.box((0.9, 0.9, 0.9))
    mapping, faces, uvs = xatlas.parametrize(box.vertices, box.faces)
    vertices = box.vertices[mapping]
    (tmp_path / "uv").mkdir()
    write_textured_mesh(TexturedMesh(vertices, faces, uvs, np.full((256, 256, 3), GREY, np.uint8)), tmp_path / "uv")
    config = _texture_config(if_like_model, **{"cameras.elevation_range": (30.0, 45.0)})
    run_texture(config, tmp_path / "texture", inputs={"uv": tmp_path / "uv"})
    texture = read_textured_mesh(tmp_path / "texture").texture.astype(int)

    normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])

    def middle_texels(selected):  # the texel under each selected face's centroid
        centre = uvs[faces[selected]].mean(1)
        return texture[((1 - centre[:, 1]) * 256).astype(int), (centre[:, 0] * 256).astype(int)]

    top, bottom = middle_texels(normals[:, 2] > 0.5), middle_texels(normals[:, 2] < -0.5)
    assert np.abs(top - GREY).max() > 10, "the seen top changed"
    assert np.abs(bottom - GREY).max() > 5, "the unseen bottom changed with it"
