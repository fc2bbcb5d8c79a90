"""Rasterizing textured triangle meshes: one interface, two backends chosen by name.

- `cpu`: a vectorised torch rasterizer (`csd.raster.cpu`); it runs on any device and is
  anti-aliased by supersampling.
- `nvdiffrast`: NVIDIA's CUDA rasterizer (`csd.raster.nvdiffrast_backend`), anti-aliased with its
  analytic `antialias`; imported only when chosen, so machines without CUDA never load it.
- `auto`: nvdiffrast when CUDA and the package are present, otherwise cpu.

Both use the camera model of `csd.cameras` (pixel centres exactly where `get_rays` shoots its
rays, row 0 at the top). Geometry is fixed in the `texture` and `edit` stages, so gradients flow to
textures and interpolated attributes, never to vertex positions.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from csd.cameras import Cameras
from csd.checks import between, interval, optional, unit_rgb, validate, whole
from csd.shading import diffuse_shade, random_background
from csd.views import render_orbit

RasterizerName = Literal["cpu", "nvdiffrast", "auto"]
RASTERIZERS = get_args(RasterizerName)
MESH_SHADING_MODES = ("albedo", "diffuse")
"""`albedo`: the texture alone; `diffuse`: lambert from the camera's point light plus ambient."""


@dataclass
class Fragments:
    """What rasterization leaves per pixel.

    `face_id` `(B, H, W)` long, -1 where no triangle covers the pixel centre; `barycentrics`
    `(B, H, W, 3)` perspective-correct weights of the face's three vertices (zeros where empty);
    `depth` `(B, H, W)` view-space depth, the distance along the camera's viewing axis (0 where
    empty); `state` holds what a backend's `antialias` needs (nvdiffrast: its raster output and
    clip-space positions)."""

    face_id: Tensor
    barycentrics: Tensor
    depth: Tensor
    state: Any = None

    @property
    def mask(self) -> Tensor:
        """`(B, H, W)` bool: covered pixels."""
        return self.face_id >= 0


class Rasterizer(ABC):
    """A rasterizer backend. `interpolate` and `texture` have torch implementations shared by all
    backends; a backend overrides them where it has faster kernels."""

    name: str
    default_supersample: int
    """Samples per pixel side the `MeshRenderer` renders at when the config does not say."""

    @abstractmethod
    def rasterize(self, vertices: Tensor, faces: Tensor, cameras: Cameras, height: int, width: int) -> Fragments:
        """World-space `vertices` `(V, 3)` and `faces` `(F, 3)` seen by each camera → `Fragments`."""

    def interpolate(self, attributes: Tensor, faces: Tensor, fragments: Fragments) -> Tensor:
        """Vertex `attributes` `(V, C)` → `(B, H, W, C)` (zeros where empty); differentiable w.r.t. them."""
        mask = fragments.mask
        face = faces[fragments.face_id.clamp(min=0)]  # (B, H, W, 3)
        corner_values = attributes[face]  # (B, H, W, 3, C)
        values = (fragments.barycentrics[..., None] * corner_values).sum(-2)
        return values * mask[..., None]

    def texture(self, image: Tensor, uv: Tensor) -> Tensor:
        """Bilinear lookup `(B, H, W, C)` of `image` at `uv` `(B, H, W, 2)` (see `bilinear_lookup`)."""
        return bilinear_lookup(image, uv)

    def antialias(self, image: Tensor, fragments: Fragments, faces: Tensor) -> Tensor:
        """Smooth silhouette edges of `image` `(B, H, W, C)`; the identity for supersampling backends."""
        return image


def bilinear_lookup(image: Tensor, uv: Tensor) -> Tensor:
    """Bilinear texture lookup, differentiable w.r.t. `image`: the project's one texture filter.

    `image` `(Ht, Wt, C)` with row 0 at v = 1 (as `TexturedMesh.texture`); `uv` `(B, ..., 2)` in
    [0, 1], v up; texel centres at `(i + 0.5) / Wt`, coordinates beyond the edge clamp to the
    border texels (nvdiffrast's `boundary_mode="clamp"`). Returns `(B, ..., C)`."""
    batch, shape = uv.shape[0], uv.shape[1:-1]
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], -1).reshape(batch, -1, 1, 2)
    source = image.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)
    sampled = F.grid_sample(source, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return sampled[..., 0].permute(0, 2, 1).reshape(batch, *shape, image.shape[-1])


def nvdiffrast_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("nvdiffrast") is not None


def get_rasterizer(name: str, device: str | torch.device = "cpu") -> Rasterizer:
    """The backend called `name` (`RASTERIZERS`) for tensors on `device`."""
    if name not in RASTERIZERS:
        raise ValueError(f"unknown rasterizer {name!r}; valid: {', '.join(RASTERIZERS)}")
    device = torch.device(device)
    if name == "auto":
        name = "nvdiffrast" if device.type == "cuda" and nvdiffrast_available() else "cpu"
    if name == "cpu":
        from csd.raster.cpu import CpuRasterizer

        return CpuRasterizer()
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"the nvdiffrast rasterizer needs a CUDA device (got {device}); use rasterizer 'cpu' or 'auto'")
    if importlib.util.find_spec("nvdiffrast") is None:
        raise RuntimeError("the nvdiffrast rasterizer needs the nvdiffrast package: pip install 'csd-asset[gpu]'")
    from csd.raster.nvdiffrast_backend import NvdiffrastRasterizer

    return NvdiffrastRasterizer(device)


def rasterize_uv(uvs, faces, height: int, width: int) -> Fragments:
    """The UV layout rasterized into a `(height, width)` texture (batch of one; row 0 at v = 1):
    which face covers each texel centre `((col + ½) / W, 1 − (row + ½) / H)` and its (linear)
    barycentrics. `uvs` `(V, 2)`, `faces` `(F, 3)`; centres on an edge count as covered, overlaps go
    to the lower face id."""
    from csd.raster.cpu import rasterize_screen

    uv = torch.as_tensor(np.asarray(uvs), dtype=torch.float32)
    pixels = torch.stack([uv[:, 0] * width, (1 - uv[:, 1]) * height], -1)[None]
    return rasterize_screen(pixels, torch.ones(1, uv.shape[0]), torch.as_tensor(np.asarray(faces), dtype=torch.long), height, width)


@dataclass(frozen=True)
class MeshRendererConfig:
    """Rasterizer backend, anti-aliasing, shading and background of textured-mesh renders."""

    rasterizer: RasterizerName = "auto"
    """`cpu`, `nvdiffrast` or `auto` (nvdiffrast when CUDA and the package are present)."""
    supersample: int | None = None
    """Rasterize at this many samples per pixel side and average down; None: the backend's default
    (cpu 2 — its only anti-aliasing; nvdiffrast 1, it anti-aliases analytically)."""
    normals: Literal["flat", "smooth"] = "flat"
    """`flat` (face normals: cubes keep sharp edges) or `smooth` (area-weighted vertex normals,
    welded across UV seams)."""
    ambient: float = 0.4
    """Ambient share of `diffuse` shading; the rest is lambertian from the camera's point light
    (as `RendererConfig.ambient` of the volume renderer)."""
    background: Literal["solid", "random"] = "random"
    """`solid` (background_color) or `random` (a random light colour per view while training, like
    the `nerf` stage; solid otherwise)."""
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """RGB in [0, 1]."""
    random_background_range: tuple[float, float] = (0.65, 1.0)
    """Per-channel range of the random background colour."""

    def __post_init__(self):
        validate(self, {
            "supersample": optional(whole(1)),
            "ambient": between(0, 1),
            "background_color": unit_rgb,
            "random_background_range": interval(0, 1),
        })


@dataclass
class MeshRenderOutput:
    """`rgb` `(B, 3, H, W)` in [0, 1] composited on the background; `opacity` `(B, 1, H, W)` covered share."""

    rgb: Tensor
    opacity: Tensor


def face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """`(F, 3)` unit normals (counter-clockwise winding faces out)."""
    corners = vertices[faces]
    return F.normalize(torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1), dim=-1)


def smooth_vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """`(V, 3)` area-weighted vertex normals, shared by vertices at the same position (UV seams
    split vertices; their normals must not split too)."""
    _, welded = np.unique(vertices.detach().cpu().numpy(), axis=0, return_inverse=True)
    welded = torch.from_numpy(welded.reshape(-1)).to(vertices.device)
    corners = vertices[faces]
    weighted = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)  # |n| = 2·area
    accumulated = torch.zeros(int(welded.max()) + 1, 3, device=vertices.device)
    accumulated.index_add_(0, welded[faces].reshape(-1), weighted.repeat_interleave(3, 0))
    return F.normalize(accumulated[welded], dim=-1)


class MeshRenderer:
    """Renders one fixed mesh with a texture image for batches of cameras.

    `rasterize` (texture-independent, no gradient), the texture lookup at `uv(fragments)` and
    `shade` (differentiable w.r.t. the albedo) are separate so a training loop can time them apart
    and look up a texture of its own parameterisation; `render` does all three for an image."""

    def __init__(self, config: MeshRendererConfig, vertices, faces, uvs, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.rasterizer = get_rasterizer(config.rasterizer, self.device)
        self.supersample = config.supersample or self.rasterizer.default_supersample
        self.vertices = torch.as_tensor(np.asarray(vertices), dtype=torch.float32, device=self.device)
        self.faces = torch.as_tensor(np.asarray(faces), dtype=torch.long, device=self.device)
        self.uvs = torch.as_tensor(np.asarray(uvs), dtype=torch.float32, device=self.device)
        if config.normals == "smooth":
            self._vertex_normals = smooth_vertex_normals(self.vertices, self.faces)
        else:
            self._face_normals = face_normals(self.vertices, self.faces)

    def rasterize(self, cameras: Cameras, resolution: int) -> Fragments:
        """Fragments at `resolution × supersample` pixels a side."""
        size = resolution * self.supersample
        return self.rasterizer.rasterize(self.vertices, self.faces, cameras.to(self.device), size, size)

    def uv(self, fragments: Fragments) -> Tensor:
        """Texture coordinates `(B, H, W, 2)` of the fragments (zeros where empty)."""
        return self.rasterizer.interpolate(self.uvs, self.faces, fragments)

    def shade(
        self,
        albedo: Tensor,
        fragments: Fragments,
        cameras: Cameras,
        shading: str = "albedo",
        generator: torch.Generator | None = None,
        training: bool = True,
    ) -> MeshRenderOutput:
        """Per-fragment `albedo` `(B, H, W, 3)` in [0, 1] (e.g. a texture lookup at `uv(fragments)`)
        → lit, composited on the background, anti-aliased and averaged down to the render size."""
        if shading not in MESH_SHADING_MODES:
            raise ValueError(f"unknown shading {shading!r}; valid: {', '.join(MESH_SHADING_MODES)}")
        c = self.config
        cameras = cameras.to(self.device)
        batch = fragments.face_id.shape[0]
        mask = fragments.mask[..., None].float()
        colour = albedo
        if shading == "diffuse":
            points = self.rasterizer.interpolate(self.vertices, self.faces, fragments)
            if c.normals == "smooth":
                normal = F.normalize(self.rasterizer.interpolate(self._vertex_normals, self.faces, fragments), dim=-1)
            else:
                normal = self._face_normals[fragments.face_id.clamp(min=0)]
            # two-sided: a face seen from behind is lit as if it faced the camera
            to_camera = cameras.position[:, None, None, :] - points
            normal = torch.where((normal * to_camera).sum(-1, keepdim=True) < 0, -normal, normal)
            colour = colour * diffuse_shade(normal, points, cameras.light_position[:, None, None, :], c.ambient)
        background = self._background(batch, generator, training).view(batch, 1, 1, 3)
        rgba = torch.cat([colour * mask + background * (1 - mask), mask], -1)
        rgba = self.rasterizer.antialias(rgba, fragments, self.faces)
        image = rgba.permute(0, 3, 1, 2)
        if self.supersample > 1:
            image = F.avg_pool2d(image, self.supersample)
        return MeshRenderOutput(image[:, :3].clamp(0, 1), image[:, 3:])

    def render(
        self,
        texture: Tensor,
        cameras: Cameras,
        resolution: int,
        shading: str = "albedo",
        generator: torch.Generator | None = None,
        training: bool = True,
    ) -> MeshRenderOutput:
        """Render the texture image `(Ht, Wt, 3)` in [0, 1] (row 0 at v = 1) at `resolution`²."""
        fragments = self.rasterize(cameras, resolution)
        albedo = self.rasterizer.texture(texture, self.uv(fragments))
        return self.shade(albedo, fragments, cameras, shading, generator, training)

    def turntable(
        self, texture: Tensor, views: int, resolution: int, shading: str = "albedo", elevation: float = 15.0, chunk: int = 4
    ) -> Tensor:
        """`(views, 3, R, R)` renders of `texture` from orbit cameras (`csd.views.render_orbit`) on
        the solid background: the previews, turntables and evaluator views of every mesh stage."""
        return render_orbit(lambda cameras: self.render(texture, cameras, resolution, shading, training=False).rgb, views, elevation, chunk)

    def _background(self, batch: int, generator: torch.Generator | None, training: bool) -> Tensor:
        """`(B, 3)` background colours (as `VolumeRenderer.background`)."""
        c = self.config
        if c.background == "random" and training:
            return random_background(batch, c.random_background_range, generator, self.device)
        return torch.tensor(c.background_color, dtype=torch.float32, device=self.device).expand(batch, 3)


__all__ = [
    "RASTERIZERS",
    "MESH_SHADING_MODES",
    "Fragments",
    "Rasterizer",
    "get_rasterizer",
    "nvdiffrast_available",
    "MeshRendererConfig",
    "MeshRenderOutput",
    "MeshRenderer",
    "face_normals",
    "smooth_vertex_normals",
    "bilinear_lookup",
    "rasterize_uv",
]
