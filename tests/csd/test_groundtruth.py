"""Ground-truth shape and colour scores on analytic cases (csd.toy.groundtruth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.measure import marching_cubes

from csd.toy import groundtruth as gt
from csd.toy.world import COLOURS, QUALITY_TAGS, degrade


def _sdf_mesh(sdf, resolution: int = 72) -> tuple[np.ndarray, np.ndarray]:
    """Outward-facing marching-cubes mesh of `sdf` (points (N, 3) → (N,) distances) on [-1, 1]³."""
    axis = np.linspace(-1, 1, resolution)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    values = sdf(torch.from_numpy(points).float()).numpy().reshape((resolution,) * 3)
    vertices, faces, _, _ = marching_cubes(np.pad(values, 1, constant_values=1.0), 0.0)
    return (vertices - 1) * (2 / (resolution - 1)) - 1, faces[:, ::-1].copy()


def _primitive(shape: str, radius: float, yaw: float = 0.0, centre=(0.0, 0.0, 0.0)):
    return lambda p: gt.primitive_sdf(shape, torch.tensor([radius]), torch.tensor([yaw]), torch.tensor([centre]), p)[0]


class _SdfField:
    """A field whose density is a steep sigmoid of an SDF (level 25 is the surface) and constant albedo."""

    bound = 1.0

    def __init__(self, sdf, albedo=(0.5, 0.5, 0.5)):
        self.sdf, self.colour = sdf, torch.tensor(albedo)

    def density(self, points):
        return 50.0 * torch.sigmoid(-self.sdf(points) / 0.01)

    def albedo(self, points):
        return self.colour.expand(len(points), 3)


@pytest.mark.parametrize(
    "shape, radius, yaw, centre",
    [
        ("sphere", 0.5, 0.0, (0.05, -0.03, 0.02)),
        ("cube", 0.6, 0.5, (0.05, -0.03, 0.02)),
        ("cube", 0.45, 1.2, (0.0, 0.04, -0.05)),
        ("cone", 0.55, 0.0, (0.05, -0.03, 0.02)),
        ("torus", 0.65, 0.3, (0.05, -0.03, 0.02)),
        ("torus", 0.45, 0.0, (0.0, 0.0, 0.0)),
    ],
)
def test_world_primitives_score_their_own_class(shape, radius, yaw, centre):
    vertices, faces = _sdf_mesh(_primitive(shape, radius, yaw, centre))
    score = gt.score_mesh_shape(vertices, faces, shape)
    assert score.best_shape == shape
    assert score.shape_iou >= 0.97
    assert score.shape_margin >= 0.2  # measured 0.26–0.64: the other primitives are far off
    assert score.fits[shape].radius == pytest.approx(radius, abs=0.03)


def test_field_occupancy_scores_like_the_mesh():
    field = _SdfField(_primitive("cone", 0.6, 0.0, (0.0, 0.05, 0.0)))
    score = gt.score_field_shape(field, 25.0, "cone")
    assert score.best_shape == "cone" and score.shape_iou >= 0.97
    assert gt.score_field_shape(field, 25.0, "sphere").shape_margin < -0.3  # prompted sphere, got a cone


def _scaled_cube(p):
    return _primitive("cube", 0.65)(p / torch.tensor([1.0, 1.0, 0.7]))


def _bumpy_sphere(p):
    return torch.minimum(_primitive("sphere", 0.55)(p), _primitive("sphere", 0.3, centre=(0.6, 0.0, 0.0))(p))


def _two_spheres(p):
    return torch.minimum(_primitive("sphere", 0.3, centre=(0.5, 0, 0))(p), _primitive("sphere", 0.3, centre=(-0.5, 0, 0))(p))


@pytest.mark.parametrize(
    "sdf, prompted, most",  # measured IoU: 0.77, 0.90, 0.16
    [(_scaled_cube, "cube", 0.82), (_bumpy_sphere, "sphere", 0.93), (_two_spheres, "sphere", 0.3)],
)
def test_non_primitives_score_clearly_below(sdf, prompted, most):
    vertices, faces = _sdf_mesh(sdf)
    score = gt.score_mesh_shape(vertices, faces, prompted)
    assert score.shape_iou < most
    assert score.shape_iou < 0.97 - 0.04


def test_two_spheres_fit_no_primitive_and_not_the_prompted_one():
    vertices, faces = _sdf_mesh(_two_spheres)
    score = gt.score_mesh_shape(vertices, faces, "sphere")
    assert score.shape_margin < 0 and score.best_shape != "sphere"
    assert max(fit.iou for fit in score.fits.values()) < 0.4


def test_mesh_with_holes_still_scores_as_closed():
    vertices, faces = _sdf_mesh(_primitive("cube", 0.6, 0.3))
    keep = np.random.default_rng(0).random(len(faces)) > 0.05  # 5 % of the faces missing
    closed = gt.mesh_occupancy(vertices, faces)
    holey = gt.mesh_occupancy(vertices, faces[keep])
    assert (closed != holey).float().mean() < 0.002
    assert gt.score_mesh_shape(vertices, faces[keep], "cube").shape_iou >= 0.97


def test_empty_mesh_scores_zero():
    vertices, faces = _sdf_mesh(_primitive("sphere", 0.5))
    score = gt.score_mesh_shape(vertices, faces[:0], "sphere")
    assert score.shape_iou == 0.0 and score.occupied == 0


# --- colour ---------------------------------------------------------------------------------


def _textured_sphere(colour, unused=(0.0, 1.0, 1.0)):
    """A sphere whose UVs use the middle of a 64² texture (painted `colour`), the rest `unused`."""
    vertices, faces = _sdf_mesh(_primitive("sphere", 0.5), resolution=32)
    uvs = 0.3 + 0.4 * (vertices[:, :2] * 0.5 / 0.5 + 1) / 2  # in [0.3, 0.7]
    texture = np.empty((64, 64, 3), dtype=np.uint8)
    texture[:] = (np.array(unused) * 255).round()
    texture[14:50, 14:50] = (np.clip(np.array(colour), 0, 1) * 255).round()
    return vertices, faces, uvs, texture


def _colour_error(colour, prompted="red"):
    vertices, faces, uvs, texture = _textured_sphere(colour)
    return gt.score_colours(gt.textured_surface_colours(vertices, faces, uvs, texture), prompted)


def test_palette_colour_scores_near_zero_and_unused_texels_do_not_count():
    score = _colour_error(COLOURS["red"])
    assert score.colour_error < 0.005 and score.colour_spread < 0.005
    assert score.nearest_colour == "red"
    assert _colour_error(COLOURS["red"], "blue").colour_error > 0.4


@pytest.mark.parametrize("defect", ["darkened", "washed out", "oversaturated"])
def test_colour_defects_raise_the_error(defect):
    base = torch.tensor(COLOURS["green"])  # orange is already saturated: oversaturating it mostly clamps
    if defect == "darkened":
        colour = base * 0.6
    elif defect == "washed out":
        colour = 0.55 * base + 0.45
    else:  # the world's own "oversaturated color" degradation
        kind = torch.tensor([QUALITY_TAGS.index("oversaturated color")])
        colour = degrade(base.view(1, 3, 1, 1), kind, torch.Generator().manual_seed(0)).view(3)
    clean = _colour_error(COLOURS["green"], "green").colour_error
    error = _colour_error(colour.tolist(), "green").colour_error
    assert error > clean + 0.05, (defect, error)


def test_two_tone_surface_has_spread():
    vertices, faces, uvs, _ = _textured_sphere(COLOURS["red"])
    texture = np.zeros((64, 64, 3), dtype=np.uint8)
    texture[:, :32] = (np.array(COLOURS["red"]) * 255).round()
    texture[:, 32:] = (np.array(COLOURS["blue"]) * 255).round()
    score = gt.score_colours(gt.textured_surface_colours(vertices, faces, uvs, texture), "red")
    # half red, half blue: the mean is purple-ish, each sample half the red-blue distance from it
    half = np.linalg.norm(np.array(COLOURS["red"]) - np.array(COLOURS["blue"])) / 2 / np.sqrt(3)
    assert score.colour_spread == pytest.approx(half, rel=0.15)
    assert score.colour_error > 0.15


def test_hueless_fraction_is_the_grey_share_of_the_surface():
    vertices, faces, uvs, _ = _textured_sphere(COLOURS["red"])
    grey, red = np.full(3, 128, np.uint8), (np.array(COLOURS["red"]) * 255).round().astype(np.uint8)

    def hueless(left, right):
        texture = np.zeros((64, 64, 3), dtype=np.uint8)
        texture[:, :32], texture[:, 32:] = left, right
        return gt.score_colours(gt.textured_surface_colours(vertices, faces, uvs, texture), "red").hueless_fraction

    assert hueless(grey, grey) == 1.0
    assert hueless(red, red) == 0.0
    # the texture's halves cover the two halves of the sphere (x < 0, x > 0): equal areas; the bilinear
    # lookup blends the half-texel strip beside the split (about 2 % of the surface) towards red
    assert hueless(grey, red) == pytest.approx(0.5, abs=0.035)
    # every palette colour, jittered as the world draws albedos, has a hue; a dark blotch of it has none
    rng = np.random.default_rng(0)
    for colour in COLOURS.values():
        jittered = np.clip(np.array(colour) + 0.05 * rng.standard_normal((2000, 3)), 0, 1)
        assert gt.score_colours(jittered, "red").hueless_fraction == 0.0
        assert gt.score_colours(np.array([colour]) * 0.2, "red").hueless_fraction == 1.0


def test_field_surface_colour():
    field = _SdfField(_primitive("sphere", 0.5), albedo=COLOURS["green"])
    score = gt.score_colours(gt.field_surface_colours(field, 25.0, count=2000, resolution=48), "green")
    assert score.colour_error < 1e-4 and score.nearest_colour == "green"


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="palette"):
        gt.score_colours(np.zeros((3, 3)), "teal")
    with pytest.raises(ValueError, match="shapes"):
        gt.score_occupancy(torch.zeros(8, dtype=torch.bool), "vase", gt.grid_points(2))
