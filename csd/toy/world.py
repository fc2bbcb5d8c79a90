"""The "shapes world": one coloured primitive at the origin, rendered by sphere tracing SDFs.

Renders use the same camera distribution as the `nerf` stage (`csd.cameras.sample_cameras`), so
the toy prior has seen every view the pipeline will ask about. Captions are "a {colour} {shape}"
plus the view suffix the prompt processor would append for that camera; a share of captions is
empty (so ε_∅ is trained) and a share of images is degraded and tagged with quality words
(", noisy", ", blurry", ", oversaturated color", ", low quality") so that the official negative
prompt means something to the toy prior.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import partial

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
    return primitive_sdf(points, scenes.shape, scenes.radius, scenes.yaw)


def primitive_sdf(points: Tensor, shape: Tensor, radius: Tensor, yaw: Tensor) -> Tensor:
    """Signed distances `(B, N)` of points `(B, N, 3)` to the primitive `shape` `(B,)` (index into
    `SHAPES`) of bounding radius `radius` `(B,)`, turned by `yaw` `(B,)` about z, centred on the origin."""
    r = radius[:, None]
    cos, sin = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
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
    return stacked.gather(0, shape[None, :, None].expand(1, *sphere.shape))[0]


def _trace(scenes: "Scenes | OtherScenes", cameras: Cameras, config: WorldConfig) -> tuple[Tensor, Tensor]:
    """Shaded object colour `(B, N, 3)` and hit mask `(B, N)` at the supersampled resolution."""
    if isinstance(scenes, OtherScenes) and len(groups := (key := scenes.group()).unique()) > 1:
        # one group at a time: each needs only some of the SDF's components and steps (`OtherScenes.sdf`)
        parts = [(key == k).nonzero().flatten() for k in groups]
        traced = [_trace(scenes.select(i), cameras[i], config) for i in parts]
        order = torch.cat(parts).argsort()
        return torch.cat([c for c, _ in traced])[order], torch.cat([h for _, h in traced])[order]
    size = config.resolution * config.supersample
    origins, directions = get_rays(cameras, size, size)
    batch = len(cameras)
    origins, directions = origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3)
    # start marching where the ray enters the bounding sphere
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - BOUND**2
    disc = b * b - c
    t = (-b - torch.sqrt(disc.clamp(min=0))).clamp(min=0)
    sdf = scenes.sdf if isinstance(scenes, OtherScenes) else partial(_sdf, scenes=scenes)
    inexact = isinstance(scenes, OtherScenes) and bool((scenes.lipschitz < 1).any())
    steps = config.march_steps * (OTHER_MARCH_FACTOR if inexact else 1)
    for _ in range(steps):
        distance = sdf(origins + t[..., None] * directions)
        t = t + 0.9 * distance.clamp(min=-0.05)
    points = origins + t[..., None] * directions
    hit = (sdf(points).abs() < 5e-3) & (disc > 0)
    eps = 1e-3
    offsets = torch.eye(3) * eps
    normal = torch.stack(
        [sdf(points + o) - sdf(points - o) for o in offsets], dim=-1
    )
    normal = F.normalize(normal, dim=-1)
    to_light = F.normalize(cameras.light_position[:, None, :] - points, dim=-1)
    diffuse = (normal * to_light).sum(-1).clamp(min=0)
    ambient = scenes.ambient[:, None]
    shade = ambient + (1 - ambient) * diffuse
    colour = scenes.albedo[:, None, :] * shade[..., None]
    return colour, hit


def render(scenes: "Scenes | OtherScenes", cameras: Cameras, config: WorldConfig) -> Tensor:
    """Images `(B, 3, R, R)` in [0, 1]."""
    size = config.resolution * config.supersample
    colour, hit = _trace(scenes, cameras, config)
    image = torch.where(hit[..., None], colour, scenes.background[:, None, :])
    image = image.reshape(len(cameras), size, size, 3).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, config.supersample).clamp(0, 1)


def render_layers(scenes: "Scenes | OtherScenes", cameras: Cameras, config: WorldConfig) -> tuple[Tensor, Tensor]:
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


ARTICLES = ("a", "an", "the")
"""Articles a person may write; the world's captions have only "a"."""


def canonical_prompt(prompt: str) -> str:
    """A prompt as people write it → the world's caption grammar, for the toy prior (issue 18).

    Lower case; `.`, `!`, `?`, `;`, quotes and other punctuation dropped except the commas that
    separate clauses; "an" and "the" → "a". When the prompt names one colour and one shape and the
    clauses naming them hold nothing else (articles aside), they become the caption's head
    "a {colour} {shape}", followed by the other clauses in their order: "An orange cube." → "a orange
    cube", "a cube, red" → "a red cube", "Red cube, front view" → "a red cube, front view". Anything
    else keeps its words and order ("a shiny red cube": "shiny" stays a word the prior does not know,
    as before). Canonical captions (`caption`) and the empty prompt come back unchanged.
    """
    clauses = [re.findall(r"[a-z0-9]+", clause) for clause in re.split(r"[,;]", prompt.lower())]
    clauses = [["a" if w in ARTICLES else w for w in words] for words in clauses if words]
    named = [w for clause in clauses for w in clause if w in COLOURS or w in SHAPES]
    naming = [i for i, clause in enumerate(clauses) if any(w in COLOURS or w in SHAPES for w in clause)]
    plain = all(w == "a" or w in COLOURS or w in SHAPES for i in naming for w in clauses[i])
    colours, shapes = [w for w in named if w in COLOURS], [w for w in named if w in SHAPES]
    if plain and len(colours) == 1 and len(shapes) == 1:
        rest = [clause for i, clause in enumerate(clauses) if i not in naming]
        clauses = [["a", colours[0], shapes[0]]] + rest
    return ", ".join(" ".join(clause) for clause in clauses)


# --- non-primitives: what the world's objects are not ----------------------------------------------
#
# The toy evaluator must be able to say "none of the world's shapes" (issue 13): it is trained with an
# extra `other` class made of these scenes. They are drawn, coloured, lit and rendered exactly like the
# world's (same palette, backgrounds, cameras and sphere tracer); only the SDF differs. Nothing here
# touches the primitives' code path, so the toy prior's training data is unchanged.

OTHER_KINDS = ("stretched", "deformed", "union", "difference", "horns", "bumps", "blobby", "pair")
"""Families of non-primitive scenes, drawn with equal probability."""
OTHER_MARCH_FACTOR = 2
"""Scenes whose distances are loose bounds (stretch, twist, noise: `lipschitz` < 1) get twice the tracing steps."""
_FAR = 10.0  # distance of an absent component
_HORNS, _BLOBS, _WAVES = 2, 4, 4


@dataclass
class OtherScenes:
    """A batch of non-primitive scenes: a first part (`base`'s shape, radius and yaw, moved to `centre`,
    scaled per axis by `stretch`, tapered and twisted along z) combined with an optional second primitive,
    horns (tapered capsules), blobs and a wave displacement. `base` also holds colour, lighting and
    background, drawn as for the world's own scenes. `kind` `(B,)` indexes `OTHER_KINDS`."""

    base: Scenes
    kind: Tensor
    centre: Tensor  # (B, 3)
    stretch: Tensor  # (B, 3)
    taper: Tensor  # (B,) x, y scaled by 1 + taper · z
    twist: Tensor  # (B,) radians per unit of z
    second_mode: Tensor  # (B,) 0 none, 1 union, 2 difference
    second_shape: Tensor  # (B,)
    second_radius: Tensor  # (B,)
    second_yaw: Tensor  # (B,)
    second_centre: Tensor  # (B, 3)
    horn_base: Tensor  # (B, K, 3)
    horn_tip: Tensor  # (B, K, 3)
    horn_radius: Tensor  # (B, K) radius at the base (the tip's is a fifth of it)
    horn_on: Tensor  # (B, K) bool
    blob_centre: Tensor  # (B, K, 3)
    blob_radius: Tensor  # (B, K)
    blob_on: Tensor  # (B, K) bool
    blobs_only: Tensor  # (B,) bool: the blobs replace the first part (metaballs)
    wave_frequency: Tensor  # (B, W, 3)
    wave_phase: Tensor  # (B, W)
    wave_amplitude: Tensor  # (B, W)
    lipschitz: Tensor  # (B,) distances are multiplied by this (≤ 1) to stay a bound

    @property
    def colour(self) -> Tensor:
        return self.base.colour

    @property
    def albedo(self) -> Tensor:
        return self.base.albedo

    @property
    def background(self) -> Tensor:
        return self.base.background

    @property
    def ambient(self) -> Tensor:
        return self.base.ambient

    def select(self, index: Tensor) -> "OtherScenes":
        """The scenes at `index` `(K,)`."""
        fields = {f: getattr(self, f)[index] for f in self.__dataclass_fields__ if f != "base"}
        base = Scenes(*(getattr(self.base, f)[index] for f in Scenes.__dataclass_fields__))
        return OtherScenes(base=base, **fields)

    def group(self) -> Tensor:
        """`(B,)` keys of scenes that share SDF components and tracing steps (kind, metaballs, loose bound)."""
        return self.kind * 4 + self.blobs_only.long() * 2 + (self.lipschitz < 1).long()

    def first_part(self, points: Tensor) -> Tensor:
        """Distances `(B, N)` (in the part's own, undeformed units) to the first part."""
        q = points - self.centre[:, None, :]
        x, y, z = q.unbind(-1)
        angle = self.twist[:, None] * z
        cos, sin = torch.cos(angle), torch.sin(angle)
        x, y = cos * x - sin * y, sin * x + cos * y
        scale = (1 + self.taper[:, None] * z).clamp(min=0.2)
        q = torch.stack([x / scale, y / scale, z], -1) / self.stretch[:, None, :]
        return primitive_sdf(q, self.base.shape, self.base.radius, self.base.yaw)

    def sdf(self, points: Tensor) -> Tensor:
        """Distance bounds `(B, N)` of points `(B, N, 3)` to each scene's surface."""
        # rays that miss run off geometrically (t grows ~1.9× a step); squared coordinates would overflow.
        # Clamping to a box around the objects keeps a bound: projecting onto a convex set is non-expansive.
        points = points.clamp(-4 * BOUND, 4 * BOUND)
        # components no scene of the batch has are skipped (`_trace` renders one group at a time)
        d = self.first_part(points) if not self.blobs_only.all() else None
        if self.wave_amplitude.any():
            phase = torch.einsum("bnc,bwc->bnw", points, self.wave_frequency) + self.wave_phase[:, None, :]
            d = d - (self.wave_amplitude[:, None, :] * torch.sin(phase)).sum(-1)
        if self.blob_on.any():
            blobs = (points[:, :, None, :] - self.blob_centre[:, None]).norm(dim=-1) - self.blob_radius[:, None]
            blobs = torch.where(self.blob_on[:, None], blobs, torch.full_like(blobs, _FAR))
            metaballs = blobs[..., 0]
            for k in range(1, blobs.shape[-1]):
                metaballs = _smooth_min(metaballs, blobs[..., k], 0.15)
            if d is None:
                d = metaballs
            else:
                bumped = d
                for k in range(blobs.shape[-1]):
                    bumped = _smooth_min(bumped, blobs[..., k], 0.04)
                d = torch.where(self.blobs_only[:, None], metaballs, bumped)
        if (self.second_mode > 0).any():
            second = primitive_sdf(points - self.second_centre[:, None, :], self.second_shape, self.second_radius, self.second_yaw)
            mode = self.second_mode[:, None]
            d = torch.where(mode == 1, torch.minimum(d, second), torch.where(mode == 2, torch.maximum(d, -second), d))
        if self.horn_on.any():
            horns = _round_cone(points, self.horn_base, self.horn_tip, self.horn_radius, self.horn_radius / 5)
            horns = torch.where(self.horn_on[:, None], horns, torch.full_like(horns, _FAR))
            d = torch.minimum(d, horns.min(-1).values)
        return d * self.lipschitz[:, None]


def _smooth_min(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum (Quílez, "smooth minimum"): blends the two surfaces over width `k`."""
    h = (0.5 + 0.5 * (b - a) / k).clamp(0, 1)
    return b + (a - b) * h - k * h * (1 - h)


def _round_cone(points: Tensor, a: Tensor, b: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
    """Distances `(B, N, K)` of points `(B, N, 3)` to K round cones per scene from `a` `(B, K, 3)` (radius
    `r1` `(B, K)`) to `b` (radius `r2`): the exact SDF of Quílez's `sdRoundCone`."""
    ba = (b - a)[:, None]  # (B, 1, K, 3)
    l2 = (ba * ba).sum(-1)
    rr = (r1 - r2)[:, None]
    a2 = l2 - rr * rr
    pa = points[:, :, None, :] - a[:, None]
    y = (pa * ba).sum(-1)
    z = y - l2
    x2 = (pa * l2[..., None] - ba * y[..., None]).pow(2).sum(-1)
    y2, z2 = y * y * l2, z * z * l2
    k = torch.sign(rr) * rr * rr * x2
    r1, r2 = r1[:, None], r2[:, None]
    tip = torch.sqrt(x2 + z2) / l2 - r2
    foot = torch.sqrt(x2 + y2) / l2 - r1
    side = (torch.sqrt((x2 * a2 / l2).clamp(min=0)) + y * rr) / l2 - r1
    return torch.where(torch.sign(z) * a2 * z2 > k, tip, torch.where(torch.sign(y) * a2 * y2 < k, foot, side))


def _directions(n: int, generator: torch.Generator, elevation: tuple[float, float], k: int = 1) -> Tensor:
    """`(n, k, 3)` unit vectors, azimuth uniform, elevation uniform in degrees."""
    azimuth = 2 * torch.pi * torch.rand(n, k, generator=generator)
    low, high = elevation
    theta = torch.deg2rad(low + (high - low) * torch.rand(n, k, generator=generator))
    return torch.stack([torch.cos(theta) * torch.cos(azimuth), torch.cos(theta) * torch.sin(azimuth), torch.sin(theta)], -1)


def _outer_surface(scenes: OtherScenes, directions: Tensor, samples: int = 64) -> Tensor:
    """Distance `(B, K)` from the origin, along `directions` `(B, K, 3)`, of the first part's outermost surface."""
    t = torch.linspace(0.0, BOUND, samples)
    b, k, _ = directions.shape
    points = (directions[:, :, None, :] * t[:, None]).reshape(b, k * samples, 3)
    inside = (scenes.first_part(points) < 0).reshape(b, k, samples)
    last = torch.where(inside, t, torch.zeros(())).max(-1).values
    return torch.where(inside.any(-1), last, scenes.base.radius[:, None].expand(b, k))


def sample_other_scenes(n: int, config: WorldConfig, generator: torch.Generator) -> OtherScenes:
    """`n` non-primitive scenes, `n // len(OTHER_KINDS)` or so of each kind, everything inside `BOUND`."""
    base = sample_scenes(n, config, generator)
    u = lambda low, high, *shape: low + (high - low) * torch.rand(*(shape or (n,)), generator=generator)  # noqa: E731
    kind = torch.randint(len(OTHER_KINDS), (n,), generator=generator)
    is_ = {name: kind == i for i, name in enumerate(OTHER_KINDS)}
    zeros3 = torch.zeros(n, 3)
    scenes = OtherScenes(
        base=base, kind=kind, centre=zeros3.clone(), stretch=torch.ones(n, 3), taper=torch.zeros(n), twist=torch.zeros(n),
        second_mode=torch.zeros(n, dtype=torch.long), second_shape=torch.randint(len(SHAPES), (n,), generator=generator),
        second_radius=u(0.25, 0.4), second_yaw=u(0, torch.pi / 2), second_centre=zeros3.clone(),
        horn_base=torch.zeros(n, _HORNS, 3), horn_tip=torch.ones(n, _HORNS, 3), horn_radius=u(0.1, 0.16, n, _HORNS),
        horn_on=torch.zeros(n, _HORNS, dtype=torch.bool), blob_centre=torch.zeros(n, _BLOBS, 3),
        blob_radius=torch.ones(n, _BLOBS), blob_on=torch.zeros(n, _BLOBS, dtype=torch.bool),
        blobs_only=torch.zeros(n, dtype=torch.bool), wave_frequency=torch.zeros(n, _WAVES, 3),
        wave_phase=u(0, 2 * torch.pi, n, _WAVES), wave_amplitude=torch.zeros(n, _WAVES), lipschitz=torch.ones(n),
    )

    # stretched: one axis ×1.6–2 or ×0.4–0.55; horns: a third are stretched upright (the demo's "vase")
    axis = torch.randint(3, (n,), generator=generator)
    factor = torch.where(torch.rand(n, generator=generator) < 0.5, u(1.6, 2.0), u(0.4, 0.55))
    upright = is_["horns"] & (torch.rand(n, generator=generator) < 0.35)
    axis = torch.where(upright, torch.full_like(axis, 2), axis)
    factor = torch.where(upright, u(1.4, 1.8), factor)
    stretched = is_["stretched"] | upright
    scenes.stretch[stretched, axis[stretched]] = factor[stretched]
    # deformed: a cube, sphere or torus tapered along z (a frustum, an egg), cubes also twisted
    deformed = is_["deformed"]
    base.shape[deformed] = torch.tensor([0, 1, 1, 3])[torch.randint(4, (n,), generator=generator)][deformed]
    scenes.taper[deformed] = (torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) * u(0.7, 1.1))[deformed]
    scenes.twist[deformed] = torch.where(base.shape == 1, u(1.2, 2.0), torch.zeros(n))[deformed]
    # sizes: the stretched and combined objects get smaller first parts so that all stays inside BOUND
    base.radius[:] = torch.where(is_["horns"] | is_["bumps"] | is_["union"], u(0.42, 0.55), base.radius)
    base.radius[:] = torch.where(stretched, u(0.38, 0.5), base.radius)
    base.radius[:] = torch.where(is_["pair"], u(0.28, 0.4), base.radius)
    base.radius[:] = torch.where(is_["blobby"], u(0.45, 0.6), base.radius)
    # a part squeezed by s < 1 has distances up to 1/s too long; taper and twist bend space by up to ~1/0.6
    squeeze = scenes.stretch.min(-1).values.clamp(max=1)
    scenes.lipschitz[:] = torch.where(stretched, squeeze, torch.where(deformed, torch.full((n,), 0.6), scenes.lipschitz))

    # union: a second, smaller primitive centred on the first's surface; difference: a bite out of it
    # from above or the side (the cameras look from -10° to 45° elevation, so the bite shows)
    direction = _directions(n, generator, (0.0, 60.0))[:, 0]
    bite = _directions(n, generator, (0.0, 60.0))[:, 0]
    direction = torch.where(is_["difference"][:, None], bite, direction)
    surface = _outer_surface(scenes, direction[:, None])[:, 0]
    combined = is_["union"] | is_["difference"]
    scenes.second_mode[is_["union"]] = 1
    scenes.second_mode[is_["difference"]] = 2
    scenes.second_shape[:] = torch.where(is_["difference"], torch.randint(2, (n,), generator=generator), scenes.second_shape)
    scenes.second_radius[:] = torch.where(is_["difference"], u(0.4, 0.6) * base.radius / 0.5, scenes.second_radius)
    scenes.second_centre[combined] = (direction * surface[:, None])[combined]
    # pair: two small primitives side by side (a gap of 0.05–0.2), one a little higher than the other
    side = _directions(n, generator, (-10.0, 10.0))[:, 0]
    scenes.second_radius[:] = torch.where(is_["pair"], u(0.28, 0.4), scenes.second_radius)
    half = (base.radius + scenes.second_radius + u(0.05, 0.2)) / 2
    lift = u(-0.15, 0.15)
    pair = is_["pair"]
    scenes.centre[pair] = (-side * half[:, None] + torch.stack([zeros3[:, 0], zeros3[:, 1], lift], -1))[pair]
    scenes.second_centre[pair] = (side * half[:, None] - torch.stack([zeros3[:, 0], zeros3[:, 1], lift], -1))[pair]
    scenes.second_mode[pair] = 1

    # horns: one or two tapered capsules out of the side, 0.3–0.5 long, tips inside BOUND
    horns = _directions(n, generator, (-10.0, 40.0), _HORNS)
    surface = _outer_surface(scenes, horns)
    length = u(0.3, 0.5, n, _HORNS)
    scenes.horn_base[:] = horns * (0.8 * surface)[..., None]
    scenes.horn_tip[:] = horns * (surface + length).clamp(max=0.95 * BOUND)[..., None]
    scenes.horn_on[:] = is_["horns"][:, None] & torch.tensor([True, False]) | (
        is_["horns"][:, None] & (torch.rand(n, _HORNS, generator=generator) < 0.5)
    )
    # bumps: 2–4 balls of radius 0.15–0.24 on the surface; blobby: 3–4 metaballs, or a sphere under waves
    spots = _directions(n, generator, (-10.0, 70.0), _BLOBS)
    surface = _outer_surface(scenes, spots)
    count = torch.randint(2, _BLOBS + 1, (n, 1), generator=generator)
    bumps = is_["bumps"][:, None] & (torch.arange(_BLOBS) < count)
    metaball = is_["blobby"] & (torch.rand(n, generator=generator) < 0.5)
    balls = metaball[:, None] & (torch.arange(_BLOBS) < count.clamp(min=3))
    inner = _directions(n, generator, (-60.0, 60.0), _BLOBS) * u(0.15, 0.4, n, _BLOBS)[..., None]
    scenes.blob_centre[:] = torch.where(balls[..., None], inner, spots * surface[..., None])
    scenes.blob_radius[:] = torch.where(balls, u(0.2, 0.32, n, _BLOBS), u(0.15, 0.24, n, _BLOBS))
    scenes.blob_on[:] = bumps | balls
    scenes.blobs_only[:] = metaball
    waves = is_["blobby"] & ~metaball
    base.shape[waves] = 0
    base.radius[waves] = u(0.5, 0.62)[waves]
    frequency = _directions(n, generator, (-90.0, 90.0), _WAVES) * u(3.0, 6.0, n, _WAVES)[..., None]
    amplitude = u(0.04, 0.09, n, _WAVES)
    scenes.wave_frequency[waves] = frequency[waves]
    scenes.wave_amplitude[waves] = amplitude[waves]
    gain = (amplitude * frequency.norm(dim=-1)).sum(-1)
    scenes.lipschitz[:] = torch.where(waves, 1 / (1 + gain), scenes.lipschitz)
    return scenes


def vase_with_horn(n: int) -> tuple[OtherScenes, WorldConfig]:
    """The demo's failure by hand: a red cube stretched upright ×1.7 with one horn out of its side."""
    config = WorldConfig()
    scenes = sample_other_scenes(n, config, torch.Generator().manual_seed(11))
    base = replace(
        scenes.base,
        shape=torch.full((n,), SHAPES.index("cube")),
        colour=torch.full((n,), COLOUR_NAMES.index("red")),
        radius=torch.full((n,), 0.42),
        yaw=torch.zeros(n),
        albedo=torch.tensor([COLOURS["red"]]).expand(n, 3),
        background=torch.full((n, 3), 0.85),
        ambient=torch.full((n,), 0.4),
    )
    stretch = torch.ones(n, 3)
    stretch[:, 2] = 1.7
    vase = replace(
        scenes,
        base=base, kind=torch.full((n,), OTHER_KINDS.index("horns")), centre=torch.zeros(n, 3), stretch=stretch,
        taper=torch.zeros(n), twist=torch.zeros(n), second_mode=torch.zeros(n, dtype=torch.long),
        blob_on=torch.zeros_like(scenes.blob_on), blobs_only=torch.zeros(n, dtype=torch.bool),
        wave_amplitude=torch.zeros_like(scenes.wave_amplitude), lipschitz=torch.ones(n),
    )
    direction = torch.tensor([[0.0, 1.0, 0.2]]).expand(n, 3)
    direction = (direction / direction.norm(dim=-1, keepdim=True))[:, None].repeat(1, 2, 1)
    surface = _outer_surface(vase, direction)
    horn_on = torch.zeros_like(scenes.horn_on)
    horn_on[:, 0] = True
    return replace(
        vase, horn_on=horn_on, horn_base=direction * (0.8 * surface)[..., None],
        horn_tip=direction * (surface + 0.4)[..., None], horn_radius=torch.full((n, 2), 0.12),
    ), config


# --- is a non-primitive one in the image? ---------------------------------------------------------------


def primitive_silhouette_iou(scenes: OtherScenes, cameras: Cameras, config: WorldConfig, alpha: Tensor | None = None) -> Tensor:
    """`(B,)` best silhouette IoU, per view, of each non-primitive with any of the world's primitives.

    Judged from the image alone: the object's coverage `alpha` (`render_layers`; rendered when not
    given) thresholded at one half, against the hit mask of each primitive (sphere, cube at the base's
    yaw and at 45° from it, cone, torus) seen by the same camera, its radius fitted to the object's
    area and its mask moved to the object's centroid. A non-primitive that scores high here looks like
    a primitive from that camera (a bite on the far side, a stretch along the view axis, a horn behind
    the body) and is no honest example of `other`.
    """
    if alpha is None:
        alpha = render_layers(scenes, cameras, config)[1]
    mask = alpha[:, 0] > 0.5  # (B, R, R)
    n, size = mask.shape[0], mask.shape[-1]
    flat = replace(config, supersample=1)
    base = scenes.base
    coords = torch.arange(size, dtype=torch.float32)

    def centroid(m: Tensor) -> Tensor:
        area = m.float().sum((1, 2)).clamp(min=1)
        return torch.stack([(m * coords[:, None]).sum((1, 2)) / area, (m * coords[None, :]).sum((1, 2)) / area], -1)

    def primitive_mask(shape: int, radius: Tensor, yaw: Tensor) -> Tensor:
        prim = Scenes(torch.full((n,), shape), base.colour, radius, yaw, base.albedo, base.background, base.ambient)
        return _trace(prim, cameras, flat)[1].reshape(n, size, size)

    target_area = mask.float().sum((1, 2))
    target_centre = centroid(mask)
    best = torch.zeros(n)
    candidates = [(0, base.yaw), (1, base.yaw), (1, base.yaw + torch.pi / 4), (2, base.yaw), (3, base.yaw)]
    for shape, yaw in candidates:
        radius = torch.full((n,), 0.55)
        # fit the radius to the object's area (area ~ radius²)
        area = primitive_mask(shape, radius, yaw).float().sum((1, 2)).clamp(min=1)
        radius = (radius * (target_area / area).sqrt()).clamp(0.15, BOUND)
        prim = primitive_mask(shape, radius, yaw)
        shift = (target_centre - centroid(prim)).round().long()
        moved = torch.stack([torch.roll(p, (int(dy), int(dx)), (0, 1)) for p, (dy, dx) in zip(prim, shift.tolist())])
        iou = (moved & mask).float().sum((1, 2)) / (moved | mask).float().sum((1, 2)).clamp(min=1)
        best = torch.maximum(best, iou)
    return best
