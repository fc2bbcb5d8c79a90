"""A vectorised torch rasterizer: the `cpu` backend (it runs on any torch device).

Every triangle is projected to pixel coordinates and expanded into the pixels of its bounding box
(one flat tensor for the whole batch, built with `repeat_interleave`); edge functions decide which
pixel centres it covers, and a z-buffer keeps the nearest triangle per pixel with one
`scatter_reduce(amin)` on a packed `(depth bits, face id)` integer key. Barycentrics are then
recomputed for the winners only and made perspective-correct. Anti-aliasing is left to the caller's
supersampling (`MeshRenderer`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from csd.cameras import Cameras
from csd.raster import Fragments, Rasterizer

NEAR = 1e-3
"""Triangles with a vertex closer than this (view-space depth) are dropped rather than clipped."""
CANDIDATES_PER_CHUNK = 1 << 19
"""Pixel-triangle candidates evaluated at once (~200 bytes each): bounds memory for large or near triangles."""
_EMPTY = torch.iinfo(torch.int64).max


def project(vertices: Tensor, cameras: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """World `(V, 3)` → pixel coordinates `(B, V, 2)` (x right, y down, pixel centres at i + 0.5, as
    `get_rays`) and view-space depth `(B, V)` (distance along the viewing axis)."""
    rotation, position = cameras.c2w[:, :3, :3], cameras.c2w[:, :3, 3]
    camera_space = torch.einsum("bvi,bij->bvj", vertices[None] - position[:, None], rotation)  # R^T (p - o)
    depth = -camera_space[..., 2]
    focal = (0.5 * height / torch.tan(0.5 * torch.deg2rad(cameras.fovy)))[:, None]
    safe = torch.where(depth.abs() > 1e-12, depth, torch.full_like(depth, 1e-12))
    x = 0.5 * width + focal * camera_space[..., 0] / safe
    y = 0.5 * height - focal * camera_space[..., 1] / safe
    return torch.stack([x, y], -1), depth


def _plane_coefficients(corners: Tensor, depth: Tensor) -> tuple[Tensor, Tensor]:
    """Per triangle, screen-space barycentrics and inverse depth as linear functions of the pixel.

    `corners` `(N, 3, 2)`, `depth` `(N, 3)` → `(N, 3, 3)` rows `[a, b, c]` with `bary_k = a x + b y + c`,
    and `(N, 3)` `[a, b, c]` with `1 / depth = a x + b y + c` (exact under perspective)."""
    x, y = corners[..., 0], corners[..., 1]
    x0, x1, x2 = x.unbind(-1)
    y0, y1, y2 = y.unbind(-1)
    area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
    inv_area = 1.0 / torch.where(area == 0, torch.ones_like(area), area)
    # bary_0 = edge(v1, v2, p) / area, etc. (cyclic)
    a = torch.stack([y1 - y2, y2 - y0, y0 - y1], -1) * inv_area[:, None]
    b = torch.stack([x2 - x1, x0 - x2, x1 - x0], -1) * inv_area[:, None]
    c = torch.stack([x1 * y2 - x2 * y1, x2 * y0 - x0 * y2, x0 * y1 - x1 * y0], -1) * inv_area[:, None]
    bary = torch.stack([a, b, c], -1)
    inverse_depth = (bary * (1.0 / depth)[..., None]).sum(1)
    return bary, inverse_depth


def rasterize_screen(pixels: Tensor, depth: Tensor, faces: Tensor, height: int, width: int) -> Fragments:
    """Rasterize triangles given in pixel space.

    `pixels` `(B, V, 2)` vertex positions in pixels (x right, y down), `depth` `(B, V)` positive view
    depth (use ones for an orthographic layout such as a UV map), `faces` `(F, 3)` long. A pixel is
    covered when its centre lies inside or on a triangle's edge; the nearest triangle wins and
    ties go to the lower face id."""
    device = pixels.device
    batch, n_faces = pixels.shape[0], faces.shape[0]
    corners = pixels[:, faces].reshape(-1, 3, 2)  # (B*F, 3, 2)
    corner_depth = depth[:, faces].reshape(-1, 3)
    low, high = corners.amin(1), corners.amax(1)
    x_first = torch.ceil(low[:, 0] - 0.5).clamp(min=0).long()
    x_last = torch.floor(high[:, 0] - 0.5).clamp(max=width - 1).long()
    y_first = torch.ceil(low[:, 1] - 0.5).clamp(min=0).long()
    y_last = torch.floor(high[:, 1] - 0.5).clamp(max=height - 1).long()
    span_x = (x_last - x_first + 1).clamp(min=0)
    span_y = (y_last - y_first + 1).clamp(min=0)
    area = (corners[:, 1, 0] - corners[:, 0, 0]) * (corners[:, 2, 1] - corners[:, 0, 1]) - (
        corners[:, 1, 1] - corners[:, 0, 1]
    ) * (corners[:, 2, 0] - corners[:, 0, 0])
    drawable = (corner_depth > NEAR).all(1) & (area != 0) & torch.isfinite(corners).all(-1).all(-1)
    count = torch.where(drawable, span_x * span_y, torch.zeros_like(span_x))
    triangles = count.nonzero().squeeze(1)
    count = count[triangles]
    bary_plane, depth_plane = _plane_coefficients(corners[triangles], corner_depth[triangles])
    ends = torch.cumsum(count, 0)
    image = torch.div(triangles, n_faces, rounding_mode="floor")
    # per-triangle tables gathered once per candidate with index_select (much cheaper than fancy indexing)
    planes = torch.cat([bary_plane.reshape(-1, 9), depth_plane], 1)  # (T, 12)
    integers = torch.stack(
        [x_first[triangles], y_first[triangles] + image * height, span_x[triangles], ends - count, triangles - image * n_faces], 1
    )  # first column, first row in the stacked (B·H) image, box width, first candidate, face id

    keys = torch.full((batch * height * width,), _EMPTY, dtype=torch.int64, device=device)
    start = 0
    while start < len(triangles):
        # a chunk of whole triangles holding about CANDIDATES_PER_CHUNK candidates (at least one triangle)
        offset = int(ends[start - 1]) if start > 0 else 0
        stop = max(start + 1, int(torch.searchsorted(ends, offset + CANDIDATES_PER_CHUNK, right=True)))
        owner = torch.repeat_interleave(torch.arange(start, stop, device=device), count[start:stop])
        x0, row0, span, first, face = integers.index_select(0, owner).unbind(1)
        plane = planes.index_select(0, owner)
        index = torch.arange(owner.shape[0], device=device) + (offset - first)
        row = torch.div(index, span, rounding_mode="floor")
        px = x0 + (index - row * span)
        py = row0 + row  # row in the stacked (B*H) image
        cx = px.float() + 0.5
        cy = (py % height).float() + 0.5
        inside = plane[:, 0] * cx + plane[:, 1] * cy + plane[:, 2] >= 0
        inside &= plane[:, 3] * cx + plane[:, 4] * cy + plane[:, 5] >= 0
        inside &= plane[:, 6] * cx + plane[:, 7] * cy + plane[:, 8] >= 0
        inverse_depth = plane[:, 9] * cx + plane[:, 10] * cy + plane[:, 11]
        # positive float32 bits order like the floats: (depth bits, face) packs a z-test with ties to the lower id
        depth_bits = (1.0 / inverse_depth.clamp(min=1e-20)).view(torch.int32).long()
        key = torch.where(inside, (depth_bits << 32) | face, _EMPTY)
        keys.scatter_reduce_(0, py * width + px, key, reduce="amin")
        start = stop

    covered = keys != _EMPTY
    face_id = torch.where(covered, keys & 0xFFFFFFFF, torch.full_like(keys, -1))
    barycentrics = torch.zeros(keys.shape[0], 3, device=device)
    view_depth = torch.zeros(keys.shape[0], device=device)
    pixel = covered.nonzero().squeeze(1)
    if pixel.numel():
        image = torch.div(pixel, height * width, rounding_mode="floor")
        rest = pixel - image * height * width
        cy = torch.div(rest, width, rounding_mode="floor").float() + 0.5
        cx = (rest % width).float() + 0.5
        flat_triangle = image * n_faces + face_id[pixel]
        corners_k, depth_k = corners[flat_triangle], corner_depth[flat_triangle]
        plane, _ = _plane_coefficients(corners_k, depth_k)
        screen = (plane[..., 0] * cx[:, None] + plane[..., 1] * cy[:, None] + plane[..., 2]).clamp(min=0)
        weighted = screen / depth_k
        total = weighted.sum(1, keepdim=True)
        barycentrics[pixel] = weighted / total
        view_depth[pixel] = 1.0 / total.squeeze(1)
    return Fragments(
        face_id.view(batch, height, width),
        barycentrics.view(batch, height, width, 3),
        view_depth.view(batch, height, width),
    )


class CpuRasterizer(Rasterizer):
    """The torch rasterizer; anti-aliased by supersampling (default 2×2 samples per pixel)."""

    name = "cpu"
    default_supersample = 2

    def rasterize(self, vertices: Tensor, faces: Tensor, cameras: Cameras, height: int, width: int) -> Fragments:
        with torch.no_grad():
            pixels, depth = project(vertices.float(), cameras, height, width)
            return rasterize_screen(pixels, depth, faces.long(), height, width)
