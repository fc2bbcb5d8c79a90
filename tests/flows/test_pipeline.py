"""Plans, identities and the per-asset stage loop, without Prefect or MLflow."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from flows.catalog import CatalogRow
from flows.pipeline import (
    AssetRecord, StageOutcome, coerce_override, execute_stage, older_than_inputs, plan_asset, run_asset, stage_states,
)
from stages import identity
from stages.config import ConfigError
from stages.nerf import NerfConfig

CUBE = Path(__file__).parents[2] / "catalogs" / "meshes" / "cube.obj"


def _identities(plan):
    return {stage.name: stage.identity for stage in plan.stages}


def test_a_change_invalidates_its_stage_and_everything_downstream_only(tmp_path, tiny):
    row = CatalogRow("red", "a red cube", edit_prompt="a blue cube", line=2)
    base = _identities(plan_asset(row, tmp_path, overrides=tiny))
    assert list(base) == ["nerf", "mesh", "uv", "texture", "edit", "export"]
    assert _identities(plan_asset(row, tmp_path, overrides=tiny)) == base, "identities are deterministic"

    prompt = _identities(plan_asset(dataclasses.replace(row, prompt="a red sphere"), tmp_path, overrides=tiny))
    assert all(prompt[name] != base[name] for name in base), "the prompt feeds nerf, so every stage changes"

    texture = _identities(plan_asset(dataclasses.replace(row, overrides={"texture.steps": "3"}), tmp_path, overrides=tiny))
    assert [name for name in base if texture[name] != base[name]] == ["texture", "edit", "export"]

    edit = _identities(plan_asset(dataclasses.replace(row, edit_prompt="a green cube"), tmp_path, overrides=tiny))
    assert [name for name in base if edit[name] != base[name]] == ["edit", "export"]


def test_texture_only_row_feeds_its_mesh_and_hashes_the_file(tmp_path, tiny):
    mesh = tmp_path / "cube.obj"
    mesh.write_bytes(CUBE.read_bytes())
    row = CatalogRow("tex", "a green cube", mesh=str(mesh), line=3)
    plan = plan_asset(row, tmp_path / "out", overrides=tiny)
    assert [s.name for s in plan.stages] == ["mesh", "uv", "texture", "export"]
    assert plan.stage("mesh").inputs == {"user_mesh": mesh}
    assert plan.stage("uv").inputs == {"mesh": tmp_path / "out" / "tex" / "mesh"}
    assert plan.stage("export").inputs["asset"] == tmp_path / "out" / "tex" / "texture"
    before = _identities(plan)
    mesh.write_text(CUBE.read_text() + "# edited\n")
    assert all(identity != before[name] for name, identity in _identities(plan_asset(row, tmp_path / "out", overrides=tiny)).items())


def test_row_and_preset_fill_the_stage_configs(tmp_path, tiny):
    row = CatalogRow("red", "a red cube", negative_prompt="blurry", seed=9, edit_prompt="a blue cube",
                     overrides={"nerf.steps": "7", "model.dtype": "float32"}, line=2)
    plan = plan_asset(row, tmp_path, overrides={**tiny, "nerf.steps": "3"})
    nerf = plan.stage("nerf").config
    assert (nerf.prompt, nerf.negative_prompt, nerf.seed, nerf.steps) == ("a red cube", "blurry", 9, 7), "the row beats --set"
    assert nerf.model.model == "toy" and nerf.model.device == "cpu", "the preset's model section is merged in"
    assert plan.stage("texture").config.model.dtype == "float32", "model.* overrides reach every stage with a model"
    export = plan.stage("export").config
    assert (export.edit_prompt, export.preset) == ("a blue cube", "toy-cpu")
    assert plan.stage("export").inputs["asset"] == tmp_path / "red" / "edit", "export takes the last textured stage"


def _fake_model(path: Path) -> Path:
    """A diffusers-layout folder as far as planning reads it (planning never loads weights)."""
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v1")
    return path


def test_a_changed_weight_file_replans_the_stages_that_load_the_prior(tmp_path, tiny):
    model = _fake_model(tmp_path / "prior")
    overrides = {**tiny, "model.model": str(model)}
    rows = [CatalogRow("red", "a red cube", edit_prompt="a blue cube", line=2), CatalogRow("tex", "a cube", mesh=str(CUBE), line=3)]
    before = [_identities(plan_asset(row, tmp_path / "out", overrides=overrides)) for row in rows]
    assert [_identities(plan_asset(row, tmp_path / "out", overrides=overrides)) for row in rows] == before
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v2")  # e.g. the toy prior retrained
    after = [_identities(plan_asset(row, tmp_path / "out", overrides=overrides)) for row in rows]
    assert all(after[0][name] != before[0][name] for name in before[0]), "nerf loads the prior; everything after it follows"
    assert [name for name in before[1] if after[1][name] != before[1][name]] == ["texture", "export"], \
        "a texture-only row: mesh and uv load no prior"


def test_a_model_folder_without_an_index_is_refused_at_planning(tmp_path, tiny):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ConfigError, match=r"line 2 \(asset 'red'\), model: .*not-a-model.* not a diffusers model folder"):
        plan_asset(CatalogRow("red", "a red cube", line=2), tmp_path / "out", overrides={**tiny, "model.model": str(tmp_path / "not-a-model")})


def test_a_changed_stage_source_replans_it_and_an_unchanged_tree_reuses_it(tmp_path, tiny, monkeypatch):
    source = tmp_path / "src"
    for package in identity.CODE_PACKAGES:
        shutil.copytree(identity.PROJECT_ROOT / package, source / package,
                        ignore=lambda folder, names: [n for n in names if n == "__pycache__" or not (n.endswith(".py") or Path(folder, n).is_dir())])
    monkeypatch.setattr(identity, "PROJECT_ROOT", source)
    row = CatalogRow("red", "a red cube", line=2)
    plan = plan_asset(row, tmp_path / "out", overrides=tiny)
    for when, name in enumerate(("nerf", "mesh", "uv"), start=1):
        _commit(plan.stage(name), when * 10**18)

    unchanged = plan_asset(row, tmp_path / "out", overrides=tiny)
    assert [execute_stage(unchanged.stage(name)).status for name in ("nerf", "mesh", "uv")] == ["reused"] * 3

    with (source / "stages" / "mesh.py").open("a") as handle:
        handle.write("\n# a behaviour change in the mesh stage\n")
    changed = _identities(plan_asset(row, tmp_path / "out", overrides=tiny))
    assert [name for name in changed if changed[name] != _identities(unchanged)[name]] == ["mesh", "uv", "texture", "export"]
    assert plan.store.committed(plan.stage("mesh").directory, changed["mesh"]) is None, "the committed mesh is not reused"

    with (source / "csd" / "fields.py").open("a") as handle:  # imported by nerf, mesh and uv
        handle.write("\n# a change to the field\n")
    assert _identities(plan_asset(row, tmp_path / "out", overrides=tiny))["nerf"] != changed["nerf"]


def test_overrides_take_the_field_type_and_bad_ones_name_where():
    assert coerce_override(NerfConfig, "steps", "5", "x") == 5
    assert coerce_override(NerfConfig, "lr", "1e-3", "x") == pytest.approx(1e-3)
    assert coerce_override(NerfConfig, "view_dependent", "false", "x") is False
    assert coerce_override(NerfConfig, "model.revision", "none", "x") is None
    assert coerce_override(NerfConfig, "cameras.distance_range", "[1.5, 2.0]", "x") == [1.5, 2.0]
    with pytest.raises(ConfigError, match="line 4, column 'nerf.steps': 'five' is not a whole number"):
        coerce_override(NerfConfig, "steps", "five", "line 4, column 'nerf.steps'")
    with pytest.raises(ConfigError, match="FieldConfig has no field 'levels'; valid: .*n_levels"):
        coerce_override(NerfConfig, "field.levels", "3", "x")


def _fake_executor(done: set[str], fail: str | None = None):
    calls = []

    def execute(stage, force):
        calls.append((stage.name, force))
        if stage.name == fail:
            raise RuntimeError(f"{stage.name} broke")
        status = "reused" if stage.name in done and not force else "ran"
        return StageOutcome(stage.name, status, stage.identity)

    return execute, calls


def test_rerun_forces_the_stage_and_everything_after_it(tmp_path, tiny):
    plan = plan_asset(CatalogRow("red", "a red cube", line=2), tmp_path, overrides=tiny)
    execute, calls = _fake_executor(done={"nerf", "mesh", "uv", "texture", "export"})
    record = run_asset(plan, rerun_stage="uv", execute=execute)
    assert calls == [("nerf", False), ("mesh", False), ("uv", True), ("texture", False), ("export", False)]
    with pytest.raises(ValueError, match="no stage 'edit'"):
        run_asset(plan, rerun_stage="edit", execute=execute)


def _commit(stage, when_ns: int) -> None:
    stage.directory.mkdir(parents=True)
    result = stage.directory / "result.json"
    result.write_text(json.dumps({"stage": stage.name, "identity": stage.identity}))
    os.utime(result, ns=(when_ns, when_ns))


def test_a_stage_committed_before_its_upstream_is_out_of_date(tmp_path, tiny):
    """What makes the stages after a rerun (or a recomputed failed stage) run again, while a stage
    that another batch computed from the current upstream files is reused."""
    plan = plan_asset(CatalogRow("red", "a red cube", line=2), tmp_path, overrides=tiny)
    for name in ("nerf", "mesh", "uv", "texture"):
        # uv committed last: it ran again after texture was made from the old uv
        _commit(plan.stage(name), {"nerf": 1, "mesh": 2, "uv": 9, "texture": 5}[name] * 10**18)
    assert not older_than_inputs(plan.stage("nerf")) and not older_than_inputs(plan.stage("mesh"))
    assert not older_than_inputs(plan.stage("uv"))
    assert older_than_inputs(plan.stage("texture"))
    texture_only = plan_asset(CatalogRow("box", "a box", mesh=str(CUBE), line=3), tmp_path, overrides=tiny)
    _commit(texture_only.stage("mesh"), 10**18)
    assert not older_than_inputs(texture_only.stage("mesh")), "a user mesh file is an input, not a stage"


def test_a_failure_blocks_later_stages_and_is_recorded(tmp_path, tiny):
    plan = plan_asset(CatalogRow("red", "a red cube", line=2), tmp_path, overrides=tiny)
    execute, calls = _fake_executor(done=set(), fail="uv")
    record = run_asset(plan, execute=execute, tracking={"asset_run_id": "abc"})
    assert [name for name, _ in calls] == ["nerf", "mesh", "uv"]
    assert record.status == "failed" and "uv broke" in record.stages["uv"]["error"]
    assert record.stages["texture"]["status"] == record.stages["export"]["status"] == "blocked"
    saved = AssetRecord.load(tmp_path, "red")
    assert saved.stages == record.stages and saved.tracking == {"asset_run_id": "abc"}
    # nothing is committed by the fake executor, so "ran" stages are stale on disk
    assert stage_states(tmp_path)["red"] == {"nerf": "stale", "mesh": "stale", "uv": "failed", "texture": "blocked", "export": "blocked"}


def test_an_error_outside_a_stage_ends_the_record_as_failed_and_goes_on(tmp_path, tiny):
    """An interrupt (or a cancellation, or the store failing) is no stage's failure: `run_asset` does not
    record it as one, but the record must still not stay `running` once its process stops."""
    plan = plan_asset(CatalogRow("red", "a red cube", line=2), tmp_path, overrides=tiny)

    def execute(stage, force):
        if stage.name == "mesh":
            raise KeyboardInterrupt
        return StageOutcome(stage.name, "ran", stage.identity)

    synced = []
    with pytest.raises(KeyboardInterrupt):
        run_asset(plan, execute=execute, saved=lambda record: synced.append(record.status))
    record = AssetRecord.load(tmp_path, "red")
    assert record.status == "failed" and record.finished_at and synced[-1] == "failed", "ended, and synced as ended"
    assert record.stages["mesh"]["error"] == "stage 'mesh' of asset 'red' did not finish: KeyboardInterrupt: "
    assert stage_states(tmp_path)["red"] == {"nerf": "stale", "mesh": "failed", "uv": "blocked", "texture": "blocked", "export": "blocked"}
