"""From an implicit field to a clean triangle mesh: density grid, isosurface, clean-up, statistics.

`extract_isosurface` samples the field's density on a grid in chunks — a coarse pass over the whole
bounding cube first, whose occupied cells tighten the box the fine grid covers — and runs marching
cubes (scikit-image, Lewiner). `clean_mesh` drops small components and degenerate geometry, closes
small holes, remeshes isotropically and decimates to a face budget with pymeshlab, and orients the
faces outward. `mesh_stats` measures the result (previews: `csd.raster.MeshRenderer`).

Arrays only: no files. World frame z-up, the field lives in `[-bound, bound]³`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from csd.checks import at_least, validate, whole
from csd.fields import ImplicitField

AUTO = "auto"

# Transmittance 0.5 ↔ optical depth ln 2: where the volume renderer's accumulated opacity reaches one half.
_HALF_OPACITY_DEPTH = math.log(2.0)


@dataclass(frozen=True)
class ExtractionConfig:
    """Density grid and isosurface level."""

    resolution: int = 256
    """Fine-grid samples along the longest side of the tightened box (voxels are cubes)."""
    coarse_resolution: int = 64
    """Samples per side of the coarse pass over the whole `[-bound, bound]³` cube."""
    threshold: float | Literal["auto"] = 25.0
    """Density level of the surface (threestudio implicit-volume `isosurface_threshold`: 25), or `auto`:
    the level whose surface, seen along the coarse grid's axes, has the silhouette the volume renderer
    draws at opacity 0.5 (see `auto_threshold`). `auto` suits fields whose density scale is not the
    official one (the toy nerf)."""
    bbox_margin: float = 0.1
    """The box of occupied coarse cells grows by this fraction of its size (half on each side)."""
    chunk_size: int = 262_144
    """Points per field query; bounds memory whatever the grid size."""

    def __post_init__(self):
        def threshold(value):
            if value == AUTO:
                return None
            problem = at_least(0, exclusive=True)(value)
            return problem and f"{problem}; valid: a positive density or {AUTO!r}"

        validate(self, {
            "resolution": whole(8), "coarse_resolution": whole(8), "threshold": threshold,
            "bbox_margin": at_least(0), "chunk_size": whole(1),
        })


@dataclass(frozen=True)
class CleanupConfig:
    """pymeshlab clean-up, remeshing and decimation."""

    min_component_ratio: float = 0.01
    """Drop connected components with fewer faces than this fraction of the largest one."""
    max_hole_edges: int = 30
    """Close holes bounded by at most this many edges."""
    remesh_iterations: int = 3
    """Isotropic explicit remeshing iterations (0 skips remeshing)."""
    target_edge_length: float = 0.0
    """Remeshing edge length in world units; 0 derives it from `target_faces` (about twice that many
    equilateral faces, which decimation then halves where the surface is flattest)."""
    target_faces: int = 20_000
    """Face count after quadric edge-collapse decimation (0 keeps the remeshed count)."""

    def __post_init__(self):
        def ratio(value):
            problem = at_least(0)(value)
            return problem or (f"{value!r} must be < 1" if value >= 1 else None)

        validate(self, {
            "min_component_ratio": ratio, "max_hole_edges": whole(0), "remesh_iterations": whole(0),
            "target_edge_length": at_least(0), "target_faces": whole(0),
        })


class EmptyIsosurfaceError(ValueError):
    """Marching cubes found no surface at the requested level."""


@dataclass
class DensityGrid:
    """`values` `(X, Y, Z)` float32 densities sampled at `origin + index · spacing` (world units)."""

    values: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray

    def to_world(self, index_coords: np.ndarray) -> np.ndarray:
        """`(N, 3)` fractional grid indices → `(N, 3)` world points."""
        return self.origin + index_coords * self.spacing


@dataclass
class Isosurface:
    """Marching-cubes output: `vertices` `(V, 3)` float64 world, `faces` `(F, 3)` int64 (outward
    winding), the `level` used, the fine grid's density range and box, and seconds per step."""

    vertices: np.ndarray
    faces: np.ndarray
    level: float
    density_range: tuple[float, float]
    grid_shape: tuple[int, int, int]
    box_min: np.ndarray
    box_max: np.ndarray
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass
class CleanMesh:
    """`vertices` `(V, 3)` float64, `faces` `(F, 3)` int64, optional `vertex_colors` `(V, 4)` in [0, 1];
    seconds per clean-up step."""

    vertices: np.ndarray
    faces: np.ndarray
    vertex_colors: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@torch.no_grad()
def sample_density(
    field: ImplicitField, box_min: np.ndarray, box_max: np.ndarray, resolution: int, chunk_size: int, device: str | torch.device = "cpu"
) -> DensityGrid:
    """Density on a grid of cubic voxels covering `[box_min, box_max]`, `resolution` samples along the
    longest side. Points outside the bounding sphere get density 0: the renderer never sees them."""
    box_min, box_max = np.asarray(box_min, dtype=np.float64), np.asarray(box_max, dtype=np.float64)
    step = float((box_max - box_min).max()) / (resolution - 1)
    shape = tuple(int(n) for n in np.maximum(np.ceil((box_max - box_min) / step - 1e-9).astype(int) + 1, 2))
    origin = 0.5 * (box_min + box_max) - 0.5 * step * (np.array(shape) - 1)
    values = np.empty(int(np.prod(shape)), dtype=np.float32)
    origin_t = torch.tensor(origin, dtype=torch.float64, device=device)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    sizes = torch.tensor(shape, device=device)
    for start in range(0, values.size, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, values.size), device=device)
        index = (flat[:, None] // strides) % sizes
        points = (origin_t + index.double() * step).float()
        density = field.density(points)
        density = torch.where(points.norm(dim=-1) <= field.bound, density, torch.zeros_like(density))
        values[start : start + len(flat)] = density.float().cpu().numpy()
    return DensityGrid(values.reshape(shape), origin, np.full(3, step))


def auto_threshold(grid: DensityGrid) -> float:
    """The level whose isosurface has the silhouette the volume renderer draws at opacity 0.5.

    Seen along each grid axis, a line of samples is opaque (accumulated opacity ≥ 0.5) when its optical
    depth Σ σ·Δ reaches ln 2, and it crosses the isosurface at level L when its largest density reaches
    L. Taking L as the k-th largest line maximum, k the number of opaque lines over the three axes,
    makes both silhouettes cover the same number of lines.
    """
    maxima, opaque = [], 0
    for axis in range(3):
        opaque += int((grid.values.sum(axis=axis, dtype=np.float64) * grid.spacing[axis] >= _HALF_OPACITY_DEPTH).sum())
        maxima.append(grid.values.max(axis=axis).ravel())
    if opaque == 0:
        raise EmptyIsosurfaceError(
            f"the field is transparent: no grid line reaches opacity 0.5 (density range "
            f"[{grid.values.min():.4g}, {grid.values.max():.4g}]); give a numeric threshold below the maximum"
        )
    maxima = np.concatenate(maxima)
    level = np.partition(maxima, len(maxima) - opaque)[len(maxima) - opaque]
    # a flat-topped field (e.g. exp activation clamped) can tie at its maximum, where no surface exists
    return float(min(level, np.nextafter(maxima.max(), np.float32(-np.inf))))


def tighten_box(grid: DensityGrid, level: float, margin: float, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Box of the samples above `level`, padded by one grid step (the surface lies between an inside and
    an outside sample), grown by `margin` of its size and clipped to `[-bound, bound]³`."""
    inside = np.argwhere(grid.values > level)
    if inside.size == 0:
        raise _empty_error(grid, level)
    low = grid.to_world(inside.min(0)) - grid.spacing
    high = grid.to_world(inside.max(0)) + grid.spacing
    grow = 0.5 * margin * (high - low)
    return np.maximum(low - grow, -bound), np.minimum(high + grow, bound)


def marching_cubes(grid: DensityGrid, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Surface `density = level` with outward faces: world `(V, 3)` float64 vertices and `(F, 3)` int64
    faces. The grid is padded with one empty layer so the surface is always closed."""
    from skimage.measure import marching_cubes as lewiner

    values = grid.values
    if not values.min() < level < values.max():
        raise _empty_error(grid, level)
    padded = np.pad(values, 1, constant_values=min(0.0, float(values.min())))
    # 'ascent': density grows inward, so skimage's winding then faces outward
    vertices, faces, _, _ = lewiner(padded, level=level, gradient_direction="ascent", allow_degenerate=False)
    return grid.to_world(vertices.astype(np.float64) - 1.0), faces.astype(np.int64)


def _empty_error(grid: DensityGrid, level: float) -> EmptyIsosurfaceError:
    low, high = float(grid.values.min()), float(grid.values.max())
    where = "above" if level >= high else "below"
    return EmptyIsosurfaceError(
        f"empty isosurface: threshold {level:.4g} is {where} the field's density everywhere "
        f"(range [{low:.4g}, {high:.4g}]); try threshold {0.5 * (low + high):.4g} or {AUTO!r}"
    )


def extract_isosurface(field: ImplicitField, config: ExtractionConfig, device: str | torch.device = "cpu") -> Isosurface:
    """Coarse pass over the bounding cube → level (`auto` or given) and tight box → fine grid → marching cubes."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bound = float(field.bound)
    coarse = sample_density(field, np.full(3, -bound), np.full(3, bound), config.coarse_resolution, config.chunk_size, device)
    timings["coarse_sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    level = auto_threshold(coarse) if config.threshold == AUTO else float(config.threshold)
    box_min, box_max = tighten_box(coarse, level, config.bbox_margin, bound)
    timings["threshold"] = time.perf_counter() - start

    start = time.perf_counter()
    fine = sample_density(field, box_min, box_max, config.resolution, config.chunk_size, device)
    timings["fine_sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    vertices, faces = marching_cubes(fine, level)
    timings["marching_cubes"] = time.perf_counter() - start
    return Isosurface(
        vertices, faces, level, (float(fine.values.min()), float(fine.values.max())), fine.values.shape, box_min, box_max, timings
    )


PYMESHLAB_LOCK = threading.Lock()
"""pymeshlab is not thread-safe: two assets cleaning meshes in threads of one process (`--parallel 2`)
crashed with a segmentation fault in `meshing_decimation_quadric_edge_collapse`. Every pymeshlab use
holds this lock; processes are unaffected."""


def _meshset(vertices: np.ndarray, faces: np.ndarray, vertex_colors: np.ndarray | None):
    import pymeshlab

    kwargs: dict[str, Any] = {}
    if vertex_colors is not None:
        kwargs["v_color_matrix"] = np.asarray(vertex_colors, dtype=np.float64)
    mesh_set = pymeshlab.MeshSet()
    mesh_set.add_mesh(pymeshlab.Mesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int32), **kwargs))
    return mesh_set


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def clean_mesh(
    vertices: np.ndarray, faces: np.ndarray, config: CleanupConfig, *, remesh: bool = True, vertex_colors: np.ndarray | None = None
) -> CleanMesh:
    """pymeshlab clean-up. `remesh=False` (a user's mesh) keeps its triangulation and its small parts: only
    duplicated/unreferenced vertices, degenerate faces and orientation are fixed, and decimation runs
    only above `target_faces`. `vertex_colors` `(V, 4)` in [0, 1] are carried through."""
    with PYMESHLAB_LOCK:
        return _clean_mesh(vertices, faces, config, remesh, vertex_colors)


def _clean_mesh(vertices: np.ndarray, faces: np.ndarray, config: CleanupConfig, remesh: bool, vertex_colors: np.ndarray | None) -> CleanMesh:
    import pymeshlab

    timings: dict[str, float] = {}
    mesh_set = _meshset(vertices, faces, vertex_colors)

    def step(name: str, action) -> None:
        start = time.perf_counter()
        action()
        timings[name] = time.perf_counter() - start

    def remove_degenerate() -> None:
        mesh_set.meshing_remove_duplicate_vertices()
        mesh_set.meshing_remove_null_faces()
        mesh_set.meshing_remove_duplicate_faces()
        mesh_set.meshing_remove_unreferenced_vertices()

    def remove_components() -> None:
        mesh_set.compute_selection_by_small_disconnected_components_per_face(nbfaceratio=config.min_component_ratio)
        mesh_set.meshing_remove_selected_vertices_and_faces()
        mesh_set.meshing_remove_unreferenced_vertices()

    def close_holes() -> None:
        # hole filling needs a 2-manifold mesh
        mesh_set.meshing_repair_non_manifold_edges()
        mesh_set.meshing_repair_non_manifold_vertices()
        mesh_set.meshing_close_holes(maxholesize=config.max_hole_edges)

    def isotropic_remesh() -> None:
        edge = config.target_edge_length or _edge_for_faces(mesh_set, 2 * max(config.target_faces, 1))
        # checksurfdist off: 7x faster on marching-cubes meshes; reprojection keeps vertices on the surface
        mesh_set.meshing_isotropic_explicit_remeshing(
            iterations=config.remesh_iterations, targetlen=pymeshlab.PureValue(edge), checksurfdist=False
        )

    def decimate() -> None:
        mesh_set.meshing_decimation_quadric_edge_collapse(
            targetfacenum=config.target_faces, preservenormal=True, preservetopology=True, optimalplacement=True
        )

    step("remove_degenerate", remove_degenerate)
    if remesh:
        if config.min_component_ratio > 0:
            step("remove_components", remove_components)
        if config.max_hole_edges > 0:
            step("close_holes", close_holes)
        if config.remesh_iterations > 0:
            step("remesh", isotropic_remesh)
    if config.target_faces and mesh_set.current_mesh().face_number() > config.target_faces:
        step("decimate", decimate)
    step("orient", mesh_set.meshing_re_orient_faces_coherently)

    mesh = mesh_set.current_mesh()
    out_vertices, out_faces = mesh.vertex_matrix().copy(), mesh.face_matrix().astype(np.int64)
    if _signed_volume(out_vertices, out_faces) < 0:
        out_faces = out_faces[:, ::-1].copy()
    colors = mesh.vertex_color_matrix().copy() if vertex_colors is not None else None
    return CleanMesh(out_vertices, out_faces, colors, timings)


def _edge_for_faces(mesh_set, faces: int) -> float:
    """Edge length of `faces` equilateral triangles tiling the current mesh's area: area = F·(√3/4)·e²."""
    area = mesh_set.get_geometric_measures()["surface_area"]
    return math.sqrt(4.0 * area / (math.sqrt(3.0) * faces))


def normalize_to_sphere(vertices: np.ndarray, radius: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Centre the bounding box at the origin and scale so the farthest vertex lies at `radius`.

    Returns the new vertices, `scale` and `center`, with `new = scale · (old − center)`."""
    vertices = np.asarray(vertices, dtype=np.float64)
    center = 0.5 * (vertices.min(0) + vertices.max(0))
    extent = float(np.linalg.norm(vertices - center, axis=1).max())
    if extent == 0:
        raise ValueError("cannot normalise a mesh whose vertices all coincide")
    scale = radius / extent
    return scale * (vertices - center), scale, center


def mesh_stats(vertices: np.ndarray, faces: np.ndarray) -> dict[str, Any]:
    """Counts, topology (components, watertight, Euler characteristic χ = V − E + F, genus), box, area,
    volume (None unless watertight)."""
    import trimesh

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    components = len(trimesh.graph.connected_components(mesh.face_adjacency, nodes=np.arange(len(faces))))
    watertight = bool(mesh.is_watertight)
    euler = int(mesh.euler_number)
    return {
        "vertices": len(vertices),
        "faces": len(faces),
        "components": components,
        "watertight": watertight,
        "euler_characteristic": euler,
        # a closed orientable surface with c components has χ = 2c − 2g
        "genus": (2 * components - euler) // 2 if watertight else None,
        "bbox_min": [float(x) for x in mesh.bounds[0]],
        "bbox_max": [float(x) for x in mesh.bounds[1]],
        "area": float(mesh.area),
        "volume": float(mesh.volume) if watertight else None,
    }
