"""The export bundle: files, GLB round trip, Khronos validation, card contents."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stages.assets import TexturedMesh, write_textured_mesh
from stages.common import StageResult, StageWorkspace
from stages.export import ExportConfig, run

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = ROOT / ".cache" / "node" / "node_modules" / "gltf-validator"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import trimesh

    root = tmp_path_factory.mktemp("asset")
    sphere = trimesh.creation.icosphere(2, radius=0.5)
    uv = np.stack([np.arctan2(sphere.vertices[:, 1], sphere.vertices[:, 0]) / (2 * np.pi) + 0.5, sphere.vertices[:, 2] + 0.5], 1)
    texture = np.zeros((32, 32, 3), np.uint8)
    texture[..., 0] = 200
    texture[::4, :, 1] = 255
    mesh = TexturedMesh(sphere.vertices, sphere.faces, uv, texture)
    with StageWorkspace(root / "uv", "uv", "uv-id") as ws:
        outputs = write_textured_mesh(mesh, ws.path)
        ws.commit(StageResult("uv", "", outputs=outputs, timings={"total": 1.5}))
    config = ExportConfig(prompt="a red sphere", negative_prompt="ugly", seed=3, preset="toy-cpu", scorer="none", turntable_frames=16)
    result = run(config, root / "export", inputs={"asset": root / "uv", "uv": root / "uv"}, identity="export-id")
    return mesh, result, root / "export"


def test_bundle_files_and_round_trip(bundle):
    import imageio
    import imageio.v3 as iio
    import trimesh

    mesh, result, directory = bundle
    for name in ("asset.glb", "mesh.obj", "mesh.mtl", "texture.png", "turntable.mp4", "preview.png", "card.json"):
        assert (directory / name).stat().st_size > 0, name
    glb = trimesh.load(directory / "asset.glb", force="mesh", process=False)
    assert len(glb.faces) == len(mesh.faces)
    assert np.array_equal(np.asarray(glb.visual.material.baseColorTexture)[..., :3], mesh.texture)
    # y-up in the GLB: the sphere's +z pole becomes +y
    assert glb.vertices[:, 1].max() == pytest.approx(mesh.vertices[:, 2].max(), abs=1e-5)
    reader = imageio.get_reader(directory / "turntable.mp4")
    assert reader.count_frames() == 16 and reader.get_data(0).shape[0] >= 256
    preview = iio.imread(directory / "preview.png")
    assert preview.shape[0] >= 256 and preview.shape[1] >= 4 * 256


def test_card_has_real_values(bundle):
    mesh, result, directory = bundle
    card = json.loads((directory / "card.json").read_text())
    assert (card["prompt"], card["negative_prompt"], card["seed"], card["preset"]) == ("a red sphere", "ugly", 3, "toy-cpu")
    assert card["stages"]["uv"] == {"identity": "uv-id", "timings": {"total": 1.5}, "metrics": {}}
    assert card["mesh"]["faces"] == len(mesh.faces) and card["mesh"]["watertight"] is True
    assert card["mesh"]["area"] == pytest.approx(np.pi, rel=0.05)
    assert card["software"]["torch"] != "not installed"
    assert result.identity == "export-id" and result.metrics["faces"] == len(mesh.faces)


@pytest.mark.skipif(shutil.which("node") is None or not VALIDATOR.exists(), reason="node or gltf-validator (scripts/setup.sh installs it) missing")
def test_khronos_validator_reports_no_errors(bundle):
    _, _, directory = bundle
    script = (
        "const v=require(process.argv[1]);const fs=require('fs');"
        "v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2]))).then(r=>console.log(JSON.stringify(r.issues)))"
    )
    out = subprocess.run(["node", "-e", script, str(VALIDATOR), str(directory / "asset.glb")], capture_output=True, text=True, check=True)
    issues = json.loads(out.stdout)
    assert issues["numErrors"] == 0, issues["messages"]


def test_unknown_scorer_and_missing_input_raise(tmp_path):
    with pytest.raises(ValueError, match="toy, clip, none"):
        run(ExportConfig(scorer="fid"), tmp_path / "export", inputs={"asset": tmp_path})
    with pytest.raises(ValueError, match="inputs\\['asset'\\]"):
        run(ExportConfig(scorer="none"), tmp_path / "export")
