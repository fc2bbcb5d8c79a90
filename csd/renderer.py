"""Volume renderer: bounding-sphere ray intersection, stratified samples, an occupancy grid that skips
empty space, alpha compositing; shading (albedo / diffuse / textureless) and backgrounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csd.cameras import Cameras, get_rays
from csd.checks import at_least, between, interval, unit_rgb, validate
from csd.shading import diffuse_shade, random_background

SHADING_MODES = ("albedo", "diffuse", "textureless", "normal")
"""`normal` renders the world-space normal map as colour n·0.5 + 0.5: the official `textureless`
with `textureless_normal: true` (threestudio/models/materials/diffuse_with_point_light_material.py:110-112,
configs/csd-if.yaml:52)."""
EVAL_SAMPLES_PER_PASS = 2**23
"""A render without training (previews, the evaluator, fixed points) marches at most this many samples
(rays × `num_samples`) at a time: the if-gpu turntable (4 views of 256² at 512 samples, 134 M samples
in one pass) peaked at 65 GiB of CUDA memory on an H200 against 9.8 GiB for its training steps
(bench/gpu.py, 2026-12-04). A toy-cpu preview (4 views of 64² at 48 samples) is one pass."""


@dataclass(frozen=True)
class RendererConfig:
    """Sampling, occupancy grid, shading and background."""

    num_samples: int = 64
    """Stratified samples per ray inside the bounding sphere."""
    occupancy_resolution: int = 32
    """Occupancy grid cells per side (0 disables the grid)."""
    occupancy_threshold: float = 0.01
    """A cell is occupied while its (decayed max) density × cell size exceeds this optical depth."""
    occupancy_update_every: int = 16
    """Re-evaluate the grid every N training steps."""
    occupancy_decay: float = 0.95
    alpha_threshold: float = 0.01
    """With a grid: samples whose alpha (from a density-only pass without gradients) is below
    min(this, the grid's mean cell optical depth) are dropped before the full query, as nerfacc's
    `OccGridEstimator.sampling(alpha_thre=…, sigma_fn=…)` does; threestudio's nerf-volume-renderer
    (`prune_alpha_threshold: true`, the official default) passes 0.01. 0 keeps them."""
    early_stop_eps: float = 1e-4
    """With a grid: samples behind a transmittance below this are dropped too (nerfacc's default)."""
    ambient: float = 0.4
    """Ambient light share in diffuse shading (the rest is lambertian from the point light)."""
    background: Literal["solid", "random", "learned"] = "random"
    """`solid` (background_color), `random` (a random light colour per view, like the toy world) or `learned`."""
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    random_background_range: tuple[float, float] = (0.65, 1.0)
    random_background_prob: float = 0.5
    """With a `learned` background: probability of replacing it by a random colour (threestudio random_aug)."""
    orientation_reduction: Literal["rays", "opaque"] = "rays"
    """How the orientation penalty is normalised: `rays` (averaged over all rays) or `opaque` (summed
    and divided by the number of rays with opacity > 0, as threestudio/systems/magic3d.py loss_orient)."""

    def __post_init__(self):
        validate(self, {
            "num_samples": at_least(1), "occupancy_resolution": at_least(0), "occupancy_threshold": at_least(0),
            "occupancy_update_every": at_least(1), "occupancy_decay": between(0, 1), "ambient": between(0, 1),
            "alpha_threshold": between(0, 1), "early_stop_eps": between(0, 1),
            "background_color": unit_rgb, "random_background_range": interval(0, 1), "random_background_prob": between(0, 1),
        })


@dataclass
class RenderOutput:
    """`rgb` `(B, 3, H, W)` in [0, 1] (composited on the background); `opacity` `(B, 1, H, W)`;
    `depth` `(B, 1, H, W)` (None unless asked for); `normal` `(B, 3, H, W)` world-space composited
    normals and `orientation` the scalar Ref-NeRF orientation penalty (None / 0 unless
    `compute_normals`)."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor | None
    normal: Tensor | None
    orientation: Tensor


class EnvironmentBackground(nn.Module):
    """A tiny MLP from view direction to colour (threestudio neural-environment-map-background)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3))

    def forward(self, directions: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(directions))


class OccupancyGrid:
    """Binary grid over `[-bound, bound]³` marking cells whose density is not negligible.

    Everything is occupied until the first update; each update takes a jittered density sample per
    cell, keeps a decaying running max, thresholds it and dilates the mask by one cell."""

    def __init__(self, resolution: int, bound: float, threshold: float, decay: float, device="cpu"):
        self.resolution, self.bound, self.threshold, self.decay = resolution, bound, threshold, decay
        self.density = torch.zeros((resolution,) * 3, device=device)
        self.occupied = torch.ones((resolution,) * 3, dtype=torch.bool, device=device)
        self.cell = 2 * bound / resolution

    @torch.no_grad()
    def update(self, density_fn, generator: torch.Generator | None = None) -> None:
        r = self.resolution
        index = torch.stack(torch.meshgrid(*(torch.arange(r),) * 3, indexing="ij"), -1).view(-1, 3).float()
        jitter = torch.rand(index.shape, generator=generator)
        points = ((index + jitter) / r * 2 - 1) * self.bound
        density = density_fn(points.to(self.density.device)).view(r, r, r)
        self.density = torch.maximum(self.density * self.decay, density)
        occupied = (self.density * self.cell > self.threshold).float()[None, None]
        # dilate by one cell: one jittered sample per cell can miss a surface that crosses it
        self.occupied = F.max_pool3d(occupied, 3, stride=1, padding=1)[0, 0].bool()

    @property
    def mean_optical_depth(self) -> float:
        """Mean over cells of the decayed max density × cell size (nerfacc's `occs.mean()`):
        caps the alpha threshold, so nothing is pruned before the first update."""
        return float(self.density.mean()) * self.cell

    def query(self, points: Tensor) -> Tensor:
        """`(N, 3)` → `(N,)` bool."""
        r = self.resolution
        # int32 cells and one flat gather: ~2× faster on CPU than int64 and a 3-index lookup
        index = ((points / self.bound * 0.5 + 0.5) * r).int().clamp_(0, r - 1)
        return self.occupied.view(-1).index_select(0, (index[:, 0] * r + index[:, 1]) * r + index[:, 2])


def intersect_sphere(origins: Tensor, directions: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Near/far distances `(N,)` of unit rays with the sphere |x| = radius, and a hit mask."""
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    hit = disc > 0
    root = torch.sqrt(disc.clamp(min=0))
    near = (-b - root).clamp(min=0)
    far = (-b + root).clamp(min=0)
    return near, far, hit & (far > near)


def alpha_transmittance(density: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """Alpha and the transmittance in front of each sample, `(R, S)` each."""
    alpha = 1 - torch.exp(-density * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], dim=1), dim=1)[:, :-1]
    return alpha, transmittance


def composite(density: Tensor, values: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """Alpha compositing. `density`, `deltas` `(R, S)`; `values` `(R, S, C)` → weights `(R, S)`, `(R, C)`."""
    alpha, transmittance = alpha_transmittance(density, deltas)
    weights = alpha * transmittance
    return weights, (weights[..., None] * values).sum(1)


class VolumeRenderer:
    """Renders an `ImplicitVolume` for a batch of cameras."""

    def __init__(self, config: RendererConfig, bound: float, device="cpu"):
        self.config = config
        self.bound = bound
        self.grid = (
            OccupancyGrid(config.occupancy_resolution, bound, config.occupancy_threshold, config.occupancy_decay, device)
            if config.occupancy_resolution > 0
            else None
        )
        self.environment = EnvironmentBackground().to(device) if config.background == "learned" else None

    def update_occupancy(self, field, step: int, generator: torch.Generator | None = None) -> None:
        if self.grid is not None and step % self.config.occupancy_update_every == 0:
            self.grid.update(field.density, generator)

    @torch.no_grad()
    def _visible(self, field, points: Tensor, index: Tensor, deltas: Tensor) -> Tensor | None:
        """Which samples `index` (at `points` `(N, 3)`) are worth the full query, `(N,)` bool (None:
        all): alpha ≥ min(`alpha_threshold`, the grid's mean optical depth) and transmittance ≥
        `early_stop_eps`, from a density-only pass."""
        c = self.config
        threshold = min(c.alpha_threshold, self.grid.mean_optical_depth)
        if threshold <= 0 and c.early_stop_eps <= 0:
            return None
        density = torch.zeros(deltas.numel(), device=points.device).index_put((index,), field.density(points))
        alpha, transmittance = alpha_transmittance(density.view(deltas.shape), deltas)
        visible = ((alpha >= threshold) & (transmittance >= c.early_stop_eps)).view(-1)
        return visible[index]

    def background(self, directions: Tensor, batch: int, generator: torch.Generator | None, training: bool) -> Tensor:
        """Background colours `(B, H*W, 3)` for ray directions `(B, H*W, 3)`."""
        c = self.config
        device = directions.device
        random = random_background(batch, c.random_background_range, generator, device)[:, None].expand_as(directions)
        solid = torch.tensor(c.background_color, device=device).expand_as(directions)
        if c.background == "solid" or (c.background == "random" and not training):
            return solid
        if c.background == "random":
            return random
        learned = self.environment(directions)
        if training and float(torch.rand(1, generator=generator)) < c.random_background_prob:
            return random
        return learned

    def render(
        self,
        field,
        cameras: Cameras,
        height: int,
        width: int | None = None,
        shading: str = "albedo",
        generator: torch.Generator | None = None,
        training: bool = True,
        compute_normals: bool = False,
        compute_depth: bool = False,
    ) -> RenderOutput:
        """Render `field` (`field(points) -> (σ, albedo)`; `field.with_normals(points) -> (σ,
        albedo, normals)` when normals are needed: shading other than albedo, or `compute_normals`
        for the orientation penalty). `depth` only with `compute_depth` (a training step never
        reads it)."""
        if shading not in SHADING_MODES:
            raise ValueError(f"unknown shading {shading!r}; valid: {', '.join(SHADING_MODES)}")
        width = width or height
        device = cameras.c2w.device
        batch = len(cameras)
        origins, directions = get_rays(cameras, height, width)
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
        lights = cameras.light_position.to(device).repeat_interleave(height * width, 0)  # (rays, 3)
        args = (field, shading, generator, training, compute_normals, compute_depth)
        per_pass = max(1, EVAL_SAMPLES_PER_PASS // self.config.num_samples)
        if training or compute_normals or origins.shape[0] <= per_pass:
            rgb, opacity, depth, composited_normal, orientation = self._render_rays(origins, directions, lights, *args)
        else:  # without training (no orientation penalty), in passes of `per_pass` rays: rays are independent
            passes = [self._render_rays(o, d, li, *args) for o, d, li in
                      zip(origins.split(per_pass), directions.split(per_pass), lights.split(per_pass))]
            rgb, opacity, depth, composited_normal = (
                None if parts[0] is None else torch.cat(parts) for parts in list(zip(*passes))[:4]
            )
            orientation = torch.zeros((), device=device)
        background = self.background(directions.view(batch, -1, 3), batch, generator, training).reshape(-1, 3)
        rgb = rgb + (1 - opacity) * background

        def image(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.view(batch, height, width, -1).permute(0, 3, 1, 2)

        return RenderOutput(image(rgb), image(opacity), image(depth), image(composited_normal), orientation)

    def _render_rays(self, origins: Tensor, directions: Tensor, lights: Tensor, field, shading: str,
                     generator: torch.Generator | None, training: bool, compute_normals: bool, compute_depth: bool):
        """`render` for rays `(R, 3)` (each with its camera's light `(R, 3)`) before the background:
        rgb `(R, 3)`, opacity `(R, 1)`, depth, composited normal and the orientation penalty."""
        c = self.config
        device = origins.device
        near, far, hit = intersect_sphere(origins, directions, self.bound)
        n_rays, n = origins.shape[0], c.num_samples
        span = (far - near).clamp(min=0)
        jitter = torch.rand(n_rays, n, generator=generator).to(device) if training else torch.full((n_rays, n), 0.5, device=device)
        t = near[:, None] + (torch.arange(n, device=device)[None] + jitter) / n * span[:, None]
        deltas = (span / n)[:, None].expand(-1, n)
        flat = (origins[:, None, :] + t[..., None] * directions[:, None, :]).reshape(-1, 3)
        active = hit[:, None].expand(-1, n).reshape(-1)
        if self.grid is not None:
            active = active & self.grid.query(flat)
        index = active.nonzero().squeeze(-1)
        queried = flat[index]
        if self.grid is not None and index.numel() > 0:
            visible = self._visible(field, queried, index, deltas)
            if visible is not None:
                index, queried = index[visible], queried[visible]
        need_normals = compute_normals or shading != "albedo"
        # Only the queried samples are shaded; the others keep σ = 0: alpha 0, a transmittance factor
        # of exactly 1, no weight. So each ray's queried samples, packed in order into the first
        # of `(n_rays, packed)` slots, composite to the same weights as the full `(n_rays, n)`
        # arrays (the sums over samples in another order), at a few % of their size and backward.
        ray = index // n
        counts = torch.bincount(ray, minlength=n_rays)
        packed = max(1, int(counts.max())) if index.numel() > 0 else 1
        slot = ray * packed + torch.arange(index.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[ray]
        density = torch.zeros(n_rays * packed, device=device)
        colour = torch.zeros(n_rays * packed, 3, device=device)
        normals = None
        if index.numel() > 0:
            if need_normals:
                sigma, albedo, normals = field.with_normals(queried)
            else:
                sigma, albedo = field(queried)
            if shading == "albedo":
                shaded = albedo
            elif shading == "normal":
                shaded = normals * 0.5 + 0.5
            else:
                light = lights[index // n]
                shade = diffuse_shade(normals, queried, light, c.ambient)
                shaded = albedo * shade if shading == "diffuse" else shade.expand(-1, 3)
            density = density.index_put((slot,), sigma)
            colour = colour.index_put((slot,), shaded)
        density, colour, deltas = density.view(n_rays, packed), colour.view(n_rays, packed, 3), deltas[:, :packed]

        weights, rgb = composite(density, colour, deltas)
        opacity = weights.sum(1, keepdim=True)
        depth = composited_normal = None
        if compute_depth:
            # expected termination depth inside each interval of constant density σ: front + δ·f(σδ),
            # f(x) = 1/x − 1/(eˣ − 1) (→ ½ for thin media, → 0 for opaque ones)
            front = torch.zeros(n_rays * packed, device=device).index_put((slot,), near[ray] + (index % n) * deltas[ray, 0])
            front = front.view(n_rays, packed)
            optical = (density * deltas).detach()
            inside = torch.where(
                optical < 1e-4, torch.full_like(optical, 0.5), 1 / optical.clamp(min=1e-4) - 1 / torch.expm1(optical.clamp(min=1e-4))
            )
            depth = (weights * (front + deltas * inside)).sum(1, keepdim=True) / opacity.clamp(min=1e-6)
        orientation = torch.zeros((), device=device)
        if compute_normals and normals is not None:
            sample_weights = weights.view(-1)[slot]
            composited_normal = torch.zeros(n_rays, 3, device=device).index_add(0, ray, sample_weights[:, None] * normals)
            # Ref-NeRF orientation loss: normals should not face away from the camera
            facing = (normals * directions[ray]).sum(-1).clamp(min=0) ** 2
            penalty = sample_weights.detach() * facing
            if c.orientation_reduction == "opaque":
                # threestudio/systems/magic3d.py loss_orient: Σ w·max(0, n·d)² / #(opacity > 0)
                orientation = penalty.sum() / (opacity > 0).sum().clamp(min=1)
            else:
                orientation = penalty.sum() / n_rays
        return rgb, opacity, depth, composited_normal, orientation
