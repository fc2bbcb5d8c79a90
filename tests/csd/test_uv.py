"""xatlas unwrap, UV rasterization and albedo baking on small meshes and analytic albedo fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from csd.texture import fill_seams
from csd.uv import UnwrapConfig, bake_albedo, bake_vertex_colors, interpolate, rasterize_uv, sample_texture, unwrap

RED, BLUE = np.array([255, 0, 0]), np.array([0, 0, 255])


class RedBlueField:
    """Albedo red where x > 0, blue where x < 0."""

    bound = 1.0

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(points))

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        red = (points[:, :1] > 0).float()
        return torch.cat([red, torch.zeros_like(red), 1 - red], dim=-1)


@pytest.fixture(scope="module")
def sphere_atlas():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)  # 5120 faces
    return unwrap(sphere.vertices, sphere.faces, UnwrapConfig(resolution=256))


def test_unwrap_keeps_the_surface_and_puts_uvs_in_the_unit_square(sphere_atlas):
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    atlas = sphere_atlas
    assert atlas.uvs.min() >= 0.0 and atlas.uvs.max() <= 1.0
    assert len(atlas.faces) == len(sphere.faces) and atlas.charts > 1
    # split vertices are copies of input vertices, and faces still describe the same triangles
    np.testing.assert_array_equal(atlas.vertices, sphere.vertices[atlas.vertex_map].astype(np.float32))
    np.testing.assert_allclose(atlas.vertices[atlas.faces], sphere.vertices[sphere.faces], atol=1e-6)
    # the atlas fits the texture and is scaled to fill it along its longer side
    assert atlas.atlas_size <= 256
    assert atlas.uvs.max(0).max() > 1 - 4 / 256


def test_charts_do_not_overlap_in_texture_space(sphere_atlas):
    atlas, resolution = sphere_atlas, 256
    coverage = np.zeros((resolution, resolution), dtype=np.int64)
    for chart in range(atlas.charts):
        coverage += rasterize_uv(atlas.uvs, atlas.faces[atlas.chart_index == chart], resolution).mask
    assert coverage.max() == 1
    # no face is folded over inside its chart either: a chart's UV triangles all wind the same way
    # (xatlas may mirror a whole chart)
    a, b, c = (atlas.uvs[atlas.faces[:, i]].astype(np.float64) for i in range(3))
    positive = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]) > 0
    for chart in range(atlas.charts):
        assert len(np.unique(positive[atlas.chart_index == chart])) == 1


def test_rasterize_uv_follows_the_texture_convention():
    uvs = np.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]])
    faces = np.array([[0, 1, 2]])
    resolution = 64
    raster = rasterize_uv(uvs, faces, resolution)
    # covered texels ≈ triangle area in texels (± one texel along the perimeter)
    area, perimeter = 0.5 * 0.8 * 0.8 * resolution**2, (1.6 + 0.8 * np.sqrt(2)) * resolution
    assert abs(raster.mask.sum() - area) < perimeter
    # interpolating UVs at the covered texels gives back their centres: row 0 is v = 1
    rows, cols = np.nonzero(raster.mask)
    expected = np.stack([(cols + 0.5) / resolution, 1 - (rows + 0.5) / resolution], axis=-1)
    np.testing.assert_allclose(interpolate(raster, faces, uvs), expected, atol=1e-6)
    # the lower-left corner of the triangle (small u, small v) lands in the bottom-left texels
    assert raster.mask[-8, 8] and not raster.mask[8, -8]


def test_baked_albedo_is_red_on_x_positive_and_blue_on_x_negative(sphere_atlas):
    atlas = sphere_atlas
    raster = rasterize_uv(atlas.uvs, atlas.faces, 256)
    texture = bake_albedo(RedBlueField(), atlas, raster, chunk_size=10_000)

    # inpainting copied chart colours everywhere: no black background left to bleed
    is_red, is_blue = (texture == RED).all(-1), (texture == BLUE).all(-1)
    assert (is_red | is_blue).all()

    x = atlas.vertices[atlas.faces][..., 0]
    away_from_boundary = (x > 0).all(1) | (x < 0).all(1)
    colours = sample_texture(texture, atlas.uvs[atlas.faces].mean(1))
    correct = np.where(x.mean(1) > 0, colours[:, 0] > 200, colours[:, 2] > 200)
    assert away_from_boundary.sum() > 0.9 * len(atlas.faces)
    assert correct[away_from_boundary].mean() >= 0.99


def test_vertex_colours_are_baked_through_the_seam_split(sphere_atlas):
    atlas = sphere_atlas
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    colors = np.where(sphere.vertices[:, 2:3] > 0, [0.0, 1.0, 0.0], [1.0, 1.0, 0.0])  # green top, yellow bottom
    texture = bake_vertex_colors(atlas, colors, rasterize_uv(atlas.uvs, atlas.faces, 256))
    z = atlas.vertices[atlas.faces][..., 2]
    top, bottom = (z > 0).all(1), (z < 0).all(1)
    colours = sample_texture(texture, atlas.uvs[atlas.faces].mean(1))
    assert (colours[top, 0] < 5).all() and (colours[top, 1] > 250).all()
    assert (colours[bottom, 0] > 250).all() and (colours[bottom, 1] > 250).all()


def test_fill_seams_copies_the_nearest_covered_texel_within_the_rings():
    image = np.zeros((5, 5, 3))
    mask = np.zeros((5, 5), dtype=bool)
    image[1, 1], mask[1, 1] = [1.0, 0.0, 0.0], True
    image[3, 4], mask[3, 4] = [0.0, 0.0, 1.0], True
    filled = fill_seams(image, mask)
    np.testing.assert_array_equal(filled[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(filled[4, 4], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(filled[mask], image[mask])
    # one ring: the neighbours of the charts are filled, texels two or more texels away keep their values
    image[~mask] = 0.5
    ring = fill_seams(image, mask, rings=1)
    np.testing.assert_array_equal(ring[1, 2], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(ring[2, 4], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(ring[4, 0], [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(ring[0, 0], [0.5, 0.5, 0.5])  # diagonal: √2 texels away


def test_sample_texture_is_bilinear_between_texel_centres():
    texture = np.array([[[0.0], [10.0]], [[20.0], [30.0]]])  # row 0 is the top (v = 1)
    centres = np.array([[0.25, 0.75], [0.75, 0.75], [0.25, 0.25], [0.5, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(sample_texture(texture, centres)[:, 0], [0.0, 10.0, 20.0, 15.0, 0.0])


def test_unwrap_rejects_bad_options_naming_them():
    box = trimesh.creation.box()
    with pytest.raises(ValueError, match=r"UnwrapConfig.resolution: 4 must be >= 16"):
        unwrap(box.vertices, box.faces, UnwrapConfig(resolution=4))


class ShellField:
    """A dense core (σ `core_density` inside radius `core`) with albedo `inside`, wrapped out to radius
    `outer` in a layer of σ `shell_density` and albedo `outside`."""

    bound = 1.0

    def __init__(self, core: float, outer: float, core_density: float, shell_density: float, inside, outside):
        self.core, self.outer, self.core_density, self.shell_density = core, outer, core_density, shell_density
        self.inside, self.outside = torch.tensor(inside, dtype=torch.float32), torch.tensor(outside, dtype=torch.float32)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        radius = points.norm(dim=-1)
        return torch.where(radius < self.core, self.core_density, torch.where(radius < self.outer, self.shell_density, 0.0))

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return torch.where((points.norm(dim=-1) < self.core)[:, None], self.inside, self.outside)


def _mean_baked_colour(field, atlas, **bake) -> np.ndarray:
    raster = rasterize_uv(atlas.uvs, atlas.faces, 256)
    return sample_texture(bake_albedo(field, atlas, raster, chunk_size=10_000, **bake), atlas.uvs[atlas.faces].mean(1)).mean(0)


def test_the_composited_bake_shows_what_a_view_onto_the_surface_sees(sphere_atlas):
    # the toy nerf's spheres: the mesh (r = 0.5) is cut in a thin, nearly transparent black shell
    # (optical depth 0.1 · 0.2 = 0.02) around a dense blue core (r < 0.47)
    hazy = ShellField(0.47, 0.6, 60.0, 0.2, inside=[0.0, 0.2, 0.9], outside=[0.0, 0.0, 0.0])
    np.testing.assert_allclose(_mean_baked_colour(hazy, sphere_atlas), [0, 0, 0], atol=1)  # the albedo at the surface
    composited = _mean_baked_colour(hazy, sphere_atlas, depth=0.1, samples=32)
    np.testing.assert_allclose(composited, [0, 0.2 * 255, 0.9 * 255], atol=0.05 * 255)
    # an opaque red skin just outside the surface (0.5 < r < 0.55) hides the blue core: a view from
    # outside sees red (composited outside → inside, along the outward normal)
    skin = ShellField(0.5, 0.55, 60.0, 200.0, inside=[0.0, 0.0, 1.0], outside=[1.0, 0.0, 0.0])
    np.testing.assert_allclose(_mean_baked_colour(skin, sphere_atlas, depth=0.1, samples=32), [255, 0, 0], atol=0.05 * 255)
    # where the whole segment is transparent, the bake keeps the albedo at the point
    x = sphere_atlas.vertices[sphere_atlas.faces][..., 0].mean(1)
    raster = rasterize_uv(sphere_atlas.uvs, sphere_atlas.faces, 256)
    colours = sample_texture(bake_albedo(RedBlueField(), sphere_atlas, raster, chunk_size=10_000, depth=0.1),
                             sphere_atlas.uvs[sphere_atlas.faces].mean(1))
    assert (np.where(x > 0.05, colours[:, 0], colours[:, 2])[np.abs(x) > 0.05] > 250).mean() > 0.99
