"""The `nvdiffrast` backend: NVIDIA's CUDA rasterizer, interpolation, texturing and analytic antialias.

Imported only by `csd.raster.get_rasterizer("nvdiffrast" | "auto")` on a CUDA machine: nvdiffrast
compiles CUDA sources at first use and cannot load without a GPU.

Conventions bridged here: clip-space y is negated so nvdiffrast's row 0 is the top row (as
`get_rays`; nvdiffrast puts NDC y = -1 in row 0), its barycentrics `(u, v)` weigh vertices 0 and 1
(vertex 2 gets `1 - u - v`), and its texture v axis runs down the image rows, so lookups use `1 - v`.
"""

from __future__ import annotations

import sys

import nvdiffrast.torch as dr
import torch
from torch import Tensor

from csd.cameras import Cameras, projection_matrix
from csd.raster import Fragments, Rasterizer


def _load_plugin() -> None:
    """Compile (first use) and load nvdiffrast's CUDA plugin.

    diffrp-nvdiffrast 0.3.3.1 builds it with `torch.utils.cpp_extension.load` and then imports it by
    name, but torch no longer puts the build directory on `sys.path`, so that import fails with "No
    module named 'nvdiffrast_plugin_…'" although the build succeeded (torch 2.11 on an H200,
    2026-12-04). Then the build directory goes on the path and the plugin is asked for again."""
    from nvdiffrast.torch import ops

    try:
        ops._get_plugin()
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("nvdiffrast_plugin"):
            raise
        from torch.utils.cpp_extension import _get_build_directory

        sys.path.insert(0, _get_build_directory(error.name, verbose=False))
        ops._get_plugin()


class NvdiffrastRasterizer(Rasterizer):
    """nvdiffrast on one CUDA device; anti-aliased analytically (no supersampling by default)."""

    name = "nvdiffrast"
    default_supersample = 1

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        _load_plugin()
        self.context = dr.RasterizeCudaContext(device=self.device)
        self._faces_key: tuple[int, int] | None = None
        self._faces_int32: Tensor | None = None
        self._topology_hash = None

    def _triangles(self, faces: Tensor) -> Tensor:
        """int32 faces and antialias topology hash, built once per (fixed) face tensor."""
        key = (faces.data_ptr(), faces.shape[0])
        if key != self._faces_key:
            self._faces_int32 = faces.to(self.device, torch.int32).contiguous()
            self._topology_hash = dr.antialias_construct_topology_hash(self._faces_int32)
            self._faces_key = key
        return self._faces_int32

    def rasterize(self, vertices: Tensor, faces: Tensor, cameras: Cameras, height: int, width: int) -> Fragments:
        triangles = self._triangles(faces)
        with torch.no_grad():
            cameras = cameras.to(self.device)
            world_to_camera = torch.linalg.inv(cameras.c2w.float())
            homogeneous = torch.cat([vertices.float(), torch.ones_like(vertices[:, :1].float())], -1)
            camera_space = torch.einsum("bij,vj->bvi", world_to_camera, homogeneous)
            clip = torch.einsum("bij,bvj->bvi", projection_matrix(cameras.fovy, width / height), camera_space)
            clip = clip * torch.tensor([1.0, -1.0, 1.0, 1.0], device=self.device)
            clip = clip.contiguous()
            raster, _ = dr.rasterize(self.context, clip, triangles, resolution=[height, width])
            face_id = raster[..., 3].long() - 1
            u, v = raster[..., 0], raster[..., 1]
            covered = face_id >= 0
            barycentrics = torch.stack([u, v, 1 - u - v], -1) * covered[..., None]
            depth, _ = dr.interpolate((-camera_space[..., 2:3]).contiguous(), raster, triangles)
        return Fragments(face_id, barycentrics, depth[..., 0] * covered, state=(raster, clip))

    def interpolate(self, attributes: Tensor, faces: Tensor, fragments: Fragments) -> Tensor:
        raster, _ = fragments.state
        # instanced mode (per-camera clip positions): attributes broadcast along the minibatch as (1, V, C)
        values, _ = dr.interpolate(attributes.float()[None].contiguous(), raster, self._triangles(faces))
        return values

    def texture(self, image: Tensor, uv: Tensor) -> Tensor:
        flipped = torch.stack([uv[..., 0], 1 - uv[..., 1]], -1).contiguous()
        return dr.texture(image[None].float().contiguous(), flipped, filter_mode="linear", boundary_mode="clamp")

    def antialias(self, image: Tensor, fragments: Fragments, faces: Tensor) -> Tensor:
        raster, clip = fragments.state
        self._triangles(faces)
        return dr.antialias(image.contiguous(), raster, clip, self._faces_int32, topology_hash=self._topology_hash)
