"""Volume renderer against a field with a known constant-density ball."""

import math
from dataclasses import replace as dataclass_replace

import pytest
import torch

from csd.cameras import make_cameras
from csd.fields import FieldConfig, ImplicitVolume
from csd.renderer import RendererConfig, VolumeRenderer, composite, intersect_sphere

RADIUS = 0.5


class BallField:
    """Density σ inside |x| < 0.5, zero outside; red albedo; radial normals."""

    bound = 1.0

    def __init__(self, sigma):
        self.sigma = sigma

    def density(self, points):
        return torch.where(points.norm(dim=-1) < RADIUS, self.sigma, 0.0)

    def __call__(self, points):
        return self.density(points), torch.tensor([1.0, 0.0, 0.0]).expand(len(points), 3)

    def normal(self, points):
        return torch.nn.functional.normalize(points, dim=-1)

    def with_normals(self, points):
        return (*self(points), self.normal(points))


def _center_ray_camera(distance=2.0):
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return make_cameras(one(0.0), one(0.0), one(distance), one(40.0))


@pytest.mark.parametrize("occupancy_resolution", [0, 32])
@pytest.mark.parametrize("sigma", [0.5, 2.0, 5.0])
def test_opacity_through_ball_centre(sigma, occupancy_resolution):
    renderer = VolumeRenderer(RendererConfig(num_samples=256, occupancy_resolution=occupancy_resolution, background="solid"), 1.0)
    field = BallField(sigma)
    renderer.update_occupancy(field, step=0)
    out = renderer.render(field, _center_ray_camera(), 1, training=False)
    expected = 1 - math.exp(-sigma * 2 * RADIUS)
    assert float(out.opacity) == pytest.approx(expected, rel=0.01)
    if occupancy_resolution:
        assert renderer.grid.occupied.float().mean() < 0.2, "occupancy grid must skip the empty space"


@pytest.mark.parametrize("occupancy_resolution", [0, 32])
def test_depth_of_an_opaque_ball_is_its_entry_point(occupancy_resolution):
    num_samples = 256
    renderer = VolumeRenderer(RendererConfig(num_samples=num_samples, occupancy_resolution=occupancy_resolution, background="solid"), 1.0)
    field = BallField(1e5)
    renderer.update_occupancy(field, step=0)
    for distance in (1.5, 1.77, 2.0):  # different entry offsets relative to the sample grid
        out = renderer.render(
            field, _center_ray_camera(distance), 1, training=True, generator=torch.Generator().manual_seed(1), compute_depth=True
        )
        spacing = 2 * 1.0 / num_samples  # bounding sphere chord through the centre / samples
        assert float(out.opacity) == pytest.approx(1.0, abs=1e-4)
        assert abs(float(out.depth) - (distance - RADIUS)) <= spacing / 2 + 1e-5


def test_composite_matches_closed_form():
    density = torch.full((1, 10), 3.0)
    deltas = torch.full((1, 10), 0.1)
    weights, value = composite(density, torch.ones(1, 10, 1), deltas)
    assert float(weights.sum()) == pytest.approx(1 - math.exp(-3.0), rel=1e-5)
    assert float(value) == pytest.approx(1 - math.exp(-3.0), rel=1e-5)


def test_ray_sphere_intersection():
    near, far, hit = intersect_sphere(torch.tensor([[2.0, 0, 0], [2.0, 2.0, 0]]), torch.tensor([[-1.0, 0, 0], [-1.0, 0, 0]]), 1.0)
    assert hit.tolist() == [True, False]
    assert (float(near[0]), float(far[0])) == pytest.approx((1.0, 3.0))


def test_shading_modes_and_background():
    renderer = VolumeRenderer(RendererConfig(num_samples=64, occupancy_resolution=0, background="solid", background_color=(0, 0, 1)), 1.0)
    field = BallField(100.0)
    cameras = _center_ray_camera()
    albedo = renderer.render(field, cameras, 9, training=False)
    assert albedo.rgb[0, :, 4, 4].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-3)  # centre: the red ball
    assert albedo.rgb[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-3)  # corner: background
    textureless = renderer.render(field, cameras, 9, shading="textureless", training=False)
    # light at the camera, normal facing it: ambient + (1 - ambient) * 1 = 1 (grey-white)
    assert textureless.rgb[0, :, 4, 4].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.05)
    normal = renderer.render(field, cameras, 9, shading="normal", training=False)
    # the centre ray meets the ball where the normal is +x (toward the camera): colour (1, 0.5, 0.5)
    assert normal.rgb[0, :, 4, 4].tolist() == pytest.approx([1.0, 0.5, 0.5], abs=0.02)
    assert normal.rgb[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-3)
    with pytest.raises(ValueError, match="albedo, diffuse, textureless"):
        renderer.render(field, cameras, 9, shading="phong")


class InsideOutBall(BallField):
    """Normals pointing inward: every visible surface point faces away from the camera."""

    def normal(self, points):
        return -torch.nn.functional.normalize(points, dim=-1)


def test_orientation_penalty_normalised_by_opaque_rays():
    # threestudio/systems/magic3d.py loss_orient: Σ w·max(0, n·d)² / #(opacity > 0)
    field = InsideOutBall(1e4)
    cameras = _center_ray_camera()
    rays = VolumeRenderer(RendererConfig(num_samples=128, occupancy_resolution=0, background="solid"), 1.0)
    opaque = VolumeRenderer(RendererConfig(num_samples=128, occupancy_resolution=0, background="solid", orientation_reduction="opaque"), 1.0)
    by_rays = rays.render(field, cameras, 16, compute_normals=True, training=False)
    by_opaque = opaque.render(field, cameras, 16, compute_normals=True, training=False)
    n_opaque = int((by_opaque.opacity > 0).sum())
    assert 0 < n_opaque < 256, "some rays miss the ball and have opacity exactly 0"
    assert float(by_opaque.orientation) == pytest.approx(float(by_rays.orientation) * 256 / n_opaque, rel=1e-5)
    # the single centre ray meets the surface head-on: (n·d)² = 1
    centre = opaque.render(field, make_cameras(*(torch.tensor([v]) for v in (0.0, 0.0, 2.0, 1.0))), 1, compute_normals=True, training=False)
    assert float(centre.orientation) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="rays, opaque"):
        VolumeRenderer(RendererConfig(orientation_reduction="all"), 1.0)


def _blob_volume(normal_type: str, seed: int = 0) -> ImplicitVolume:
    torch.manual_seed(seed)
    config = FieldConfig(n_levels=4, log2_hashmap_size=12, base_resolution=4, max_resolution=32, hidden_dim=16, normal_type=normal_type)
    return ImplicitVolume(config)


def test_analytic_normals_of_a_sphere_density_are_radial_and_carry_gradients():
    volume = _blob_volume("analytic")
    with torch.no_grad():  # the MLP output 0: σ = softplus(10·(1 − |x|/0.5)), a radial density
        volume.mlp[-1].weight.zero_()
        volume.mlp[-1].bias.zero_()
    points = torch.nn.functional.normalize(torch.randn(200, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    points = points * torch.linspace(0.1, 0.9, 200)[:, None]
    density, albedo, normal = volume.with_normals(points)
    assert torch.allclose(normal, torch.nn.functional.normalize(points, dim=-1), atol=1e-5)
    assert torch.allclose(density, volume.density(points)) and albedo.shape == (200, 3)
    # a loss on the normals reaches the parameters (create_graph), as the orientation loss needs
    (normal[:, 0].sum()).backward()
    grad = volume.mlp[-1].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and float(grad[0].abs().sum()) > 1e-4
    with torch.no_grad():
        _, _, detached = volume.with_normals(points)
    assert not detached.requires_grad and torch.allclose(detached, normal.detach())


def test_analytic_normals_agree_with_finite_differences_on_a_trained_looking_field():
    analytic, finite = _blob_volume("analytic", seed=3), _blob_volume("finite_difference", seed=3)
    with torch.no_grad():  # a non-radial field: large random MLP output weights
        for volume in (analytic, finite):
            torch.manual_seed(4)
            volume.mlp[-1].weight.normal_(0, 2.0)
    finite = ImplicitVolume(dataclass_replace(finite.config, normal_eps=1e-3)).requires_grad_(False)
    finite.load_state_dict(analytic.state_dict())
    points = (torch.rand(300, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 1.2
    a = analytic.normal(points).detach()
    f = finite.normal(points)
    cosine = (a * f).sum(-1)
    assert float(cosine.median()) > 0.999 and float((cosine > 0.95).float().mean()) > 0.95


def test_renderer_shades_with_analytic_normals_without_gradients():
    volume = _blob_volume("analytic")
    with torch.no_grad():
        volume.mlp[-1].weight.zero_()
    renderer = VolumeRenderer(RendererConfig(num_samples=32, occupancy_resolution=0, background="solid"), 1.0)
    with torch.no_grad():
        out = renderer.render(volume, _center_ray_camera(), 9, shading="normal", training=False)
    # the blob seen head-on from +x: the centre ray's normals point back at the camera (the soft
    # blob's far side, normal −x, adds a little weight of colour 0 to the red channel)
    red, green, blue = out.rgb[0, :, 4, 4].tolist()
    assert red > 0.85 and green == pytest.approx(0.5, abs=0.01) and blue == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="finite_difference, analytic"):
        FieldConfig(normal_type="autograd")


def test_hashed_level_is_the_trilinear_blend_of_its_hashed_corners():
    from csd.fields import _PRIMES, HashGridEncoding

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(500, 3, generator=generator)
    x[:5], x[5:10] = 1.0, 0.0  # the cube's faces clamp to the last cell
    for size in (2**12, 1000):  # a power of two (masked) and not (modulo)
        table = torch.randn(size, 2, generator=generator)
        resolution = 42
        scaled = x * resolution
        corner = scaled.floor().long().clamp(0, resolution - 1)
        frac = scaled - corner
        expected = torch.zeros(500, 2)
        for offset in range(8):
            bits = torch.tensor([(offset >> 2) & 1, (offset >> 1) & 1, offset & 1])
            vertex = corner + bits
            index = ((vertex[:, 0] * _PRIMES[0]) ^ (vertex[:, 1] * _PRIMES[1]) ^ (vertex[:, 2] * _PRIMES[2])) % size
            expected += torch.where(bits.bool(), frac, 1 - frac).prod(-1, keepdim=True) * table[index]
        assert torch.allclose(HashGridEncoding._corner_lookup(x, resolution, table), expected, atol=1e-5)


@pytest.mark.parametrize("shading", ["albedo", "diffuse"])
def test_renders_without_training_in_passes_equal_one_pass(monkeypatch, shading):
    # previews march at most EVAL_SAMPLES_PER_PASS samples at a time (the if-gpu turntable peaked at
    # 65 GiB in one pass); split mid-image and mid-camera, the images, opacities, depths must not move
    import csd.renderer

    volume = _blob_volume("analytic", seed=3)
    renderer = VolumeRenderer(RendererConfig(num_samples=16, occupancy_resolution=16, background="solid"), 1.0)
    renderer.update_occupancy(volume, 0, torch.Generator().manual_seed(0))
    cameras = make_cameras(torch.tensor([10.0, -20.0, 30.0]), torch.tensor([0.0, 100.0, 230.0]), torch.full((3,), 2.0), torch.full((3,), 40.0))
    cameras.light_position = torch.tensor([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0], [0.0, -3.0, 0.0]])  # one light each
    with torch.no_grad():
        whole = renderer.render(volume, cameras, 12, shading=shading, training=False, compute_depth=True)
        monkeypatch.setattr(csd.renderer, "EVAL_SAMPLES_PER_PASS", 16 * 50)  # 50 rays a pass: 9 passes of 432 rays
        passes = renderer.render(volume, cameras, 12, shading=shading, training=False, compute_depth=True)
    assert float(whole.opacity.max()) > 0.5 and float(whole.opacity.min()) < 0.1, "the blob and empty space both in view"
    for name in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(getattr(passes, name), getattr(whole, name), atol=1e-6, rtol=1e-5)
    # each ray is lit by its own camera's light, in passes too: a view equals that camera rendered alone
    for i in range(len(cameras)):
        with torch.no_grad():
            torch.testing.assert_close(renderer.render(volume, cameras[i : i + 1], 12, shading=shading, training=False).rgb[0], passes.rgb[i], atol=1e-6, rtol=1e-5)
    if shading == "diffuse":
        with torch.no_grad():
            one_light = dataclass_replace(cameras, light_position=cameras.light_position[[0, 0, 0]])
            lit_alike = renderer.render(volume, one_light, 12, shading=shading, training=False).rgb
        assert float((lit_alike[1:] - passes.rgb[1:]).abs().max()) > 0.01, "the lights differ enough to show a mix-up"
