"""The random camera sampler against the official one (threestudio/data/uncond.py, lines of commit ffa4f53)."""

import math

import pytest
import torch

from csd.cameras import CameraConfig, sample_cameras


def _many(config, n=4000, batch=1, step=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cams = [sample_cameras(batch, config, generator, step) for _ in range(n // batch)]
    cat = lambda k: torch.cat([getattr(c, k) for c in cams])  # noqa: E731
    return cat("elevation"), cat("azimuth"), cat("distance"), cat("light_position"), cat("c2w")


def test_mixed_elevation_is_half_degrees_half_sphere():
    # uncond.py:153-177: per batch, p=½ uniform in degrees on [-10, 45], else el = asin(2u − 1) with
    # u uniform on [(-10 + 90)/180, (45 + 90)/180]: sin(el) uniform on [-1/9, 1/2], i.e. the official
    # "uniform on the sphere" branch covers [-6.4°, 30°], not [-10°, 45°]; we reproduce that
    config = CameraConfig(elevation_range=(-10.0, 45.0), elevation_sampling="mixed", batch_uniform_azimuth=False)
    elevation, *_ = _many(config, n=20000, batch=20)
    assert elevation.min() >= -10.0 - 1e-4 and elevation.max() <= 45.0 + 1e-4
    # only the degrees branch reaches above 30°: ½ · 15/55
    assert float((elevation > 30.0).float().mean()) == pytest.approx(0.5 * 15 / 55, abs=0.01)
    # P(el < 17.5°) by hand: degrees branch ½; sphere branch (sin 17.5° + 1/9) / (1/2 + 1/9)
    sphere = (math.sin(math.radians(17.5)) + 1 / 9) / (1 / 2 + 1 / 9)
    expected = 0.5 * 0.5 + 0.5 * sphere
    assert float((elevation < 17.5).float().mean()) == pytest.approx(expected, abs=0.015)
    assert abs(expected - 0.5) > 0.04, "the test must tell the mixture from the uniform sampler"
    uniform, *_ = _many(CameraConfig(elevation_range=(-10.0, 45.0), batch_uniform_azimuth=False), n=20000, batch=20)
    assert float((uniform < 17.5).float().mean()) == pytest.approx(0.5, abs=0.015)


def test_front_back_warmup_is_within_30_degrees_of_front_or_back():
    # configs/csd-if.yaml:23 front_back_only_iters 1000; uncond.py:192-196 offsets in (-30, 30)
    config = CameraConfig(batch_uniform_azimuth=False, front_back_warmup_steps=1000)
    _, azimuth, *_ = _many(config, n=4000, batch=20, step=999)
    near_front = azimuth.abs() < 30.0
    near_back = azimuth.abs() > 150.0
    assert bool((near_front | near_back).all())
    assert float(near_front.float().mean()) == pytest.approx(0.5, abs=0.04)
    _, after, *_ = _many(config, n=4000, batch=20, step=1000)
    assert float(((after.abs() > 30) & (after.abs() < 150)).float().mean()) == pytest.approx(120 / 180, abs=0.04)
    with pytest.raises(ValueError, match="batch_uniform_azimuth"):
        CameraConfig(batch_uniform_azimuth=True, front_back_warmup_steps=10)


def test_batch_uniform_azimuth_puts_one_camera_per_stratum():
    _, azimuth, *_ = _many(CameraConfig(batch_uniform_azimuth=True), n=400, batch=4)
    strata = ((azimuth.view(-1, 4) + 180.0) // 90.0).long()
    assert torch.equal(strata, torch.arange(4).expand_as(strata))


def test_absolute_light_distance_and_direction_perturbation():
    # csd-if.yaml:17-18 and uncond.py:257-273: |light| in [1.5, 2.0] world units, direction = position + N(0, 0.1)
    config = CameraConfig(light_distance_range=(1.5, 2.0), light_distance_relative=False, light_position_perturb=0.1,
                          distance_range=(1.5, 2.0), batch_uniform_azimuth=False)
    _, _, distance, light, c2w = _many(config, n=2000, batch=20)
    radius = light.norm(dim=-1)
    assert radius.min() >= 1.5 - 1e-5 and radius.max() <= 2.0 + 1e-5
    assert abs(float(torch.corrcoef(torch.stack([radius, distance]))[0, 1])) < 0.1, "independent of the camera distance"
    cosine = (torch.nn.functional.normalize(light, dim=-1) * torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)).sum(-1)
    # an offset of std 0.1 per axis at distance 1.5-2 moves the direction by ~0.06 rad
    assert cosine.min() > 0.95 and cosine.mean() < 0.9995
    relative = CameraConfig(light_distance_range=(0.8, 1.5), batch_uniform_azimuth=False)
    _, _, distance, light, _ = _many(relative, n=2000, batch=20)
    ratio = light.norm(dim=-1) / distance
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.5 + 1e-5
