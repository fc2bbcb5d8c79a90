"""Texture images: the optimised multi-resolution texture of the `texture`/`edit` stages and seam
filling (used by the `uv` bake and after optimisation).

Texture convention (OpenGL/glTF, as `csd.uv` and `stages.assets`): `(H, W, 3)`, row 0 at v = 1,
texel `(row, col)` centred at `u = (col + ½) / W`, `v = 1 − (row + ½) / H`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_EPS = 0.25 / 255
"""Texel values are clamped this far inside (0, 1) before the logit, so an untouched texel keeps its uint8 value."""


def _logit(colour: Tensor) -> Tensor:
    return torch.logit(colour.clamp(LOGIT_EPS, 1 - LOGIT_EPS))


class TextureImage(nn.Module):
    """The optimised texture: `sigmoid(logit(initial) + Σ_k residual_k)`, residual grids at the
    texture size / 2^k, each looked up bilinearly (so a step costs per rendered pixel, not per texel)."""

    def __init__(self, initial: Tensor, levels: int):
        super().__init__()
        height, width, _ = initial.shape
        self.size = (height, width)
        self.register_buffer("initial", initial.float().contiguous())
        self.residuals = nn.ParameterList(
            nn.Parameter(torch.zeros(max(1, height >> k), max(1, width >> k), 3, device=initial.device)) for k in range(levels)
        )

    def sample(self, lookup: Callable[[Tensor], Tensor]) -> Tensor:
        """Colours at the points `lookup(image)` samples (e.g. `lambda t: rasterizer.texture(t, uv)`)."""
        logits = _logit(lookup(self.initial))
        for residual in self.residuals:
            logits = logits + lookup(residual)
        return torch.sigmoid(logits)

    def forward(self) -> Tensor:
        """The whole image `(H, W, 3)` in [0, 1] (texel centres, where sampling and composing agree)."""
        logits = _logit(self.initial).permute(2, 0, 1)[None]
        for residual in self.residuals:
            grid = residual.permute(2, 0, 1)[None]
            if grid.shape[-2:] != logits.shape[-2:]:
                grid = F.interpolate(grid, size=self.size, mode="bilinear", align_corners=False)
            logits = logits + grid
        return torch.sigmoid(logits)[0].permute(1, 2, 0)


def fill_seams(image: np.ndarray, covered: np.ndarray, rings: float | None = None) -> np.ndarray:
    """Copy each texel outside `covered` `(H, W)` from its nearest covered texel, for texels within
    `rings` texels (Euclidean) of the charts, or all of them (`None`): seam inpainting, so bilinear
    and mip-mapped lookups at chart borders only blend chart colours. `image` `(H, W, C)`; texels
    further out keep their values."""
    from scipy.ndimage import distance_transform_edt

    covered = np.asarray(covered, dtype=bool)
    if not covered.any():
        raise ValueError("no texel is covered: nothing to fill the texture from")
    distance, nearest = distance_transform_edt(~covered, return_distances=True, return_indices=True)
    filled = np.asarray(image)[nearest[0], nearest[1]]
    if rings is None:
        return filled
    return np.where((distance <= rings)[..., None], filled, image)
