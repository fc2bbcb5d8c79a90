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
    """Write OBJ/MTL/PNG (trimesh's OBJ exporter: one `f a/a b/b c/c` corner per vertex, white
    diffuse times the texture) and GLB into `directory`; returns `TEXTURED_OUTPUTS` (names → files)."""
    import trimesh
    from PIL import Image
    from trimesh.exchange.obj import export_obj

    directory = Path(directory)
    material = trimesh.visual.material.SimpleMaterial(
        image=Image.fromarray(mesh.texture), name=Path(TEXTURE_PNG).stem, diffuse=(255, 255, 255, 255),
        ambient=(255, 255, 255, 255), specular=(0, 0, 0, 255),
    )
    obj = trimesh.Trimesh(mesh.vertices, mesh.faces, visual=trimesh.visual.TextureVisuals(uv=mesh.uvs, material=material), process=False)
    text, files = export_obj(obj, include_normals=False, include_color=False, return_texture=True, mtl_name=MESH_MTL, header=None)
    if sorted(files) != sorted([MESH_MTL, TEXTURE_PNG]):
        raise RuntimeError(f"trimesh's OBJ export wrote {sorted(files)}, expected {MESH_MTL} and {TEXTURE_PNG}")
    (directory / MESH_OBJ).write_text(text)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    mesh.to_trimesh(y_up=True).export(directory / ASSET_GLB, include_normals=True)
    return dict(TEXTURED_OUTPUTS)


def read_textured_mesh(directory: Path) -> TexturedMesh:
    """Read what `write_textured_mesh` wrote (the OBJ through trimesh in file order, no re-indexing;
    the texture from `texture.png`)."""
    import imageio.v3 as iio
    import trimesh

    directory = Path(directory)
    path = directory / MESH_OBJ
    loaded = trimesh.load(path, process=False, maintain_order=True, skip_materials=True, force="mesh")
    uvs = getattr(loaded.visual, "uv", None)
    if uvs is None or len(uvs) != len(loaded.vertices):
        raise ValueError(f"{path}: no per-vertex texture coordinates (a textured mesh has one `vt` per `v`)")
    texture = iio.imread(directory / TEXTURE_PNG)[..., :3]
    return TexturedMesh(np.asarray(loaded.vertices), np.asarray(loaded.faces), np.asarray(uvs), texture)
