"""Ground-truth scores for the shapes world: how much an object *is* the prompted primitive and colour.

The toy world is ours (`csd.toy.world`): every object is one of four primitives with a radius, a yaw
and a palette colour. So instead of asking a classifier, we compare an asset with the primitive itself:

* **geometry** — the object's occupancy on a fixed voxel grid over the bounding cube (a mesh by ray
  parity, a field by its density above the isosurface level the `mesh` stage uses) against each
  primitive fitted over the world's free parameters (radius, yaw, a small centre offset). `shape_iou`
  is the volumetric IoU with the prompted primitive, `shape_margin` that minus the best IoU of the
  other three, `best_shape` the best-fitting one.
* **colour** — the area-weighted mean surface albedo (points sampled uniformly over the surface by
  area) against the palette colour: `colour_error` is the RGB distance divided by √3 (so in [0, 1]),
  `colour_spread` the RMS distance of the surface samples from their mean (same scale), the nearest
  palette colour, and `hueless_fraction`, the share of the surface whose albedo has no hue (chroma
  below `HUE_CHROMA`: grey, near-black or near-white).

These scores judge; nothing in the pipeline may read them (no loss, seed choice or early stop).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from csd.mesh import DensityGrid, marching_cubes, sample_density
from csd.toy.world import BOUND, COLOURS, SHAPES, Scenes, _sdf

GRID_RESOLUTION = 40
"""Samples per side of the fixed grid over `[-BOUND, BOUND]³` (voxel side 0.051: the world's smallest
torus tube, radius 0.32 · 0.45 = 0.14, spans about 6 voxels across)."""
FIT_RADIUS = (0.15, 1.0)
"""Radii the fit may take: wider than the world's `radius_range` (0.45–0.7) both ways, since user meshes
are normalised to 0.8 and a distilled object need not keep the training scale (the demo's red cube
came out smaller than the world's smallest) — a scaled primitive is still that primitive."""
MAX_OFFSET = 0.25
"""Largest centre offset per axis (world units) the fit may use: world objects sit at the origin."""
SURFACE_SAMPLES = 20_000
"""Surface points for the colour score."""
HUE_CHROMA = 0.2
"""A surface albedo has a hue when its chroma `max(r, g, b) − min(r, g, b)` (the radius of the HSV
hexcone, saturation × value) is at least this. Chroma rather than HSV saturation: a near-black texel
such as (0.02, 0.03, 0.02) has saturation 0.33 but shows no colour. The palette's chromas are 0.58
(green) to 0.93 (orange); with the world's albedo jitter (σ 0.05 per channel) 99.99 % of drawn
albedos stay above 0.34, so 0.2 counts every world colour as hued and the untextured grey (chroma 0),
greys tinted by a few hundredths and dark blotches (green at a third of its value: 0.19) as hueless."""
_SQRT3 = math.sqrt(3.0)
_REACH = 1.07
"""Farthest point of a world primitive from its centre, in radii (cone base rim: √(0.8² + 0.7²) = 1.063)."""


# --- the primitives ---------------------------------------------------------------------------


def _unit_volume(shape: str) -> float:
    """Volume of the world's primitive of radius 1 (dimensions as in `csd.toy.world._sdf`)."""
    if shape == "sphere":
        return 4.0 / 3.0 * math.pi
    if shape == "cube":
        return (2.0 / _SQRT3) ** 3
    if shape == "cone":  # base radius 0.8, height 1.4
        return math.pi * 0.8**2 * 1.4 / 3.0
    if shape == "torus":  # major 0.68, minor 0.32
        return 2.0 * math.pi**2 * 0.68 * 0.32**2
    raise ValueError(f"unknown shape {shape!r}; the world's shapes: {', '.join(SHAPES)}")


def _unit_centroid(shape: str) -> np.ndarray:
    """Centroid of the radius-1 primitive placed as the world places it (the cone's base is at −0.7)."""
    # a solid cone's centroid lies a quarter of its height above the base: −0.7 + 1.4 / 4
    return np.array([0.0, 0.0, -0.35 if shape == "cone" else 0.0])


def grid_points(resolution: int = GRID_RESOLUTION, bound: float = BOUND) -> Tensor:
    """`(R³, 3)` float32 points of the fixed grid, in the order and places `csd.mesh.sample_density`
    samples `[-bound, bound]³` at `resolution` (x slowest, z fastest)."""
    axis = torch.linspace(-bound, bound, resolution, dtype=torch.float64)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3).float()


def primitive_sdf(shape: str, radius: Tensor, yaw: Tensor, centre: Tensor, points: Tensor) -> Tensor:
    """`(B, N)` signed distances of `points` `(N, 3)` to the world's `shape` with each of the `B` radii
    `(B,)`, yaws `(B,)` and centres `(B, 3)` — the world's own SDF (`csd.toy.world._sdf`)."""
    batch = len(radius)
    index = torch.full((batch,), SHAPES.index(shape), dtype=torch.long)
    zeros = torch.zeros(batch)
    scenes = Scenes(index, index, radius.float(), yaw.float(), torch.zeros(batch, 3), torch.zeros(batch, 3), zeros)
    return _sdf(points[None] - centre.float()[:, None, :], scenes)


def primitive_occupancy(shape: str, radius: Tensor, yaw: Tensor, centre: Tensor, points: Tensor) -> Tensor:
    """`(B, N)` bool: which of `points` lie inside each primitive (`primitive_sdf` ≤ 0)."""
    return primitive_sdf(shape, radius, yaw, centre, points) <= 0


# --- geometry ---------------------------------------------------------------------------------


@dataclass
class ShapeFit:
    """The best primitive of one kind: its parameters and IoU with the object."""

    shape: str
    iou: float
    radius: float
    yaw: float
    centre: list[float]


@dataclass
class ShapeScore:
    """`shape_iou` with the prompted primitive, `shape_margin` = that − the best other IoU,
    `best_shape` the best-fitting primitive, `fits` every primitive's fit, `occupied` the object's voxels."""

    prompted: str
    shape_iou: float
    shape_margin: float
    best_shape: str
    fits: dict[str, ShapeFit] = field(default_factory=dict)
    occupied: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _iou(candidates: Tensor, occupancy: Tensor) -> Tensor:
    """`(B,)` IoU of `(B, N)` candidate occupancies with `(N,)` occupancy."""
    inter = (candidates & occupancy).sum(1).float()
    union = (candidates | occupancy).sum(1).float()
    return inter / union.clamp(min=1)


def fit_primitive(shape: str, occupancy: Tensor, points: Tensor, refine_steps: int = 5) -> ShapeFit:
    """The `shape` (radius, yaw, centre offset) of highest IoU with `occupancy` `(N,)` at `points`.

    Start: the radius whose volume matches the object's and the centre that puts the primitive's
    centroid on the object's; a coarse grid over radius (and yaw, for the cube: the others are
    symmetric about z) then a pattern search that halves its steps `refine_steps` times."""
    occupancy = occupancy.bool()
    count = int(occupancy.sum())
    if count == 0:
        return ShapeFit(shape, 0.0, 0.0, 0.0, [0.0, 0.0, 0.0])
    axis = points[:, 2].unique()
    spacing = float(axis[1] - axis[0]) if len(axis) > 1 else 1.0
    volume = count * spacing**3
    radius0 = float(np.clip((volume / _unit_volume(shape)) ** (1 / 3), *FIT_RADIUS))
    centroid = points[occupancy].double().mean(0).numpy()
    centre0 = np.clip(centroid - radius0 * _unit_centroid(shape), -MAX_OFFSET, MAX_OFFSET)
    yaws = np.linspace(0, math.pi / 2, 6, endpoint=False) if shape == "cube" else np.zeros(1)
    radii = np.clip(radius0 * np.array([0.85, 0.92, 1.0, 1.08, 1.15]), *FIT_RADIUS)
    grid = np.array([(r, y) for r in radii for y in yaws])
    params = np.concatenate([grid, np.repeat(centre0[None], len(grid), 0)], 1)  # (B, 5): r, yaw, cx, cy, cz

    def evaluate(candidates: np.ndarray) -> Tensor:
        # every candidate lies inside a ball around its centre (the cone's base rim reaches 1.06 r);
        # points outside all those balls and outside the object add nothing to intersection or union
        middle = candidates[:, 2:].mean(0)
        reach = float((np.linalg.norm(candidates[:, 2:] - middle, axis=1) + _REACH * candidates[:, 0]).max())
        keep = occupancy | ((points - torch.from_numpy(middle).float()).norm(dim=1) <= reach + spacing)
        candidates = torch.from_numpy(candidates)
        inside = primitive_occupancy(shape, candidates[:, 0], candidates[:, 1], candidates[:, 2:], points[keep])
        return _iou(inside, occupancy[keep])

    scores = evaluate(params)
    best = params[int(scores.argmax())]
    best_iou = float(scores.max())
    steps = np.array([0.04 * best[0], math.pi / 24 if shape == "cube" else 0.0, spacing, spacing, spacing])
    low = np.array([FIT_RADIUS[0], -math.inf, -MAX_OFFSET, -MAX_OFFSET, -MAX_OFFSET])
    high = np.array([FIT_RADIUS[1], math.inf, MAX_OFFSET, MAX_OFFSET, MAX_OFFSET])
    for _ in range(refine_steps):
        improved = True
        while improved:
            moves = [best + sign * np.eye(5)[i] * steps[i] for i in range(5) if steps[i] > 0 for sign in (1, -1)]
            moves = np.clip(np.array(moves), low, high)
            scores = evaluate(moves)
            improved = float(scores.max()) > best_iou + 1e-6
            if improved:
                best, best_iou = moves[int(scores.argmax())], float(scores.max())
        steps = steps / 2
    return ShapeFit(shape, best_iou, float(best[0]), float(best[1] % (math.pi / 2)), [float(c) for c in best[2:]])


def score_occupancy(occupancy: Tensor, prompted: str, points: Tensor | None = None) -> ShapeScore:
    """Fit all four primitives to `occupancy` `(N,)` on the fixed grid (`points`, default `grid_points()`)."""
    if prompted not in SHAPES:
        raise ValueError(f"unknown shape {prompted!r}; the world's shapes: {', '.join(SHAPES)}")
    points = grid_points() if points is None else points
    fits = {shape: fit_primitive(shape, occupancy, points) for shape in SHAPES}
    best_other = max(fit.iou for shape, fit in fits.items() if shape != prompted)
    best_shape = max(fits.values(), key=lambda fit: fit.iou).shape
    iou = fits[prompted].iou
    return ShapeScore(prompted, iou, iou - best_other, best_shape, fits, int(occupancy.sum()))


def mesh_occupancy(vertices: np.ndarray, faces: np.ndarray, resolution: int = GRID_RESOLUTION, bound: float = BOUND) -> Tensor:
    """`(R³,)` bool: which points of the fixed grid lie inside the mesh, by ray parity.

    Each grid line along x, y and z is one ray (embree through trimesh); a point is inside along a
    line when an odd number of hits lie before it. A line with an odd number of hits in all passed
    through a hole, so it abstains; the point is inside when more lines say inside than outside. A
    closed mesh gives the exact answer; a mesh with small holes loses only the lines through them;
    an open sheet encloses nothing and scores accordingly."""
    import trimesh

    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False)
    coords = np.linspace(-bound, bound, resolution)
    # nudge the rays off the grid lines so they do not graze edges and vertices of axis-aligned meshes
    jitter = 1e-4 * np.array([math.sqrt(2), math.sqrt(3)])
    votes_in = np.zeros((resolution,) * 3, dtype=np.int64)
    votes_out = np.zeros((resolution,) * 3, dtype=np.int64)
    span = 4.0 * bound + 4.0
    for axis in range(3):
        a, b = [i for i in range(3) if i != axis]
        ga, gb = np.meshgrid(coords + jitter[0], coords + jitter[1], indexing="ij")
        origins = np.zeros((resolution * resolution, 3))
        origins[:, a], origins[:, b] = ga.ravel(), gb.ravel()
        origins[:, axis] = -bound - 1.0
        directions = np.zeros_like(origins)
        directions[:, axis] = 1.0
        if len(mesh.faces):
            locations, ray, _ = mesh.ray.intersects_location(origins, directions, multiple_hits=True)
        else:
            locations, ray = np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
        depth = locations[:, axis] + bound + 2.0  # in (0, span)
        keys = np.sort(ray * span + depth)
        totals = np.bincount(ray, minlength=len(origins))
        starts = np.searchsorted(keys, np.arange(len(origins)) * span)
        queries = np.arange(len(origins))[:, None] * span + (coords + bound + 2.0)[None, :]
        before = np.searchsorted(keys, queries) - starts[:, None]  # hits before each point, (rays, R)
        valid = (totals % 2 == 0)[:, None]
        inside = (before % 2 == 1) & valid
        outside = (before % 2 == 0) & valid
        # (rays = (a, b), R along axis) → the (x, y, z) grid
        shape_ab = (resolution, resolution, resolution)
        order = [0, 0, 0]
        order[a], order[b], order[axis] = 0, 1, 2
        votes_in += np.transpose(inside.reshape(shape_ab), order)
        votes_out += np.transpose(outside.reshape(shape_ab), order)
    return torch.from_numpy((votes_in > votes_out).ravel())


def field_occupancy(field, level: float, resolution: int = GRID_RESOLUTION, chunk_size: int = 262_144, device="cpu") -> Tensor:
    """`(R³,)` bool: grid points where the field's density exceeds `level` (the `mesh` stage's
    isosurface level; outside the bounding sphere the density counts as 0, as in `sample_density`)."""
    grid = sample_density(field, np.full(3, -BOUND), np.full(3, BOUND), resolution, chunk_size, device)
    return torch.from_numpy(grid.values.ravel() > level)


def score_mesh_shape(vertices: np.ndarray, faces: np.ndarray, prompted: str) -> ShapeScore:
    return score_occupancy(mesh_occupancy(vertices, faces), prompted)


def score_field_shape(field, level: float, prompted: str, device="cpu") -> ShapeScore:
    return score_occupancy(field_occupancy(field, level, device=device), prompted)


# --- colour -----------------------------------------------------------------------------------


@dataclass
class ColourScore:
    """`colour_error`: |mean albedo − palette colour| / √3; `colour_spread`: RMS distance of the surface
    samples from their mean / √3; `nearest_colour`: the palette colour nearest the mean;
    `hueless_fraction`: share of the samples (so of the surface, by area) with chroma below `HUE_CHROMA`."""

    prompted: str
    colour_error: float
    colour_spread: float
    nearest_colour: str
    mean_rgb: list[float]
    samples: int
    hueless_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


def score_colours(colours: np.ndarray, prompted: str) -> ColourScore:
    """Score `(N, 3)` surface albedos in [0, 1], sampled uniformly by area, against palette colour `prompted`."""
    if prompted not in COLOURS:
        raise ValueError(f"unknown colour {prompted!r}; the world's palette: {', '.join(COLOURS)}")
    colours = np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    if len(colours) == 0:
        raise ValueError("no surface samples to score the colour of")
    mean = colours.mean(0)
    palette = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    error = float(np.linalg.norm(mean - palette[prompted]) / _SQRT3)
    spread = float(np.sqrt(((colours - mean) ** 2).sum(1).mean()) / _SQRT3)
    nearest = min(palette, key=lambda name: np.linalg.norm(mean - palette[name]))
    hueless = float((colours.max(1) - colours.min(1) < HUE_CHROMA).mean())
    return ColourScore(prompted, error, spread, nearest, mean.tolist(), len(colours), hueless)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int = SURFACE_SAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` points uniform by area: `(N, 3)` points, `(N,)` face indices, `(N, 3)` barycentrics."""
    vertices, faces = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    corners = vertices[faces]  # (F, 3, 3)
    areas = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    if len(faces) == 0 or areas.sum() <= 0:
        raise ValueError("the mesh has no surface area to sample")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=count, p=areas / areas.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    bary = np.stack([1 - u - v, u, v], 1)
    return (bary[:, :, None] * corners[face]).sum(1), face, bary


def textured_surface_colours(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, texture: np.ndarray,
                             count: int = SURFACE_SAMPLES, seed: int = 0) -> np.ndarray:
    """`(N, 3)` albedos in [0, 1] at points uniform by area, read through the UVs with the project's
    bilinear lookup (`csd.uv.sample_texture`): the texels the faces actually use."""
    from csd.uv import sample_texture

    _, face, bary = sample_surface(vertices, faces, count, seed)
    uv = (bary[:, :, None] * np.asarray(uvs, dtype=np.float64)[np.asarray(faces)[face]]).sum(1)
    scale = 255.0 if np.asarray(texture).dtype == np.uint8 else 1.0
    return sample_texture(np.asarray(texture), uv) / scale


@torch.no_grad()
def field_surface_colours(field, level: float, count: int = SURFACE_SAMPLES, seed: int = 0, resolution: int = 64, device="cpu") -> np.ndarray:
    """`(N, 3)` field albedos at points uniform by area on its isosurface at `level` (marching cubes on
    a `resolution`³ grid over the bounding cube, as `csd.mesh.marching_cubes` extracts it)."""
    grid: DensityGrid = sample_density(field, np.full(3, -BOUND), np.full(3, BOUND), resolution, 262_144, device)
    vertices, faces = marching_cubes(grid, level)
    points, _, _ = sample_surface(vertices, faces, count, seed)
    return field.albedo(torch.from_numpy(points).float().to(device)).float().cpu().numpy()
