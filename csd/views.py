"""Orbit renders (turntables, evaluator views) of any renderer: the one loop every stage uses."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from csd.cameras import Cameras, orbit_cameras


@torch.no_grad()
def render_orbit(render: Callable[[Cameras], Tensor], views: int, elevation: float = 15.0, chunk: int = 4) -> Tensor:
    """`render(cameras) -> (b, 3, H, W)` over `views` orbit cameras (`csd.cameras.orbit_cameras`,
    front first), `chunk` cameras at a time to bound memory → `(views, 3, H, W)`."""
    cameras = orbit_cameras(views, elevation=elevation)
    return torch.cat([render(cameras[i : i + chunk]) for i in range(0, views, chunk)])
