"""Textured meshes on disk: the hand-off between `uv`, `texture`, `edit` and `export`.

A textured-mesh directory holds `mesh.obj` + `mesh.mtl` + `texture.png` (UVs per vertex, seams
split as xatlas made them) and the same asset as `asset.glb`. World frame is z-up (as the cameras);
the GLB is written y-up as glTF requires (a +90° rotation about x), in metres-as-world-units.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MESH_OBJ, MESH_MTL, TEXTURE_PNG, ASSET_GLB = "mesh.obj", "mesh.mtl", "texture.png", "asset.glb"
TEXTURED_OUTPUTS = {"mesh": MESH_OBJ, "material": MESH_MTL, "texture": TEXTURE_PNG, "glb": ASSET_GLB}

# z-up world → y-up glTF
Z_UP_TO_Y_UP = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


@dataclass
class TexturedMesh:
    """`vertices` `(V, 3)` float32 world (z-up); `faces` `(F, 3)` int64; `uvs` `(V, 2)` in [0, 1]
    (v up, OpenGL convention); `texture` `(H, W, 3)` uint8, row 0 at the top (v = 1)."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    texture: np.ndarray

    def __post_init__(self):
        self.vertices = np.asarray(self.vertices, dtype=np.float32)
        self.faces = np.asarray(self.faces, dtype=np.int64)
        self.uvs = np.asarray(self.uvs, dtype=np.float32)
        self.texture = np.asarray(self.texture)
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"vertices must be (V, 3), got {self.vertices.shape}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"faces must be (F, 3), got {self.faces.shape}")
        if self.uvs.shape != (len(self.vertices), 2):
            raise ValueError(f"uvs must be (V, 2) = ({len(self.vertices)}, 2), got {self.uvs.shape}")
        if self.texture.ndim != 3 or self.texture.shape[2] != 3 or self.texture.dtype != np.uint8:
            raise ValueError(f"texture must be (H, W, 3) uint8, got {self.texture.shape} {self.texture.dtype}")
        if len(self.faces) and (self.faces.min() < 0 or self.faces.max() >= len(self.vertices)):
            raise ValueError("faces index vertices out of range")

    def to_trimesh(self, y_up: bool = False):
        import trimesh
        from PIL import Image

        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.fromarray(self.texture), metallicFactor=0.0, roughnessFactor=1.0
        )
        visual = trimesh.visual.TextureVisuals(uv=self.uvs, material=material)
        mesh = trimesh.Trimesh(self.vertices, self.faces, visual=visual, process=False)
        if y_up:
            mesh.apply_transform(Z_UP_TO_Y_UP)
        return mesh


def write_textured_mesh(mesh: TexturedMesh, directory: Path) -> dict[str, str]:
    """Write OBJ/MTL/PNG and GLB into `directory`; returns `TEXTURED_OUTPUTS` (names → files)."""
    import imageio.v3 as iio

    directory = Path(directory)
    iio.imwrite(directory / TEXTURE_PNG, mesh.texture)
    lines = [f"mtllib {MESH_MTL}", "usemtl material0"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in mesh.uvs]
    lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in (mesh.faces + 1)]
    (directory / MESH_OBJ).write_text("\n".join(lines) + "\n")
    (directory / MESH_MTL).write_text(
        f"newmtl material0\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\nillum 1\nmap_Kd {TEXTURE_PNG}\n"
    )
    mesh.to_trimesh(y_up=True).export(directory / ASSET_GLB, include_normals=True)
    return dict(TEXTURED_OUTPUTS)


def read_textured_mesh(directory: Path) -> TexturedMesh:
    """Read what `write_textured_mesh` wrote (OBJ + PNG; exact, no re-indexing)."""
    import imageio.v3 as iio

    directory = Path(directory)
    vertices, uvs, faces = [], [], []
    for line in (directory / MESH_OBJ).read_text().splitlines():
        if line.startswith("v "):
            vertices.append([float(x) for x in line.split()[1:4]])
        elif line.startswith("vt "):
            uvs.append([float(x) for x in line.split()[1:3]])
        elif line.startswith("f "):
            faces.append([int(corner.split("/")[0]) - 1 for corner in line.split()[1:4]])
    texture = iio.imread(directory / TEXTURE_PNG)[..., :3]
    return TexturedMesh(np.array(vertices), np.array(faces), np.array(uvs), texture)
