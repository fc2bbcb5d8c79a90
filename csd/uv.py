"""UV atlas and texture baking: xatlas unwrap, UV-space rasterization, albedo bake, seam inpainting.

`unwrap` cuts the mesh into charts and packs them into one square atlas (xatlas; vertices are split
along seams). `rasterize_uv` finds, for every texel centre, the face and barycentric coordinates that
cover it, so any per-vertex attribute — the 3D position, hence the field's albedo there — can be
written into the texture (`csd.raster.rasterize_uv`, the rasterizer every UV layout goes through).
`to_texture` fills each empty texel from its nearest covered texel (`csd.texture.fill_seams`), so
bilinear lookups at chart borders and mip-maps never blend in background; `sample_texture` is the
array form of the one bilinear lookup (`csd.raster.bilinear_lookup`).

Texture convention (OpenGL/glTF, as `stages.assets`): `(H, W, 3)` images, row 0 is v = 1, texel
`(row, col)` has its centre at `u = (col + 0.5) / W`, `v = 1 − (row + 0.5) / H`.

Arrays only: no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from csd.checks import at_least, validate, whole
from csd.fields import ImplicitField
from csd.raster import bilinear_lookup, face_normals
from csd.raster import rasterize_uv as rasterize_layout
from csd.renderer import composite
from csd.texture import fill_seams

# Sizes the first packing: below the 0.6-0.85 share xatlas usually fills, so the atlas nearly always
# fits the texture at once (it is then scaled up to fill it); a second packing costs a second unwrap.
_EXPECTED_UTILIZATION = 0.45


@dataclass(frozen=True)
class UnwrapConfig:
    """xatlas chart and pack options (names as in xatlas)."""

    resolution: int = 1024
    """Side of the square texture the atlas is packed for, in texels."""
    padding: int = 2
    """Empty texels kept between charts (xatlas also leaves room for bilinear filtering)."""
    max_chart_area: float = 0.0
    """Charts larger than this surface area (world units²) are split; 0: no limit."""
    max_boundary_length: float = 0.0
    """Charts with a longer boundary (world units) are split; 0: no limit."""
    max_cost: float = 2.0
    """Chart growing stops when a face would cost more than this (lower: more, flatter charts)."""
    max_iterations: int = 1
    """Chart-optimisation iterations (more: better charts, slower)."""
    rotate_charts: bool = True
    """Rotate charts to pack them tighter."""
    brute_force: bool = False
    """Try every chart placement (slow, tightest packing)."""

    def __post_init__(self):
        validate(self, {
            "resolution": whole(16), "padding": whole(0), "max_chart_area": at_least(0),
            "max_boundary_length": at_least(0), "max_cost": at_least(0, exclusive=True), "max_iterations": whole(1),
        })


@dataclass
class UVMesh:
    """A mesh split along the atlas seams: `vertices` `(V, 3)` float32, `faces` `(F, 3)` int64, `uvs`
    `(V, 2)` float32 in [0, 1], `vertex_map` `(V,)` int64 index of each vertex in the input mesh,
    `chart_index` `(F,)` int64; `atlas_size` the packed atlas side in texels before scaling to the
    texture, `utilization` the share of the atlas covered by charts."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    vertex_map: np.ndarray
    chart_index: np.ndarray
    atlas_size: int
    utilization: float

    @property
    def charts(self) -> int:
        return int(self.chart_index.max()) + 1 if len(self.chart_index) else 0


@dataclass
class UVRaster:
    """Texel coverage of a UV layout: `face_index` `(H, W)` int64 (−1: no face covers the texel centre)
    and `barycentric` `(H, W, 3)` float64 weights of that face's corners."""

    face_index: np.ndarray
    barycentric: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """`(H, W)` bool: texels covered by a face."""
        return self.face_index >= 0


def _generate(vertices: np.ndarray, faces: np.ndarray, config: UnwrapConfig, texels_per_unit: float):
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices.astype(np.float32), faces.astype(np.uint32))
    chart_options = xatlas.ChartOptions()
    chart_options.max_chart_area = config.max_chart_area
    chart_options.max_boundary_length = config.max_boundary_length
    chart_options.max_cost = config.max_cost
    chart_options.max_iterations = config.max_iterations
    pack_options = xatlas.PackOptions()
    # resolution 0: one atlas of whatever size `texels_per_unit` needs (a fixed resolution may spill
    # charts into several atlases, which would overlap in one texture)
    pack_options.resolution = 0
    pack_options.texels_per_unit = texels_per_unit
    pack_options.padding = config.padding
    pack_options.bilinear = True
    pack_options.rotate_charts = config.rotate_charts
    pack_options.bruteForce = config.brute_force
    atlas.generate(chart_options, pack_options)
    return atlas


def unwrap(vertices: np.ndarray, faces: np.ndarray, config: UnwrapConfig) -> UVMesh:
    """xatlas charts packed into one square atlas that fills a `config.resolution`² texture.

    Texel density is first sized for a modest fill; when the packed atlas still comes out larger than
    the texture it is packed once more at the density that fits, so padding never shrinks below
    `config.padding` texels. A smaller atlas is scaled up to the texture (padding grows with it)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    area = 0.5 * float(np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())
    if area <= 0:
        raise ValueError(f"cannot unwrap a mesh of zero area ({len(faces)} faces)")
    texels_per_unit = config.resolution * math.sqrt(_EXPECTED_UTILIZATION / area)
    atlas = _generate(vertices, faces, config, texels_per_unit)
    size = max(atlas.width, atlas.height)
    if size > config.resolution:
        atlas = _generate(vertices, faces, config, texels_per_unit * 0.98 * config.resolution / size)
        size = max(atlas.width, atlas.height)
    vertex_map, indices, uvs = atlas[0]
    # xatlas normalises by the (non-square) atlas width/height; re-normalise by the square side
    uvs = uvs.astype(np.float64) * np.array([atlas.width, atlas.height]) / size
    chart_index = np.zeros(len(indices), dtype=np.int64)
    for chart in range(atlas.get_mesh_chart_count(0)):
        chart_index[np.asarray(atlas.get_mesh_chart(0, chart).faces, dtype=np.int64)] = chart
    return UVMesh(
        vertices=vertices[vertex_map].astype(np.float32),
        faces=indices.astype(np.int64),
        uvs=uvs.astype(np.float32),
        vertex_map=vertex_map.astype(np.int64),
        chart_index=chart_index,
        atlas_size=int(size),
        utilization=float(atlas.utilization),
    )


def rasterize_uv(uvs: np.ndarray, faces: np.ndarray, resolution: int) -> UVRaster:
    """Which face covers each texel centre of a `resolution`² texture, and where."""
    fragments = rasterize_layout(uvs, faces, resolution, resolution)
    return UVRaster(fragments.face_id[0].numpy().astype(np.int64), fragments.barycentrics[0].double().numpy())


def interpolate(raster: UVRaster, faces: np.ndarray, attributes: np.ndarray) -> np.ndarray:
    """Per-vertex `attributes` `(V, C)` → values `(N, C)` at the `N` covered texels (row-major order)."""
    mask = raster.mask
    corners = np.asarray(attributes, dtype=np.float64)[np.asarray(faces)[raster.face_index[mask]]]  # (N, 3, C)
    return np.einsum("nk,nkc->nc", raster.barycentric[mask], corners)


def to_texture(colors: np.ndarray, raster: UVRaster) -> np.ndarray:
    """Colours `(N, 3)` in [0, 1] at the covered texels → inpainted `(H, W, 3)` uint8 texture."""
    mask = raster.mask
    image = np.zeros((*mask.shape, 3))
    image[mask] = colors
    return (np.clip(fill_seams(image, mask), 0.0, 1.0) * 255).round().astype(np.uint8)


@torch.no_grad()
def bake_albedo(
    field: ImplicitField, mesh: UVMesh, raster: UVRaster, chunk_size: int = 262_144, device: str | torch.device = "cpu",
    depth: float = 0.0, samples: int = 32,
) -> np.ndarray:
    """The field's colour at each texel's surface point → `(H, W, 3)` uint8 texture.

    `depth` 0: the albedo at the point. `depth` > 0 (a fraction of `field.bound`): the albedo a view
    straight onto the surface sees, composited (`csd.renderer.composite`) at `samples` points along the
    inward face normal from `depth` outside the point to `depth` inside it; what the segment leaves
    transparent takes the albedo at the point. The isosurface a mesh is cut at need not be where the
    renders take their colour: the toy nerfs' spheres wrap a thin, nearly transparent black shell around
    their coloured inside, and the mesh level runs through it (README, "The bake reads what the renders show")."""
    points = torch.from_numpy(interpolate(raster, mesh.faces, mesh.vertices)).float()
    normals = face_normals(torch.from_numpy(mesh.vertices).float(), torch.from_numpy(mesh.faces))[
        torch.from_numpy(raster.face_index[raster.mask])]
    offsets = (torch.linspace(depth, -depth, samples) * field.bound).to(device)  # outside → inside, world units
    deltas = torch.full((1, samples), 2 * depth * field.bound / (samples - 1), device=device)
    colors, per_chunk = [], max(1, chunk_size // samples) if depth > 0 else chunk_size
    for chunk, normal in zip(points.split(per_chunk), normals.split(per_chunk)):
        chunk, normal = chunk.to(device), normal.to(device)
        color = field.albedo(chunk).float()
        if depth > 0:
            along = (chunk[:, None] + offsets[None, :, None] * normal[:, None]).reshape(-1, 3)
            density = field.density(along).float().view(len(chunk), samples)
            weights, seen = composite(density, field.albedo(along).float().view(len(chunk), samples, 3), deltas)
            color = seen + (1 - weights.sum(1, keepdim=True)) * color
        colors.append(color.cpu())
    return to_texture(torch.cat(colors).numpy() if colors else np.zeros((0, 3)), raster)


def bake_vertex_colors(mesh: UVMesh, vertex_colors: np.ndarray, raster: UVRaster) -> np.ndarray:
    """Colours `(V_in, 3)` in [0, 1] of the unsplit mesh's vertices → `(H, W, 3)` uint8 texture."""
    return to_texture(interpolate(raster, mesh.faces, np.asarray(vertex_colors)[mesh.vertex_map]), raster)


def sample_texture(texture: np.ndarray, uvs: np.ndarray) -> np.ndarray:
    """Bilinear lookup (clamped at the edges) of `(H, W, C)` `texture` at `(..., 2)` UVs → `(..., C)` floats."""
    uvs = np.asarray(uvs, dtype=np.float32)
    image = torch.from_numpy(np.ascontiguousarray(texture, dtype=np.float32))
    sampled = bilinear_lookup(image, torch.from_numpy(uvs.reshape(1, -1, 2)))
    return sampled[0].double().numpy().reshape(*uvs.shape[:-1], image.shape[-1])
