"""Stage plumbing: config building, atomic workspaces, textured-mesh hand-off files."""

import dataclasses
from typing import Literal

import numpy as np
import pytest

from csd.cameras import CameraConfig
from csd.checks import validate
from stages.assets import TexturedMesh, read_textured_mesh, write_textured_mesh
from stages.common import StageResult, StageWorkspace, completed
from stages.config import ConfigError, build_config, config_hash, flatten, load_preset, preset_names


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 3
    ratio: float = 0.5


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = Inner()
    cameras: CameraConfig = CameraConfig()


def test_build_config_nested_and_dotted_overrides():
    config = build_config(Outer, {"inner": {"width": 5}}, {"inner.ratio": 1, "cameras.fovy_range": [30, 40]})
    assert config.inner == Inner(5, 1.0) and isinstance(config.inner.ratio, float)
    assert config.cameras.fovy_range == (30, 40)


def test_unknown_fields_name_the_path_and_valid_fields():
    with pytest.raises(ConfigError, match=r"Outer.inner: unknown field\(s\) widht; valid: ratio, width"):
        build_config(Outer, {"inner": {"widht": 5}})


@dataclasses.dataclass(frozen=True)
class Checked:
    mode: Literal["fast", "exact"] = "fast"
    steps: int = 1

    def __post_init__(self):
        validate(self)  # the Literal options
        if self.steps < 1:  # a config may also raise a plain ValueError
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class Holder:
    checked: Checked = Checked()
    cameras: CameraConfig = CameraConfig()


def test_every_bad_nested_value_is_reported_with_its_path_and_the_valid_options():
    with pytest.raises(ConfigError) as caught:
        build_config(Holder, {"checked": {"mode": "fats"}}, {"cameras.distance_range": [2, -1], "cameras.fovy_range": [0, 50]},
                     where="stage")
    assert caught.value.problems == [
        ("stage.checked.mode", "'fats' is not one of fast, exact"),
        ("stage.cameras.distance_range", "[2, -1] has min > max; expected [min, max] with min <= max"),
        ("stage.cameras.fovy_range", "[0, 50] must be positive; expected [min, max] with 0 < min <= max"),
    ]
    with pytest.raises(ConfigError, match=r"^stage.checked: steps must be >= 1, got 0$"):
        build_config(Holder, {"checked": {"steps": 0}}, where="stage")


def test_hash_changes_with_config_and_flatten():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(build_config(Outer, {}, {"inner.width": 4}))
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


def test_presets_are_listed_and_unknown_preset_lists_valid():
    assert {"toy-cpu", "if-gpu"} <= set(preset_names())
    with pytest.raises(ConfigError, match="toy-cpu"):
        load_preset("toy-gpu")


def test_workspace_commits_atomically_and_keeps_old_result_on_failure(tmp_path):
    target = tmp_path / "asset" / "mesh"
    with StageWorkspace(target, "mesh", "id-1") as ws:
        (ws.path / "out.txt").write_text("first")
        assert not target.exists()
        ws.commit(StageResult("mesh", "", outputs={"out": "out.txt"}))
    assert (target / "out.txt").read_text() == "first" and completed(target, "id-1")

    with pytest.raises(RuntimeError, match="boom"):
        with StageWorkspace(target, "mesh", "id-2") as ws:
            (ws.path / "out.txt").write_text("second")
            raise RuntimeError("boom")
    assert (target / "out.txt").read_text() == "first", "a failing run must not touch the finished result"
    assert completed(target, "id-2") is None

    with StageWorkspace(target, "mesh", "id-3") as ws:
        assert not (ws.path / "out.txt").exists(), "a partial dir of another identity is cleared"
        (ws.path / "out.txt").write_text("third")
        ws.commit(StageResult("mesh", "", outputs={"out": "out.txt"}))
    assert completed(target, "id-3").path("out").read_text() == "third"
    assert sorted(p.name for p in target.parent.iterdir()) == ["mesh"]


def test_textured_mesh_round_trip(tmp_path):
    import trimesh

    box = trimesh.creation.box()
    rng = np.random.default_rng(0)
    mesh = TexturedMesh(box.vertices, box.faces, rng.random((len(box.vertices), 2)), rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    write_textured_mesh(mesh, tmp_path)
    back = read_textured_mesh(tmp_path)
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_allclose(back.uvs, mesh.uvs, atol=1e-6)
    assert np.array_equal(back.faces, mesh.faces) and np.array_equal(back.texture, mesh.texture)
    glb = trimesh.load(tmp_path / "asset.glb", force="mesh")
    assert len(glb.faces) == 12
    # written y-up: the box's z extent becomes its y extent (same here), and the texture survives
    assert np.array_equal(np.asarray(glb.visual.material.baseColorTexture)[..., :3], mesh.texture)
    with pytest.raises(ValueError, match="uvs must be"):
        TexturedMesh(box.vertices, box.faces, np.zeros((3, 2)), mesh.texture)


def test_stage_lock_excludes_a_second_run_until_released(tmp_path):
    from stages.common import stage_lock

    target = tmp_path / "asset" / "nerf"
    with stage_lock(target):
        with pytest.raises(TimeoutError, match="locked by another run"):
            with stage_lock(target, timeout=0.3):
                pass
    with stage_lock(target, timeout=0.3):
        assert (tmp_path / "asset" / "nerf.lock").read_text().startswith(__import__("socket").gethostname())
