"""Isosurface extraction and clean-up on analytic density fields (no diffusion model)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from csd.mesh import (
    CleanupConfig,
    DensityGrid,
    EmptyIsosurfaceError,
    ExtractionConfig,
    auto_threshold,
    clean_mesh,
    extract_isosurface,
    marching_cubes,
    mesh_stats,
    normalize_to_sphere,
    sample_density,
)


class AnalyticField:
    """`density(points)` from a torch function; albedo grey."""

    def __init__(self, density, bound: float = 1.0):
        self._density, self.bound = density, bound

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self._density(points)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return torch.full_like(points, 0.5)


def ball(radius: float, peak: float = 50.0, softness: float = 0.01, center=(0.0, 0.0, 0.0)) -> AnalyticField:
    """Density `peak` inside, 0 outside, crossing `peak / 2` exactly at `radius`."""
    c = torch.tensor(center)
    return AnalyticField(lambda p: peak * torch.sigmoid((radius - (p - c).norm(dim=-1)) / softness))


def torus(major: float, minor: float, peak: float = 50.0, softness: float = 0.01) -> AnalyticField:
    def density(p):
        ring = (p[:, :2].norm(dim=-1) - major) ** 2 + p[:, 2] ** 2
        return peak * torch.sigmoid((minor - ring.sqrt()) / softness)

    return AnalyticField(density)


def test_sphere_area_and_volume_within_two_percent_at_grid_128():
    radius = 0.5
    surface = extract_isosurface(ball(radius), ExtractionConfig(resolution=128, threshold=25.0))
    mesh = clean_mesh(surface.vertices, surface.faces, CleanupConfig(target_faces=5000))
    stats = mesh_stats(mesh.vertices, mesh.faces)

    assert stats["area"] == pytest.approx(4 * math.pi * radius**2, rel=0.02)
    assert stats["volume"] == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.02)
    assert stats["watertight"] and stats["components"] == 1
    assert stats["euler_characteristic"] == 2 and stats["genus"] == 0
    assert stats["faces"] == 5000
    # the coarse pass tightened the fine grid onto the ball (+ margin), not the whole [-1, 1] cube
    assert np.all(surface.box_max - surface.box_min < 2 * radius * 1.25)


def test_torus_has_euler_characteristic_zero():
    surface = extract_isosurface(torus(0.5, 0.2), ExtractionConfig(resolution=64, coarse_resolution=32, threshold=25.0))
    mesh = clean_mesh(surface.vertices, surface.faces, CleanupConfig(target_faces=2000))
    stats = mesh_stats(mesh.vertices, mesh.faces)

    assert stats["euler_characteristic"] == 0 and stats["genus"] == 1
    assert stats["watertight"] and stats["components"] == 1


def test_marching_cubes_maps_vertices_to_world_exactly():
    # a linear density is interpolated exactly along grid edges, so every vertex of the level set must
    # satisfy the plane equation; a wrong origin, spacing or axis order on any axis breaks it
    normal, offset, level = torch.tensor([1.0, 2.0, -1.5]), 0.05, 25.0
    field = AnalyticField(lambda p: level + 40.0 * (p @ normal - offset))
    box_min, box_max = np.array([-0.3, -0.1, -0.25]), np.array([0.2, 0.4, 0.05])
    grid = sample_density(field, box_min, box_max, resolution=24, chunk_size=1000)
    vertices, faces = marching_cubes(grid, level)

    inside = np.all((vertices > box_min + 1e-9) & (vertices < box_max - 1e-9), axis=1)
    assert inside.sum() > 100
    np.testing.assert_allclose(vertices[inside] @ normal.numpy().astype(np.float64), offset, atol=1e-5)
    # grid samples sit at origin + index · spacing and cover the requested box
    assert np.all(grid.origin <= box_min + 1e-12)
    assert np.all(grid.to_world(np.array(grid.values.shape) - 1.0) >= box_max - 1e-12)
    assert grid.values.shape[1] == 24 and np.allclose(grid.spacing, 0.5 / 23)


def test_offset_sphere_vertices_lie_on_the_sphere():
    center, radius = np.array([0.2, -0.1, 0.15]), 0.3
    surface = extract_isosurface(ball(radius, center=center), ExtractionConfig(resolution=48, coarse_resolution=32))
    distance = np.linalg.norm(surface.vertices - center, axis=1)
    spacing = (surface.box_max - surface.box_min).max() / 47
    assert np.abs(distance - radius).max() < 0.1 * spacing


def test_empty_isosurface_names_the_range_and_suggests_a_threshold_that_works():
    field = ball(0.4, peak=3.0)
    with pytest.raises(EmptyIsosurfaceError, match=r"empty isosurface: threshold 25 is above") as error:
        extract_isosurface(field, ExtractionConfig(resolution=32, coarse_resolution=16, threshold=25.0))
    message = str(error.value)
    high = float(re.search(r"range \[[^,]+, ([0-9.]+)\]", message).group(1))
    assert high == pytest.approx(3.0, rel=0.05)
    suggested = float(re.search(r"try threshold ([0-9.]+)", message).group(1))
    surface = extract_isosurface(field, ExtractionConfig(resolution=32, coarse_resolution=16, threshold=suggested))
    assert len(surface.faces) > 0


def test_auto_threshold_on_a_transparent_field_raises():
    with pytest.raises(EmptyIsosurfaceError, match="transparent"):
        extract_isosurface(AnalyticField(lambda p: torch.zeros(len(p))), ExtractionConfig(resolution=16, coarse_resolution=16, threshold="auto"))


def _silhouette_radius(radius: float, peak: float, softness: float) -> float:
    """Impact parameter b where a line through `ball` reaches optical depth ln 2 (opacity 0.5)."""
    t = np.linspace(-1.0, 1.0, 4001)
    impact = np.linspace(radius - 0.1, radius + 0.1, 401)
    distance = np.sqrt(impact[:, None] ** 2 + t[None] ** 2)
    depth = (peak / (1 + np.exp(-(radius - distance) / softness))).sum(1) * (t[1] - t[0])
    return float(impact[np.argmin(np.abs(depth - math.log(2)))])


@pytest.mark.parametrize("peak", [15.0, 150.0])
def test_auto_threshold_follows_the_density_scale(peak):
    # the same shape at two density scales: a fixed level fits at most one; `auto` puts the surface where
    # the rendered silhouette is (the denser ball's soft edge becomes opaque farther out)
    radius, softness = 0.4, 0.02
    config = ExtractionConfig(resolution=64, coarse_resolution=64, threshold="auto")
    surface = extract_isosurface(ball(radius, peak=peak, softness=softness), config)
    assert 0 < surface.level < peak
    expected = _silhouette_radius(radius, peak, softness)
    assert np.linalg.norm(surface.vertices, axis=1).mean() == pytest.approx(expected, abs=0.01)


def test_auto_threshold_on_a_flat_topped_field_still_finds_the_surface():
    # exp-activated fields clamp: every line through the object shares the same maximum
    values = np.zeros((20, 20, 20), dtype=np.float32)
    values[5:15, 5:15, 5:15] = np.exp(15.0)
    grid = DensityGrid(values, origin=np.zeros(3), spacing=np.full(3, 0.1))
    level = auto_threshold(grid)
    assert 0 < level < values.max()
    vertices, faces = marching_cubes(grid, level)
    assert mesh_stats(vertices, faces)["watertight"]


def test_auto_threshold_surface_has_the_rendered_silhouette():
    # on a real (randomly initialised, blob-biased) implicit volume: the mesh silhouette from orbit views
    # must be the volume render's opacity-0.5 silhouette
    from csd.cameras import orbit_cameras
    from csd.fields import FieldConfig, ImplicitVolume
    from csd.raster import get_rasterizer
    from csd.renderer import RendererConfig, VolumeRenderer

    torch.manual_seed(0)
    volume = ImplicitVolume(FieldConfig(n_levels=4, log2_hashmap_size=12, max_resolution=32, hidden_dim=16)).eval()
    with torch.no_grad():
        volume.mlp[-1].weight.mul_(200.0)  # bumpy density, not just the blob
    cameras = orbit_cameras(3, elevation=20.0)
    renderer = VolumeRenderer(RendererConfig(num_samples=128, occupancy_resolution=0, background="solid"), volume.bound)
    with torch.no_grad():
        opaque = renderer.render(volume, cameras, 32, training=False).opacity[:, 0].numpy() > 0.5
    surface = extract_isosurface(volume, ExtractionConfig(resolution=64, coarse_resolution=48, threshold="auto"))
    vertices, faces = (torch.as_tensor(a) for a in (surface.vertices, surface.faces))
    silhouette = get_rasterizer("cpu").rasterize(vertices.float(), faces, cameras, 32, 32).mask.numpy()
    assert (silhouette & opaque).sum() / (silhouette | opaque).sum() > 0.9


def test_small_components_are_dropped_and_normals_point_outward():
    big, speck = ball(0.4, center=(-0.2, 0.0, 0.0)), ball(0.04, center=(0.6, 0.0, 0.0))
    field = AnalyticField(lambda p: torch.maximum(big.density(p), speck.density(p)))
    surface = extract_isosurface(field, ExtractionConfig(resolution=96, coarse_resolution=64, threshold=25.0))
    assert mesh_stats(surface.vertices, surface.faces)["components"] == 2

    mesh = clean_mesh(surface.vertices, surface.faces, CleanupConfig(target_faces=1000))
    stats = mesh_stats(mesh.vertices, mesh.faces)
    assert stats["components"] == 1 and stats["volume"] > 0
    a, b, c = (mesh.vertices[mesh.faces[:, i]] for i in range(3))
    outward = np.einsum("ij,ij->i", np.cross(b - a, c - a), (a + b + c) / 3 - np.array([-0.2, 0.0, 0.0]))
    assert (outward > 0).mean() > 0.99


def test_normalize_to_sphere_is_the_documented_transform():
    vertices = np.random.default_rng(0).normal(size=(50, 3)) * 3 + 7
    normalized, scale, center = normalize_to_sphere(vertices, 0.8)
    assert np.linalg.norm(normalized, axis=1).max() == pytest.approx(0.8)
    np.testing.assert_allclose(normalized, scale * (vertices - center))


def test_unknown_threshold_name_raises_naming_it():
    with pytest.raises(ValueError, match="'max'"):
        extract_isosurface(ball(0.4), ExtractionConfig(threshold="max"))


def test_clean_mesh_in_parallel_threads_matches_serial():
    """Two assets cleaning meshes at once (`--parallel 2` runs assets in threads): pymeshlab is not
    thread-safe and crashed the process without the module's lock."""
    from concurrent.futures import ThreadPoolExecutor

    import trimesh

    from csd.mesh import CleanupConfig, clean_mesh

    sphere = trimesh.creation.icosphere(subdivisions=5)
    config = CleanupConfig(target_faces=1500, remesh_iterations=1)
    serial = clean_mesh(np.asarray(sphere.vertices), np.asarray(sphere.faces), config)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: clean_mesh(np.asarray(sphere.vertices), np.asarray(sphere.faces), config), range(8)))
    for result in results:
        assert np.array_equal(result.faces, serial.faces) and np.allclose(result.vertices, serial.vertices)
