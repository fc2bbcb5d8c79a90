"""Implicit volume: a multi-resolution hash-grid encoding and a small MLP giving density and albedo.

The hash grid follows Instant-NGP as configured in threestudio/CSD (12 levels × 2 features, 2^19
table, base resolution 16, max 512). Coarse levels whose vertex count fits the table are stored
densely and read with `grid_sample` (fast on CPU and GPU); finer levels are hashed. When the
points themselves need gradients (analytic normals, whose `create_graph` backward differentiates
the lookup twice), dense levels are read by the same 8-corner gather as hashed ones: torch 2.11 on
CUDA has no second derivative of `grid_sample` in 3-D ("derivative for
aten::grid_sampler_3d_backward is not implemented", bench/gpu.py on an H200, 2026-12-04). Without
gradients, a hashed level whose vertex grid is small next to the query is gathered into a dense
grid first and read the same way (see `HashGridEncoding.forward`). The density gets Magic3D's
blob bias, so optimisation starts from a ball at the origin.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csd.checks import at_least, validate

_PRIMES = (1, 2654435761, 805459861)


class ImplicitField(Protocol):
    """What `mesh` and `uv` need from a field: density and albedo at world points inside `bound`."""

    bound: float

    def density(self, points: Tensor) -> Tensor:
        """`(N, 3)` world points → `(N,)` non-negative densities."""

    def albedo(self, points: Tensor) -> Tensor:
        """`(N, 3)` world points → `(N, 3)` colours in [0, 1]."""


@dataclass(frozen=True)
class FieldConfig:
    """Hash grid, MLP and density initialisation (official: threestudio implicit-volume)."""

    bound: float = 1.0
    """Half side of the cube (and radius of the sphere) the field lives in, world units."""
    n_levels: int = 12
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 512
    hidden_dim: int = 64
    n_hidden_layers: int = 1
    density_bias: Literal["blob_magic3d", "none"] = "blob_magic3d"
    """`blob_magic3d`: scale · (1 − |x| / std); `none`."""
    density_blob_scale: float = 10.0
    density_blob_std: float = 0.5
    density_activation: Literal["softplus", "exp"] = "softplus"
    """`softplus` or `exp`."""
    normal_type: Literal["finite_difference", "analytic"] = "finite_difference"
    """How normals −∇σ/‖∇σ‖ are computed: `finite_difference` (forward differences, `normal_eps`
    apart: 3 more density queries per point) or `analytic` (∇σ by autograd with `create_graph`, so
    losses on normals backpropagate to the field; official csd-if: `normal_type: analytic`,
    threestudio implicit-volume)."""
    normal_eps: float = 0.01
    """Finite-difference step for `finite_difference` normals, world units."""

    def __post_init__(self):
        validate(self, {
            "bound": at_least(0, exclusive=True), "n_levels": at_least(1), "n_features_per_level": at_least(1),
            "log2_hashmap_size": at_least(1), "base_resolution": at_least(1), "max_resolution": at_least(1),
            "hidden_dim": at_least(1), "n_hidden_layers": at_least(0), "density_blob_std": at_least(0, exclusive=True),
            "normal_eps": at_least(0, exclusive=True),
        })


_DENSE_READ_TABLES = 8
"""A hashed level is read densely without gradients only if its vertex grid is at most this many
times its table (memory: the official 2^19 table at resolution 512 has 256× more vertices)."""
_DENSE_READ_POINTS = 64
"""... and only if the query has at least 1/this as many points as the level has vertices: the
gather costs ~8 ns a vertex on CPU, the dense read saves ~0.7 µs a point (measured, toy-cpu field)."""


class HashGridEncoding(nn.Module):
    """Points in [0, 1]³ `(N, 3)` → features `(N, n_levels · n_features_per_level)`."""

    def __init__(self, config: FieldConfig):
        super().__init__()
        self.config = config
        table = 2**config.log2_hashmap_size
        growth = math.exp(math.log(config.max_resolution / config.base_resolution) / max(1, config.n_levels - 1))
        self.resolutions = [int(math.floor(config.base_resolution * growth**level)) for level in range(config.n_levels)]
        self.dense = nn.ParameterList()
        self.hashed = nn.ParameterList()
        self.dense_levels, self.hashed_levels = [], []
        for level, resolution in enumerate(self.resolutions):
            vertices = resolution + 1
            if vertices**3 <= table:
                init = torch.empty(1, config.n_features_per_level, vertices, vertices, vertices).uniform_(-1e-4, 1e-4)
                self.dense.append(nn.Parameter(init))
                self.dense_levels.append(level)
            else:
                self.hashed.append(nn.Parameter(torch.empty(table, config.n_features_per_level).uniform_(-1e-4, 1e-4)))
                self.hashed_levels.append(level)
                if vertices**3 <= _DENSE_READ_TABLES * table:
                    self.register_buffer(f"vertex_hash_{level}", _vertex_hashes(vertices, table), persistent=False)

    @property
    def output_dim(self) -> int:
        return self.config.n_levels * self.config.n_features_per_level

    def forward(self, x: Tensor) -> Tensor:
        features: list[Tensor] = [None] * self.config.n_levels  # type: ignore[list-item]
        # grid_sample wants (x, y, z) in [-1, 1] indexing (W, H, D); our grids are indexed [x, y, z] → flip
        grid = (x * 2 - 1).flip(-1).view(1, -1, 1, 1, 3).to(self.dense[0].dtype if len(self.dense) else x.dtype)
        twice_differentiable = torch.is_grad_enabled() and x.requires_grad
        for level, table in zip(self.dense_levels, self.dense):
            if twice_differentiable:  # no grid_sample: see the module docstring
                rows = table.view(table.shape[1], -1).t()  # vertex [x, y, z] in C order → row
                features[level] = self._corner_lookup(x, self.resolutions[level], rows, hashed=False)
                continue
            sampled = F.grid_sample(table, grid, mode="bilinear", align_corners=True, padding_mode="border")
            features[level] = sampled.view(table.shape[1], -1).t()
        for level, table in zip(self.hashed_levels, self.hashed):
            vertex_hash = getattr(self, f"vertex_hash_{level}", None)
            recording = torch.is_grad_enabled() and (table.requires_grad or x.requires_grad)
            if not recording and vertex_hash is not None and vertex_hash.numel() <= _DENSE_READ_POINTS * x.shape[0]:
                # no gradients to route back through the hash: gather the level's vertices once and
                # interpolate like a dense level, ~3× faster a point than 8 hashed corners on CPU; the
                # same trilinear interpolation, its sums in grid_sample's order (float rounding apart)
                vertices = self.resolutions[level] + 1
                volume = table.index_select(0, vertex_hash).t().reshape(1, table.shape[1], vertices, vertices, vertices)
                sampled = F.grid_sample(volume, grid, mode="bilinear", align_corners=True, padding_mode="border")
                features[level] = sampled.view(table.shape[1], -1).t()
            else:
                features[level] = self._corner_lookup(x, self.resolutions[level], table)
        return torch.cat(features, dim=-1)

    @staticmethod
    def _corner_lookup(x: Tensor, resolution: int, table: Tensor, hashed: bool = True) -> Tensor:
        """Trilinear interpolation of the 8 cell corners, all corners in one gather.

        A corner's row in `table` is its spatial hash (`hashed`) or, for a dense level of
        `(resolution + 1)³` rows, its index `[x, y, z]` in C order (x slowest). Corner `o` (0…7) is
        offset by the bits of `o` (x, y, z from the high bit down). Its row and weight combine
        per-axis terms `(N, 2)` spread to `(N, 8)` by column selection (contiguous operands: broadcast
        int64 XORs are several times slower on CPU). `index_select` rather than `table[index]`: its
        backward is an `index_add`, ~3× faster on CPU than advanced indexing's, and differentiable again."""
        scaled = x * resolution
        corner = scaled.floor().clamp(0, resolution - 1)
        frac = scaled - corner  # (N, 3)
        corner = corner.long()
        bits = _CORNER_BITS.to(x.device)  # (3, 8)
        strides = _PRIMES if hashed else ((resolution + 1) ** 2, resolution + 1, 1)
        index = weight = None
        for d in range(3):
            axis_index = torch.stack([corner[:, d], corner[:, d] + 1], -1) * strides[d]  # (N, 2)
            axis_weight = torch.stack([1 - frac[:, d], frac[:, d]], -1)
            axis_index, axis_weight = axis_index.index_select(1, bits[d]), axis_weight.index_select(1, bits[d])  # (N, 8)
            if index is None:
                index = axis_index
            else:
                index = index ^ axis_index if hashed else index + axis_index
            weight = axis_weight if weight is None else weight * axis_weight
        rows = _table_rows(index, table.shape[0]) if hashed else index
        corners = table.index_select(0, rows.view(-1)).view(-1, 8, table.shape[1])
        return (weight[..., None] * corners).sum(1)


_CORNER_BITS = torch.tensor([[(o >> (2 - d)) & 1 for o in range(8)] for d in range(3)])
"""`(3, 8)`: the offset (0 or 1) of corner `o` along axis d."""


def _vertex_hashes(vertices: int, size: int) -> Tensor:
    """`(vertices³,)` table rows of a hashed level's vertices `[x, y, z]` in C order (x slowest),
    the same hash as `HashGridEncoding._corner_lookup`."""
    axis = torch.arange(vertices)
    hashes = (axis[:, None, None] * _PRIMES[0]) ^ (axis[None, :, None] * _PRIMES[1]) ^ (axis[None, None, :] * _PRIMES[2])
    return _table_rows(hashes.view(-1), size)


def _table_rows(hashes: Tensor, size: int) -> Tensor:
    """Spatial hashes (non-negative) → rows of a `size`-row table: for a power of two the modulo is a mask."""
    return hashes & (size - 1) if size & (size - 1) == 0 else hashes % size


class ImplicitVolume(nn.Module):
    """Density + albedo field inside `[-bound, bound]³`."""

    def __init__(self, config: FieldConfig = FieldConfig()):
        super().__init__()
        self.config = config
        self.bound = config.bound
        self.encoding = HashGridEncoding(config)
        encoding_dim = self.encoding.output_dim
        layers: list[nn.Module] = []
        width = encoding_dim
        for _ in range(config.n_hidden_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.ReLU(inplace=True)]
            width = config.hidden_dim
        layers.append(nn.Linear(width, 4))
        self.mlp = nn.Sequential(*layers)

    def _raw(self, points: Tensor) -> Tensor:
        x = ((points / self.bound) * 0.5 + 0.5).clamp(0.0, 1.0)
        return self.mlp(self.encoding(x).float())

    def _density_from_raw(self, raw: Tensor, points: Tensor) -> Tensor:
        value = raw[..., 0]
        if self.config.density_bias == "blob_magic3d":
            # Magic3D: density_blob_scale * (1 - |x| / density_blob_std)
            value = value + self.config.density_blob_scale * (1 - points.norm(dim=-1) / self.config.density_blob_std)
        if self.config.density_activation == "softplus":
            return F.softplus(value)
        return torch.exp(value.clamp(max=15.0))

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """`(N, 3)` world points → density `(N,)` and albedo `(N, 3)` in [0, 1]."""
        raw = self._raw(points)
        return self._density_from_raw(raw, points), torch.sigmoid(raw[..., 1:])

    def density(self, points: Tensor) -> Tensor:
        raw = self._raw(points)
        return self._density_from_raw(raw, points)

    def albedo(self, points: Tensor) -> Tensor:
        return torch.sigmoid(self._raw(points)[..., 1:])

    def normal(self, points: Tensor) -> Tensor:
        """Unit normals `(N, 3)` = −∇σ/‖∇σ‖ (`config.normal_type`), differentiable."""
        return self.with_normals(points)[2]

    def with_normals(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Density `(N,)`, albedo `(N, 3)` and unit normals `(N, 3)` at `(N, 3)` world points.

        `finite_difference`: forward differences `normal_eps` apart, the points and their three
        shifted copies in one query of the field. `analytic`: ∇σ by autograd with `create_graph`
        while gradients are enabled (a loss on the normals reaches the field's parameters),
        detached under `torch.no_grad`."""
        if self.config.normal_type == "analytic":
            training = torch.is_grad_enabled()
            with torch.enable_grad():
                if not points.requires_grad:
                    points = points.detach().requires_grad_(True)
                density, albedo = self(points)
                (gradient,) = torch.autograd.grad(density, points, torch.ones_like(density), create_graph=training)
            if not training:
                density, albedo = density.detach(), albedo.detach()
            return density, albedo, -F.normalize(gradient, dim=-1)
        eps = self.config.normal_eps
        n = points.shape[0]
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps
        queried = torch.cat([points, (points[:, None, :] + offsets[None]).reshape(-1, 3)])
        raw = self._raw(queried)
        densities = self._density_from_raw(raw, queried)
        density, shifted = densities[:n], densities[n:].view(n, 3)
        gradient = (shifted - density[:, None]) / eps
        return density, torch.sigmoid(raw[:n, 1:]), -F.normalize(gradient, dim=-1)


FIELD_WEIGHTS = "field.safetensors"
FIELD_CONFIG = "field.json"


def save_field(volume: ImplicitVolume, directory: Path) -> None:
    """Write weights + config so `load_field` can rebuild the field in another process."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in volume.state_dict().items()}
    config = asdict(volume.config)
    save_file(state, str(directory / FIELD_WEIGHTS))
    (directory / FIELD_CONFIG).write_text(json.dumps(config, indent=2))


def load_field(directory: Path, device: str | torch.device = "cpu") -> ImplicitVolume:
    """Rebuild a field saved by `save_field` (weights frozen, eval mode)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (FIELD_WEIGHTS, FIELD_CONFIG):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} holds no saved field ({name} missing); run the nerf stage first")
    saved = json.loads((directory / FIELD_CONFIG).read_text())
    saved.pop("backend", None)  # fields saved while a `tcnn` backend option existed all say "torch"
    config = FieldConfig(**saved)
    volume = ImplicitVolume(config)
    volume.load_state_dict(load_file(str(directory / FIELD_WEIGHTS)))
    return volume.to(device).eval().requires_grad_(False)
