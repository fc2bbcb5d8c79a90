"""Lighting and backgrounds shared by the volume renderer (`csd.renderer`) and the mesh renderer
(`csd.raster`): one lambert + ambient model and one random background colour, so a convention
change (light position, ambient share, colour range) is made once for both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def diffuse_shade(normal: Tensor, points: Tensor, light_position: Tensor, ambient: float) -> Tensor:
    """`ambient + (1 − ambient) · max(0, n · l)` with `l` the unit direction from each point to the
    point light; `normal`, `points` `(..., 3)`, `light_position` broadcastable to them → `(..., 1)`."""
    lambert = (normal * F.normalize(light_position - points, dim=-1)).sum(-1, keepdim=True).clamp(min=0)
    return ambient + (1 - ambient) * lambert


def random_background(batch: int, value_range: tuple[float, float], generator: torch.Generator | None, device) -> Tensor:
    """`(B, 3)` colours uniform per channel in `value_range` (a light random colour per view), drawn
    on the CPU generator so CPU and GPU runs see the same colours."""
    low, high = value_range
    return (low + (high - low) * torch.rand(batch, 3, generator=generator)).to(device)
