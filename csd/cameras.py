"""Cameras: the random sampler of the official CSD/threestudio configs, orbits, and rays.

World frame: z is up, the object sits at the origin. A camera at azimuth 0°, elevation 0° sits on
+x looking toward the origin ("front view"); azimuth grows counter-clockwise seen from above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from csd.checks import at_least, between, interval, validate


@dataclass(frozen=True)
class CameraConfig:
    """Ranges of the random camera sampler (official csd-if.yaml / threestudio `random-camera`)."""

    distance_range: tuple[float, float] = (1.5, 2.0)
    """Camera distance from the origin, world units."""
    fovy_range: tuple[float, float] = (40.0, 70.0)
    """Vertical field of view in degrees."""
    elevation_range: tuple[float, float] = (-10.0, 45.0)
    """Elevation above the xy-plane in degrees."""
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    """Azimuth in degrees; 0 is the front (+x)."""
    batch_uniform_azimuth: bool = True
    """Spread a batch's azimuths evenly (one stratum per camera) instead of i.i.d."""
    elevation_sampling: Literal["uniform", "mixed"] = "uniform"
    """`uniform`: uniform in degrees; `mixed`: per batch, with probability ½ uniform in degrees, else
    uniform on the sphere (inverse-CDF of sin), as threestudio/data/uncond.py:153-177."""
    light_distance_range: tuple[float, float] = (0.8, 1.5)
    """Point light distance: world units when `light_distance_relative` is false (official
    uncond.py:257-273), else a factor of the camera distance (our earlier form)."""
    light_distance_relative: bool = True
    light_position_perturb: float = 1.0
    """Std of the N(0, σ) offset of the light direction from the camera position (uncond.py:265-269)."""
    front_back_warmup_steps: int = 0
    """For the first N steps sample only azimuths within ±`front_back_halfwidth` of the front or the
    back, each with probability ½ (official `front_back_only_iters`, uncond.py:117,192-196)."""
    front_back_halfwidth: float = 30.0
    """Half-width in degrees of the warm-up's front and back sectors (official: 30)."""

    def __post_init__(self):
        def warmup(steps):
            # the official sampler asserts the same (uncond.py:181-182)
            if self.batch_uniform_azimuth and steps > 0:
                return f"{steps} needs batch_uniform_azimuth: false (the two azimuth samplers exclude each other)"
            return None

        validate(self, {
            "distance_range": interval(positive=True), "fovy_range": interval(0, 180, positive=True),
            "elevation_range": interval(-90, 90), "azimuth_range": interval(-360, 360),
            "light_distance_range": interval(positive=True), "light_position_perturb": at_least(0),
            "front_back_warmup_steps": lambda steps: at_least(0)(steps) or warmup(steps),
            "front_back_halfwidth": between(0, 90),
        })


@dataclass
class Cameras:
    """A batch of pinhole cameras looking at the origin.

    `c2w` is `(B, 4, 4)` camera-to-world with the OpenGL convention (camera looks down -z, +y up).
    Angles are in degrees; `light_position` is `(B, 3)` in world units.
    """

    c2w: Tensor
    fovy: Tensor
    elevation: Tensor
    azimuth: Tensor
    distance: Tensor
    light_position: Tensor = field(default=None)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def position(self) -> Tensor:
        return self.c2w[:, :3, 3]

    def to(self, device) -> "Cameras":
        return Cameras(*(getattr(self, k).to(device) for k in ("c2w", "fovy", "elevation", "azimuth", "distance", "light_position")))

    def __getitem__(self, index) -> "Cameras":
        return Cameras(*(getattr(self, k)[index] for k in ("c2w", "fovy", "elevation", "azimuth", "distance", "light_position")))


def spherical_to_cartesian(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """`(B,)` degrees and world units → `(B, 3)` positions, z up."""
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    return torch.stack(
        [distance * torch.cos(el) * torch.cos(az), distance * torch.cos(el) * torch.sin(az), distance * torch.sin(el)],
        dim=-1,
    )


def look_at(position: Tensor, target: Tensor | None = None) -> Tensor:
    """Camera-to-world `(B, 4, 4)` for cameras at `position` `(B, 3)` looking at `target` (origin)."""
    if target is None:
        target = torch.zeros_like(position)
    forward = torch.nn.functional.normalize(target - position, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, dtype=position.dtype, device=position.device).repeat(position.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = position
    return c2w


def make_cameras(elevation: Tensor, azimuth: Tensor, distance: Tensor, fovy: Tensor, light_position: Tensor | None = None) -> Cameras:
    position = spherical_to_cartesian(elevation, azimuth, distance)
    if light_position is None:
        light_position = position.clone()
    return Cameras(look_at(position), fovy, elevation, azimuth, distance, light_position)


def _uniform(n: int, low_high: tuple[float, float], generator: torch.Generator | None) -> Tensor:
    low, high = low_high
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_cameras(n: int, config: CameraConfig = CameraConfig(), generator: torch.Generator | None = None, step: int = 0) -> Cameras:
    """Draw `n` random cameras from the official ranges (CPU tensors)."""
    if config.batch_uniform_azimuth:
        low, high = config.azimuth_range
        azimuth = low + (high - low) * (torch.rand(n, generator=generator) + torch.arange(n)) / n
    elif step < config.front_back_warmup_steps:
        front = torch.rand(n, generator=generator) < 0.5
        w = config.front_back_halfwidth
        offset = -w + 2 * w * torch.rand(n, generator=generator)
        azimuth = torch.where(front, offset, 180.0 + offset)
        azimuth = (azimuth + 180.0) % 360.0 - 180.0
    else:
        azimuth = _uniform(n, config.azimuth_range, generator)
    if config.elevation_sampling == "mixed" and float(torch.rand(1, generator=generator)) >= 0.5:
        # uniform on the sphere between the two elevations: sin(elevation) uniform
        low, high = ((e + 90.0) / 180.0 for e in config.elevation_range)
        elevation = torch.rad2deg(torch.asin(2 * (low + (high - low) * torch.rand(n, generator=generator)) - 1))
    else:
        elevation = _uniform(n, config.elevation_range, generator)
    distance = _uniform(n, config.distance_range, generator)
    fovy = _uniform(n, config.fovy_range, generator)
    position = spherical_to_cartesian(elevation, azimuth, distance)
    light_direction = torch.nn.functional.normalize(
        position + config.light_position_perturb * torch.randn(n, 3, generator=generator), dim=-1
    )
    light_distance = _uniform(n, config.light_distance_range, generator)
    if config.light_distance_relative:
        light_distance = light_distance * distance
    return Cameras(look_at(position), fovy, elevation, azimuth, distance, light_direction * light_distance[:, None])


def orbit_cameras(n: int, elevation: float = 15.0, distance: float = 1.8, fovy: float = 50.0) -> Cameras:
    """`n` cameras evenly spaced in azimuth, starting at the front, for turntables and evaluation."""
    azimuth = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    azimuth = (azimuth + 180.0) % 360.0 - 180.0
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return make_cameras(full(elevation), azimuth, full(distance), full(fovy))


def get_rays(cameras: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Ray origins and unit directions `(B, H, W, 3)` through pixel centres."""
    device = cameras.c2w.device
    focal = 0.5 * height / torch.tan(0.5 * torch.deg2rad(cameras.fovy))  # (B,)
    j, i = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    x = (i - 0.5 * width)[None] / focal[:, None, None]
    y = -(j - 0.5 * height)[None] / focal[:, None, None]
    directions_camera = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (B, H, W, 3)
    rotation = cameras.c2w[:, :3, :3]
    directions = torch.einsum("bij,bhwj->bhwi", rotation, directions_camera)
    directions = torch.nn.functional.normalize(directions, dim=-1)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(directions)
    return origins, directions


def projection_matrix(fovy: Tensor, aspect: float = 1.0, near: float = 0.1, far: float = 100.0) -> Tensor:
    """OpenGL perspective projection `(B, 4, 4)` matching `get_rays`."""
    f = 1.0 / torch.tan(0.5 * torch.deg2rad(fovy))
    proj = torch.zeros(fovy.shape[0], 4, 4, dtype=torch.float32, device=fovy.device)
    proj[:, 0, 0] = f / aspect
    proj[:, 1, 1] = f
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    return proj


__all__ = [
    "CameraConfig",
    "Cameras",
    "sample_cameras",
    "orbit_cameras",
    "make_cameras",
    "get_rays",
    "look_at",
    "projection_matrix",
    "spherical_to_cartesian",
]
