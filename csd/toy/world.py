"""The "shapes world": one coloured primitive at the origin, rendered by sphere tracing SDFs.

Renders use the same camera distribution as the `nerf` stage (`csd.cameras.sample_cameras`), so
the toy prior has seen every view the pipeline will ask about. Captions are "a {colour} {shape}"
plus the view suffix the prompt processor would append for that camera; a share of captions is
empty (so ε_∅ is trained) and a share of images is degraded and tagged with quality words
(", noisy", ", blurry", ", oversaturated color", ", low quality") so that the official negative
prompt means something to the toy prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from csd.cameras import CameraConfig, Cameras, get_rays, sample_cameras
from csd.prompts import ViewThresholds, view_names, view_prompt

SHAPES = ("sphere", "cube", "cone", "torus")
COLOURS = {
    "red": (0.85, 0.10, 0.08),
    "green": (0.10, 0.68, 0.15),
    "blue": (0.10, 0.22, 0.88),
    "yellow": (0.92, 0.85, 0.10),
    "purple": (0.55, 0.12, 0.72),
    "orange": (0.98, 0.50, 0.05),
}
COLOUR_NAMES = tuple(COLOURS)
QUALITY_TAGS = ("noisy", "blurry", "oversaturated color")
BOUND = 1.0  # every object lies inside this sphere


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn and rendered."""

    resolution: int = 32
    """Output side in pixels."""
    supersample: int = 2
    """Render at `resolution * supersample` and average-pool (anti-aliasing)."""
    radius_range: tuple[float, float] = (0.45, 0.7)
    """Bounding radius of the object."""
    empty_caption_prob: float = 0.1
    """Share of captions that are empty (trains the unconditional branch)."""
    degraded_prob: float = 0.15
    """Share of images degraded and captioned with quality words."""
    march_steps: int = 48
    """Sphere-tracing iterations."""
    cameras: CameraConfig = CameraConfig()


@dataclass
class Scenes:
    """A batch of scene descriptions: `shape`, `colour` `(B,)` long; `radius`, `yaw` `(B,)`."""

    shape: Tensor
    colour: Tensor
    radius: Tensor
    yaw: Tensor
    albedo: Tensor  # (B, 3)
    background: Tensor  # (B, 3)
    ambient: Tensor  # (B,)


def sample_scenes(n: int, config: WorldConfig, generator: torch.Generator) -> Scenes:
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    colour = torch.randint(len(COLOURS), (n,), generator=generator)
    low, high = config.radius_range
    radius = low + (high - low) * torch.rand(n, generator=generator)
    yaw = torch.rand(n, generator=generator) * torch.pi / 2
    base = torch.tensor(list(COLOURS.values()))[colour]
    albedo = (base + 0.05 * torch.randn(n, 3, generator=generator)).clamp(0.0, 1.0)
    background = 0.65 + 0.35 * torch.rand(n, 3, generator=generator)
    ambient = 0.3 + 0.2 * torch.rand(n, generator=generator)
    return Scenes(shape, colour, radius, yaw, albedo, background, ambient)


def _sdf(points: Tensor, scenes: Scenes) -> Tensor:
    """Signed distances `(B, N)` of points `(B, N, 3)` to each batch element's primitive."""
    r = scenes.radius[:, None]
    cos, sin = torch.cos(scenes.yaw)[:, None], torch.sin(scenes.yaw)[:, None]
    x, y, z = points.unbind(-1)
    xr, yr = cos * x + sin * y, -sin * x + cos * y
    sphere = points.norm(dim=-1) - r
    half = r / 3**0.5  # cube whose corners touch the bounding radius
    q = torch.stack([xr, yr, z], -1).abs() - half[..., None]
    cube = q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)
    # cone: apex up, base radius 0.8 r, height 1.4 r, centred on the origin
    height, base = 1.4 * r, 0.8 * r
    rho = torch.sqrt(x * x + y * y + 1e-12)
    zc = z + height / 2
    side = ((height - zc) * base / height)  # cone radius at this height
    slope = height / torch.sqrt(height * height + base * base)
    cone_side = (rho - side) * slope
    cone = torch.maximum(torch.maximum(cone_side, -zc), zc - height)
    major, minor = 0.68 * r, 0.32 * r  # torus lying in the xy-plane
    torus = torch.sqrt((rho - major) ** 2 + z * z) - minor
    stacked = torch.stack([sphere, cube, cone, torus], dim=0)  # (4, B, N)
    return stacked.gather(0, scenes.shape[None, :, None].expand(1, *sphere.shape))[0]


def _trace(scenes: Scenes, cameras: Cameras, config: WorldConfig) -> tuple[Tensor, Tensor]:
    """Shaded object colour `(B, N, 3)` and hit mask `(B, N)` at the supersampled resolution."""
    size = config.resolution * config.supersample
    origins, directions = get_rays(cameras, size, size)
    batch = len(cameras)
    origins, directions = origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3)
    # start marching where the ray enters the bounding sphere
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - BOUND**2
    disc = b * b - c
    t = (-b - torch.sqrt(disc.clamp(min=0))).clamp(min=0)
    for _ in range(config.march_steps):
        distance = _sdf(origins + t[..., None] * directions, scenes)
        t = t + 0.9 * distance.clamp(min=-0.05)
    points = origins + t[..., None] * directions
    hit = (_sdf(points, scenes).abs() < 5e-3) & (disc > 0)
    eps = 1e-3
    offsets = torch.eye(3) * eps
    normal = torch.stack(
        [_sdf(points + o, scenes) - _sdf(points - o, scenes) for o in offsets], dim=-1
    )
    normal = F.normalize(normal, dim=-1)
    to_light = F.normalize(cameras.light_position[:, None, :] - points, dim=-1)
    diffuse = (normal * to_light).sum(-1).clamp(min=0)
    ambient = scenes.ambient[:, None]
    shade = ambient + (1 - ambient) * diffuse
    colour = scenes.albedo[:, None, :] * shade[..., None]
    return colour, hit


def render(scenes: Scenes, cameras: Cameras, config: WorldConfig) -> Tensor:
    """Images `(B, 3, R, R)` in [0, 1]."""
    size = config.resolution * config.supersample
    colour, hit = _trace(scenes, cameras, config)
    image = torch.where(hit[..., None], colour, scenes.background[:, None, :])
    image = image.reshape(len(cameras), size, size, 3).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, config.supersample).clamp(0, 1)


def render_layers(scenes: Scenes, cameras: Cameras, config: WorldConfig) -> tuple[Tensor, Tensor]:
    """The object alone, to composite over any background: premultiplied colour `(B, 3, R, R)` and
    coverage `alpha` `(B, 1, R, R)`, both in [0, 1]; `colour + (1 - alpha) * background` is the image."""
    size = config.resolution * config.supersample
    colour, hit = _trace(scenes, cameras, config)
    layers = torch.cat([colour * hit[..., None], hit[..., None].float()], dim=-1)
    layers = F.avg_pool2d(layers.reshape(len(cameras), size, size, 4).permute(0, 3, 1, 2), config.supersample)
    return layers[:, :3].clamp(0, 1), layers[:, 3:].clamp(0, 1)


def tinted_backgrounds(n: int, generator: torch.Generator) -> Tensor:
    """`(n, 3)` background colours of any hue, from pale to saturated and from dark to bright.

    Score-distilled images come with such backgrounds (the world's own are light and greyish).
    """
    hue = torch.rand(n, generator=generator)
    saturation = torch.rand(n, generator=generator)
    value = 0.25 + 0.75 * torch.rand(n, generator=generator)
    # HSV -> RGB
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6.0 * hue[:, None]) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value[:, None] * (1.0 - saturation[:, None] * ramp)


def degrade(images: Tensor, kind: Tensor, generator: torch.Generator) -> Tensor:
    """Apply quality defects by `kind` `(B,)`: -1 none, else an index into `QUALITY_TAGS`."""
    out = images.clone()
    noisy = kind == QUALITY_TAGS.index("noisy")
    out[noisy] = images[noisy] + 0.25 * torch.randn(images[noisy].shape, generator=generator)
    blurry = kind == QUALITY_TAGS.index("blurry")
    if blurry.any():
        kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 256.0
        kernel = kernel.expand(3, 1, 5, 5)
        out[blurry] = F.conv2d(F.pad(images[blurry], (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    saturated = kind == QUALITY_TAGS.index("oversaturated color")
    grey = images[saturated].mean(1, keepdim=True)
    out[saturated] = (grey + 2.5 * (images[saturated] - grey)) * 1.15
    return out.clamp(0, 1)


def caption(colour: int, shape: int, view: str, quality: int = -1) -> str:
    text = view_prompt(f"a {COLOUR_NAMES[colour]} {SHAPES[shape]}", view)
    if quality >= 0:
        text += f", {QUALITY_TAGS[quality]}, low quality"
    return text


@dataclass
class Batch:
    images: Tensor  # (B, 3, R, R) in [0, 1]
    captions: list[str]
    scenes: Scenes
    cameras: Cameras


def sample_batch(n: int, config: WorldConfig = WorldConfig(), seed: int = 0, thresholds: ViewThresholds = ViewThresholds()) -> Batch:
    """`n` rendered scenes with their captions, deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    scenes = sample_scenes(n, config, generator)
    cameras = sample_cameras(n, config.cameras, generator)
    images = render(scenes, cameras, config)
    quality = torch.where(
        torch.rand(n, generator=generator) < config.degraded_prob,
        torch.randint(len(QUALITY_TAGS), (n,), generator=generator),
        torch.full((n,), -1),
    )
    images = degrade(images, quality, generator)
    views = view_names(cameras.elevation, cameras.azimuth, thresholds)
    empty = torch.rand(n, generator=generator) < config.empty_caption_prob
    captions = [
        "" if empty[i] else caption(int(scenes.colour[i]), int(scenes.shape[i]), views[i], int(quality[i]))
        for i in range(n)
    ]
    return Batch(images, captions, scenes, cameras)


def vocabulary() -> list[str]:
    """Every word a caption of this world can contain (lower case, punctuation split off)."""
    words = ["a", ","] + list(COLOUR_NAMES) + list(SHAPES) + ["front", "side", "back", "overhead", "view"]
    words += ["noisy", "blurry", "oversaturated", "color", "low", "quality"]
    return words
