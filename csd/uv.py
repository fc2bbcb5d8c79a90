"""UV atlas and texture baking: xatlas unwrap, UV-space rasterization, albedo bake, seam inpainting.

`unwrap` cuts the mesh into charts and packs them into one square atlas (xatlas; vertices are split
along seams). `rasterize_uv` finds, for every texel centre, the face and barycentric coordinates that
cover it, so any per-vertex attribute — the 3D position, hence the field's albedo there — can be
written into the texture. `fill_empty` copies each empty texel from its nearest covered texel, so
bilinear lookups at chart borders and mip-maps never blend in background.

Texture convention (OpenGL/glTF, as `stages.assets`): `(H, W, 3)` images, row 0 is v = 1, texel
`(row, col)` has its centre at `u = (col + 0.5) / W`, `v = 1 − (row + 0.5) / H`.

Arrays only: no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from csd.fields import ImplicitField

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


def validate_unwrap(config: UnwrapConfig) -> None:
    if config.resolution < 16:
        raise ValueError(f"texture resolution must be >= 16, got {config.resolution}")
    if config.padding < 0 or config.max_iterations < 1:
        raise ValueError(f"padding must be >= 0 and max_iterations >= 1, got {config.padding}, {config.max_iterations}")
    if config.max_cost <= 0 or config.max_chart_area < 0 or config.max_boundary_length < 0:
        raise ValueError(
            f"max_cost must be > 0, max_chart_area and max_boundary_length >= 0; got "
            f"{config.max_cost}, {config.max_chart_area}, {config.max_boundary_length}"
        )


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
    validate_unwrap(config)
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


def _uv_to_pixel(uvs: np.ndarray, height: int, width: int) -> np.ndarray:
    """UVs → continuous pixel coordinates (x right, y down); texel (row, col) centre is (col + ½, row + ½)."""
    uvs = np.asarray(uvs, dtype=np.float64)
    return np.stack([uvs[..., 0] * width, (1.0 - uvs[..., 1]) * height], axis=-1)


def rasterize_uv(uvs: np.ndarray, faces: np.ndarray, resolution: int, max_candidates: int = 2_000_000) -> UVRaster:
    """Which face covers each texel centre of a `resolution`² texture, and where (vectorised over faces,
    in batches of at most `max_candidates` texel tests)."""
    triangles = _uv_to_pixel(uvs, resolution, resolution)[np.asarray(faces)]  # (F, 3, 2)
    face_index = np.full(resolution * resolution, -1, dtype=np.int64)
    barycentric = np.zeros((resolution * resolution, 3))
    # texel centres inside each triangle's box: col in [ceil(min − ½), floor(max − ½)]
    low = np.clip(np.ceil(triangles.min(1) - 0.5), 0, resolution - 1).astype(np.int64)
    high = np.clip(np.floor(triangles.max(1) - 0.5), 0, resolution - 1).astype(np.int64)
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    doubled_area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    sizes = np.where(np.abs(doubled_area) > 1e-12, np.maximum(high - low + 1, 0).prod(1), 0)
    ends = np.cumsum(sizes)
    start = 0
    while start < len(sizes):
        end = max(start + 1, int(np.searchsorted(ends, ends[start] - sizes[start] + max_candidates, side="right")))
        ids = np.repeat(np.arange(start, end), sizes[start:end])
        offset = np.arange(len(ids)) - np.repeat(ends[start:end] - sizes[start:end] - (ends[start] - sizes[start]), sizes[start:end])
        width = high[ids, 0] - low[ids, 0] + 1
        col, row = low[ids, 0] + offset % width, low[ids, 1] + offset // width
        # edge functions of the texel centre (col + ½, row + ½)
        px, py = col + 0.5 - a[ids, 0], row + 0.5 - a[ids, 1]
        ab, ac = b[ids] - a[ids], c[ids] - a[ids]
        w_b = (px * ac[:, 1] - py * ac[:, 0]) / doubled_area[ids]
        w_c = (ab[:, 0] * py - ab[:, 1] * px) / doubled_area[ids]
        weights = np.stack([1.0 - w_b - w_c, w_b, w_c], axis=-1)
        inside = (weights >= -1e-9).all(-1)
        texel = row[inside] * resolution + col[inside]
        face_index[texel] = ids[inside]
        barycentric[texel] = weights[inside]
        start = end
    return UVRaster(face_index.reshape(resolution, resolution), barycentric.reshape(resolution, resolution, 3))


def interpolate(raster: UVRaster, faces: np.ndarray, attributes: np.ndarray) -> np.ndarray:
    """Per-vertex `attributes` `(V, C)` → values `(N, C)` at the `N` covered texels (row-major order)."""
    mask = raster.mask
    corners = np.asarray(attributes, dtype=np.float64)[np.asarray(faces)[raster.face_index[mask]]]  # (N, 3, C)
    return np.einsum("nk,nkc->nc", raster.barycentric[mask], corners)


def fill_empty(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Copy every texel outside `mask` `(H, W)` from its nearest texel inside (inpainting across seams
    and the background, so bilinear filtering at chart borders only blends chart colours)."""
    from scipy.ndimage import distance_transform_edt

    if not mask.any():
        raise ValueError("no texel is covered: nothing to fill the texture from")
    nearest = distance_transform_edt(~mask, return_distances=False, return_indices=True)
    return image[nearest[0], nearest[1]]


def to_texture(colors: np.ndarray, raster: UVRaster) -> np.ndarray:
    """Colours `(N, 3)` in [0, 1] at the covered texels → inpainted `(H, W, 3)` uint8 texture."""
    mask = raster.mask
    image = np.zeros((*mask.shape, 3))
    image[mask] = colors
    return (np.clip(fill_empty(image, mask), 0.0, 1.0) * 255).round().astype(np.uint8)


@torch.no_grad()
def bake_albedo(
    field: ImplicitField, mesh: UVMesh, raster: UVRaster, chunk_size: int = 262_144, device: str | torch.device = "cpu"
) -> np.ndarray:
    """The field's albedo at each texel's surface point → `(H, W, 3)` uint8 texture."""
    points = torch.from_numpy(interpolate(raster, mesh.faces, mesh.vertices)).float()
    colors = [field.albedo(chunk.to(device)).float().cpu() for chunk in points.split(chunk_size)]
    return to_texture(torch.cat(colors).numpy() if colors else np.zeros((0, 3)), raster)


def bake_vertex_colors(mesh: UVMesh, vertex_colors: np.ndarray, raster: UVRaster) -> np.ndarray:
    """Colours `(V_in, 3)` in [0, 1] of the unsplit mesh's vertices → `(H, W, 3)` uint8 texture."""
    return to_texture(interpolate(raster, mesh.faces, np.asarray(vertex_colors)[mesh.vertex_map]), raster)


def sample_texture(texture: np.ndarray, uvs: np.ndarray) -> np.ndarray:
    """Bilinear lookup (clamped at the edges) of `(H, W, C)` `texture` at `(..., 2)` UVs → `(..., C)` floats."""
    height, width = texture.shape[:2]
    pixel = _uv_to_pixel(uvs, height, width) - 0.5
    x0 = np.clip(np.floor(pixel[..., 0]), 0, width - 1).astype(np.int64)
    y0 = np.clip(np.floor(pixel[..., 1]), 0, height - 1).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx = np.clip(pixel[..., 0] - x0, 0.0, 1.0)[..., None]
    fy = np.clip(pixel[..., 1] - y0, 0.0, 1.0)[..., None]
    image = texture.astype(np.float64)
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy
