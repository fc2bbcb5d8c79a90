"""Stages `mesh` and `uv` end to end on a saved implicit volume and on user meshes (no diffusion model)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import trimesh
import yaml

from csd.fields import FieldConfig, ImplicitVolume, load_field, save_field
from csd.mesh import CleanupConfig, EmptyIsosurfaceError, ExtractionConfig
from csd.uv import UnwrapConfig, sample_texture
from stages import mesh as mesh_stage
from stages import uv as uv_stage
from stages.assets import TEXTURED_OUTPUTS, Z_UP_TO_Y_UP, read_textured_mesh
from stages.config import build_config, load_preset

SMALL_MESH = mesh_stage.MeshConfig(
    extraction=ExtractionConfig(resolution=48, coarse_resolution=32, threshold="auto"),
    cleanup=CleanupConfig(target_faces=800),
    preview_views=2,
    preview_resolution=32,
)
SMALL_UV = uv_stage.UVConfig(unwrap=UnwrapConfig(resolution=64), preview_views=2, preview_resolution=32)


@pytest.fixture(scope="module")
def nerf_dir(tmp_path_factory):
    """What the nerf stage leaves for `mesh`/`uv`: a toy-sized implicit volume (blob-biased) saved to disk."""
    directory = tmp_path_factory.mktemp("nerf")
    torch.manual_seed(0)
    save_field(ImplicitVolume(FieldConfig(n_levels=4, log2_hashmap_size=12, max_resolution=32, hidden_dim=16)), directory)
    return directory


@pytest.fixture(scope="module")
def mesh_result(nerf_dir, tmp_path_factory):
    return mesh_stage.run(SMALL_MESH, tmp_path_factory.mktemp("asset") / "mesh", inputs={"nerf": nerf_dir}, identity="mesh-id")


def test_mesh_stage_commits_a_closed_mesh_with_stats(mesh_result):
    assert mesh_result.identity == "mesh-id"
    mesh = trimesh.load(mesh_result.path("mesh"), process=False)
    stats = json.loads(mesh_result.path("stats").read_text())
    assert mesh.is_watertight and len(mesh.faces) == stats["faces"] == 800
    assert stats["components"] == 1 and stats["euler_characteristic"] == 2 and mesh.volume > 0
    assert stats["area"] == pytest.approx(mesh.area, rel=1e-4)
    # the blob sits inside the field's bounding sphere
    assert 0.1 < np.linalg.norm(mesh.vertices, axis=1).max() < 1.0
    assert 0 < stats["threshold"] < stats["density_range"][1]
    for step in ("coarse_sampling", "fine_sampling", "marching_cubes", "remesh", "decimate", "previews", "total"):
        assert stats["timings"][step] >= 0
    assert yaml.safe_load(mesh_result.path("config").read_text())["extraction"]["threshold"] == "auto"
    assert all((mesh_result.path("mesh").parent / name).stat().st_size > 0 for name in mesh_result.previews)
    assert mesh_result.metrics["watertight"] == 1.0


def test_uv_stage_bakes_the_field_and_writes_a_glb_that_round_trips(mesh_result, nerf_dir, tmp_path):
    inputs = {"mesh": mesh_result.path("mesh").parent, "nerf": nerf_dir}
    result = uv_stage.run(dataclasses.replace(SMALL_UV, bake_depth=0.0), tmp_path / "uv", inputs=inputs)
    assert set(TEXTURED_OUTPUTS) <= set(result.outputs)
    textured = read_textured_mesh(tmp_path / "uv")
    assert textured.texture.shape == (64, 64, 3)
    assert textured.uvs.min() >= 0 and textured.uvs.max() <= 1
    stats = json.loads(result.path("stats").read_text())
    assert stats["texture_source"] == "field" and stats["charts"] >= 1 and stats["faces"] == 800

    # the texture holds the field's albedo at the surface: compare at face centroids
    field = load_field(nerf_dir)
    centroids = torch.from_numpy(textured.vertices[textured.faces].mean(1))
    with torch.no_grad():
        expected = field.albedo(centroids).numpy() * 255
    sampled = sample_texture(textured.texture, textured.uvs[textured.faces].mean(1))
    assert np.median(np.abs(sampled - expected)) < 3.0

    scene = trimesh.load(result.path("glb"))
    (glb,) = scene.geometry.values()
    np.testing.assert_array_equal(np.asarray(glb.visual.material.baseColorTexture.convert("RGB")), textured.texture)
    np.testing.assert_allclose(glb.visual.uv, textured.uvs, atol=1e-6)
    y_up = trimesh.transform_points(textured.vertices, Z_UP_TO_Y_UP)
    np.testing.assert_allclose(glb.vertices, y_up, atol=1e-5)


class _DarkSkinned:
    """A saved field made transparent and black where its density is below 1.2 × `level` (the mesh's surface
    is at `level`), and dense and white deeper in: a view onto the surface sees white."""

    def __init__(self, field, level: float):
        self.field, self.level, self.bound = field, level, field.bound

    def density(self, points):
        return 100.0 * (self.field.density(points) >= 1.2 * self.level).float()

    def albedo(self, points):
        return (self.field.density(points) >= 1.2 * self.level).float()[:, None].expand(-1, 3)


def test_the_uv_stage_bakes_at_its_bake_depth(mesh_result, nerf_dir, tmp_path, monkeypatch):
    level = json.loads(mesh_result.path("stats").read_text())["threshold"]
    monkeypatch.setattr(uv_stage, "load_field", lambda directory, device: _DarkSkinned(load_field(directory, device), level))
    inputs = {"mesh": mesh_result.path("mesh").parent, "nerf": nerf_dir}
    surface, composited = (read_textured_mesh(uv_stage.run(dataclasses.replace(SMALL_UV, bake_depth=depth), tmp_path / f"uv-{depth}",
                                                           inputs=inputs).path("glb").parent) for depth in (0.0, 0.1))
    assert np.median(surface.texture) == 0 and np.median(composited.texture) > 200


def test_empty_isosurface_raises_and_commits_nothing(nerf_dir, tmp_path):
    config = mesh_stage.MeshConfig(extraction=ExtractionConfig(resolution=32, coarse_resolution=16, threshold=1e6))
    with pytest.raises(EmptyIsosurfaceError, match=r"threshold 1e\+06 is above the field's density everywhere \(range \[0"):
        mesh_stage.run(config, tmp_path / "mesh", inputs={"nerf": nerf_dir})
    assert not (tmp_path / "mesh").exists()


def test_user_glb_is_turned_z_up_normalised_and_textured_from_its_vertex_colours(tmp_path):
    # a box 4 tall along glTF's y (= our z), off-centre, red on top and blue below
    box = trimesh.creation.box(extents=(1.0, 4.0, 2.0))
    box = box.subdivide().subdivide()
    box.apply_translation((3.0, 5.0, -2.0))
    top = box.vertices[:, 1] > 5.0
    box.visual.vertex_colors = np.where(top[:, None], [255, 0, 0, 255], [0, 0, 255, 255]).astype(np.uint8)
    box.export(tmp_path / "user.glb")

    result = mesh_stage.run(SMALL_MESH, tmp_path / "mesh", inputs={"user_mesh": tmp_path / "user.glb"})
    mesh = trimesh.load(result.path("mesh"), process=False)
    stats = json.loads(result.path("stats").read_text())
    assert np.linalg.norm(mesh.vertices, axis=1).max() == pytest.approx(SMALL_MESH.user_mesh_radius, rel=1e-5)
    extent = mesh.vertices.max(0) - mesh.vertices.min(0)
    assert extent.argmax() == 2  # glTF y-up became our z-up
    assert stats["normalization"]["scale"] * 4.0 == pytest.approx(extent[2], rel=1e-5)
    assert len(mesh.faces) == len(box.faces)  # a user mesh is repaired, not remeshed

    uv = uv_stage.run(SMALL_UV, tmp_path / "uv", inputs={"mesh": tmp_path / "mesh"})
    assert json.loads(uv.path("stats").read_text())["texture_source"] == "vertex_colors"
    textured = read_textured_mesh(tmp_path / "uv")
    z = textured.vertices[textured.faces][..., 2]
    colours = sample_texture(textured.texture, textured.uvs[textured.faces].mean(1))
    upper, lower = (z > 0).all(1), (z < 0).all(1)
    assert (colours[upper, 0] > 200).mean() > 0.99 and (colours[lower, 2] > 200).mean() > 0.99

    # previews through the textured stages' MeshRenderer: grey shading for the mesh, red above blue for the uv stage
    import imageio.v3 as iio

    grey = iio.imread(tmp_path / "mesh" / "turntable.png")[..., :3].astype(int)
    drawn = (grey < 250).any(-1)
    assert drawn.mean() > 0.05 and (np.ptp(grey[drawn], axis=-1) <= 1).all(), "the untextured mesh renders grey"
    assert np.ptp(grey[drawn][:, 0]) > 40, "diffuse shading: faces turned from the light are darker"
    sheet = iio.imread(tmp_path / "uv" / "turntable.png")[..., :3].astype(int)
    red = (sheet[..., 0] > 180) & (sheet[..., 2] < 80)
    blue = (sheet[..., 2] > 180) & (sheet[..., 0] < 80)
    assert red.sum() > 500 and blue.sum() > 500 and np.nonzero(red)[0].mean() < np.nonzero(blue)[0].mean()


def test_uv_stage_without_field_or_colours_gives_a_grey_texture(tmp_path):
    trimesh.creation.icosphere(subdivisions=2).export(tmp_path / "ball.obj")
    mesh_stage.run(SMALL_MESH, tmp_path / "mesh", inputs={"user_mesh": tmp_path / "ball.obj"})
    uv_stage.run(SMALL_UV, tmp_path / "uv", inputs={"mesh": tmp_path / "mesh"})
    assert (read_textured_mesh(tmp_path / "uv").texture == 128).all()


def test_stage_inputs_and_options_are_checked_by_name(tmp_path, nerf_dir):
    with pytest.raises(ValueError, match="exactly one input"):
        mesh_stage.run(SMALL_MESH, tmp_path / "mesh", inputs={"nerf": nerf_dir, "user_mesh": nerf_dir})
    with pytest.raises(FileNotFoundError, match="not a completed mesh stage"):
        uv_stage.run(SMALL_UV, tmp_path / "uv", inputs={"mesh": tmp_path / "missing"})
    with pytest.raises(ValueError, match="MeshConfig.user_mesh_up: 'x' is not one of z, y"):
        mesh_stage.MeshConfig(user_mesh_up="x")


@pytest.mark.parametrize("preset", ["toy-cpu", "if-gpu"])
def test_presets_build_valid_configs(preset):
    sections = load_preset(preset)
    mesh_config = build_config(mesh_stage.MeshConfig, sections["mesh"])
    uv_config = build_config(uv_stage.UVConfig, sections["uv"])
    expected = {"toy-cpu": (128, 5000, 256), "if-gpu": (256, 20_000, 1024)}[preset]
    assert (mesh_config.extraction.resolution, mesh_config.cleanup.target_faces, uv_config.unwrap.resolution) == expected
