"""Catalog reading and validation: every problem reported at once, precisely; nothing runs."""

from pathlib import Path

import pytest

from flows.catalog import CatalogError
from flows.cli import main
from flows.pipeline import load_catalog

CUBE = Path(__file__).parents[2] / "catalogs" / "meshes" / "cube.obj"

# ten defects, one per line, each a different kind
DEFECTIVE = """asset_id,prompt,seed,preset,mesh,nerf.steps,nerf.stepz,colour
good,a red cube,0,,,5,,
good,a blue cube,1,,,,,
../escape,a red cube,,,,,,
..,a red cube,,,,,,
no-prompt,,,,,,,
bad-seed,a red cube,abc,,,,,
bad-preset,a red cube,,fancy,,,,
no-mesh,a red cube,,,meshes/missing.obj,,,
bad-steps,a red cube,,,,many,,
"""
EXPECTED = [
    "header: column 'nerf.stepz': NerfConfig has no field 'stepz'; valid:",
    "header: unknown column 'colour'",
    "line 3, column 'asset_id': 'good' duplicates the asset on line 2",
    "line 4, column 'asset_id': '../escape' contains a path separator",
    "line 5, column 'asset_id': '..' contains '..'",
    "line 6, column 'prompt' (asset 'no-prompt'): is empty",
    "line 7, column 'seed' (asset 'bad-seed'): 'abc' is not a whole number from 0 to 4294967295",
    "line 8, column 'preset' (asset 'bad-preset'): unknown preset 'fancy'; valid: ",
    "line 9, column 'mesh' (asset 'no-mesh'): file 'meshes/missing.obj' does not exist",
    "line 10, column 'nerf.steps' (asset 'bad-steps'): 'many' is not a whole number",
]


def test_ten_defects_give_ten_precise_messages_and_no_work(tmp_path, tiny):
    path = tmp_path / "bad.csv"
    path.write_text(DEFECTIVE)
    with pytest.raises(CatalogError) as caught:
        load_catalog(path, overrides=tiny, out=tmp_path / "out")
    problems = caught.value.problems
    assert len(problems) == 10, "\n".join(problems)
    for expected, problem in zip(EXPECTED, problems):
        assert problem.startswith(expected), f"{problem!r} should start with {expected!r}"
    assert "toy-cpu" in problems[7], "an unknown preset lists the valid ones"
    assert not (tmp_path / "out").exists(), "validation starts no work"


def test_validate_command_exits_non_zero_and_prints_every_problem(tmp_path, capsys, tiny):
    path = tmp_path / "bad.csv"
    path.write_text(DEFECTIVE)
    assert main(["validate", str(path), *(f"--set={k}={v}" for k, v in tiny.items())]) == 1
    assert capsys.readouterr().err.count("\n  - ") == 10


def test_bom_crlf_quoted_commas_and_newlines_are_accepted(tmp_path, tiny):
    (tmp_path / "meshes").mkdir()
    (tmp_path / "meshes" / "cube.obj").write_bytes(CUBE.read_bytes())
    text = (
        'asset_id,prompt,negative_prompt,seed,edit_prompt,mesh,nerf.steps\r\n'
        '"red-cube","a red cube, shiny","noisy, blurry",7,a blue cube,,12\r\n'
        'textured,"a green\ncube",,,,meshes/cube.obj,\r\n'
        '\r\n'
    )
    path = tmp_path / "ok.csv"
    path.write_bytes("\ufeff".encode() + text.encode())
    catalog, plans = load_catalog(path, overrides=tiny)
    red, textured = catalog.rows
    assert (red.asset_id, red.prompt, red.negative_prompt, red.seed) == ("red-cube", "a red cube, shiny", "noisy, blurry", 7)
    assert red.overrides == {"nerf.steps": "12"} and red.edit_prompt == "a blue cube"
    assert textured.prompt == "a green\ncube" and textured.line == 3
    assert textured.mesh == str((tmp_path / "meshes" / "cube.obj").resolve())

    red_plan, textured_plan = plans
    nerf = red_plan.stage("nerf").config
    assert (nerf.prompt, nerf.negative_prompt, nerf.seed, nerf.steps) == ("a red cube, shiny", "noisy, blurry", 7, 12)
    assert red_plan.stage("edit").config.prompt == "a blue cube"
    assert red_plan.stage("edit").config.source_prompt == "a red cube, shiny"
    assert [s.name for s in textured_plan.stages][0] == "mesh", "a texture-only row skips nerf"
    assert textured_plan.stage("mesh").inputs == {"user_mesh": Path(textured.mesh)}


def test_missing_required_column_is_reported_before_rows(tmp_path, tiny):
    path = tmp_path / "no-prompt.csv"
    path.write_text("asset_id,seed\nred,1\n")
    with pytest.raises(CatalogError, match="missing required column 'prompt'"):
        load_catalog(path, overrides=tiny)


def test_shipped_catalogs_are_valid():
    root = Path(__file__).parents[2] / "catalogs"
    for name in ("demo.csv", "nightly-example.csv"):
        catalog, plans = load_catalog(root / name)
        assert len(plans) == len(catalog.rows) >= 3
    _, demo = load_catalog(root / "demo.csv")
    assert any(p.row.edit_prompt for p in demo) and any(p.row.mesh for p in demo)


# nested config values the stages would refuse only after the model loaded
NESTED = """asset_id,prompt,mesh,nerf.renderer.background,nerf.field.density_activation,nerf.cameras.distance_range,nerf.renderer.num_samples
bg,a red cube,,lerned,,,
relu,a red cube,,,relu,,
cams,a red cube,,,,"[2, -1]",
samples,a red cube,,,,,0
two,a red cube,,lerned,,,0
garbage,a red cube,meshes/garbage.obj,,,,
empty,a red cube,meshes/empty.obj,,,,
"""


def test_bad_nested_values_and_unloadable_meshes_are_refused_at_planning(tmp_path, tiny, monkeypatch):
    import csd.models

    def no_loading(*args, **kwargs):
        raise AssertionError("validation must not load a model")

    monkeypatch.setattr(csd.models, "load_prior", no_loading)
    (tmp_path / "meshes").mkdir()
    (tmp_path / "meshes" / "garbage.obj").write_text("v 1 2\nf garbage here\nnot an obj at all\n")
    (tmp_path / "meshes" / "empty.obj").write_text("# no vertices, no faces\n")
    path = tmp_path / "nested.csv"
    path.write_text(NESTED)
    with pytest.raises(CatalogError) as caught:
        load_catalog(path, overrides=tiny, out=tmp_path / "out")
    problems = caught.value.problems
    expected = [
        "line 7, column 'mesh' (asset 'garbage'): 'meshes/garbage.obj' cannot be loaded as a mesh (ValueError: ",
        "line 8, column 'mesh' (asset 'empty'): 'meshes/empty.obj' cannot be loaded as a mesh",
        "line 2, column 'nerf.renderer.background' (asset 'bg'): 'lerned' is not one of solid, random, learned",
        "line 3, column 'nerf.field.density_activation' (asset 'relu'): 'relu' is not one of softplus, exp",
        "line 4, column 'nerf.cameras.distance_range' (asset 'cams'): [2, -1] has min > max; expected [min, max] with min <= max",
        "line 5, column 'nerf.renderer.num_samples' (asset 'samples'): 0 must be >= 1",
        "line 6, column 'nerf.renderer.num_samples' (asset 'two'): 0 must be >= 1",  # every bad value of a row, in field order
        "line 6, column 'nerf.renderer.background' (asset 'two'): 'lerned' is not one of solid, random, learned",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for want, problem in zip(expected, problems):
        assert problem.startswith(want), f"{problem!r} should start with {want!r}"
    assert "with at least one triangle" in problems[0], "the message says what a mesh cell must name"
    assert not (tmp_path / "out").exists()


def test_a_bad_nested_value_from_set_or_a_preset_names_where_it_came_from(tmp_path, tiny):
    path = tmp_path / "one.csv"
    path.write_text("asset_id,prompt\nred,a red cube\n")
    with pytest.raises(CatalogError) as caught:
        load_catalog(path, overrides={**tiny, "nerf.renderer.background": "lerned"}, out=tmp_path / "out")
    assert caught.value.problems == ["--set nerf.renderer.background (asset 'red'): 'lerned' is not one of solid, random, learned"]

    preset = tmp_path / "broken.yaml"
    preset.write_text("nerf:\n  cameras:\n    fovy_range: [40, 200]\n")
    path.write_text(f"asset_id,prompt,preset\nred,a red cube,{preset.name}\n")
    with pytest.raises(CatalogError) as caught:
        load_catalog(path, overrides=tiny, out=tmp_path / "out")
    assert caught.value.problems == [
        f"line 2 (asset 'red'), preset {str(preset)!r}, nerf.cameras.fovy_range: [40, 200] must lie within [0, 180]"
    ]


def test_validate_command_refuses_a_nested_value_naming_the_valid_options(tmp_path, capsys, tiny):
    path = tmp_path / "bg.csv"
    path.write_text("asset_id,prompt,nerf.renderer.background\nred,a red cube,lerned\n")
    assert main(["validate", str(path), *(f"--set={k}={v}" for k, v in tiny.items())]) == 1
    err = capsys.readouterr().err
    assert "line 2, column 'nerf.renderer.background' (asset 'red'): 'lerned' is not one of solid, random, learned" in err


def test_validate_command_reports_every_bad_nested_value_of_a_row_before_any_model_loads(tmp_path, capsys, tiny, monkeypatch):
    import csd.models

    def no_loading(*args, **kwargs):
        raise AssertionError("validation must not load a model")

    monkeypatch.setattr(csd.models, "load_prior", no_loading)
    path = tmp_path / "three.csv"
    path.write_text(
        "asset_id,prompt,nerf.renderer.background,nerf.cameras.distance_range,nerf.renderer.num_samples,nerf.field.normal_type\n"
        'red,a red cube,lerned,"[2, -1]",0,\n'
        "blue,a blue cube,,,,autograd\n"
    )
    assert main(["validate", str(path), "--out", str(tmp_path / "out"), *(f"--set={k}={v}" for k, v in tiny.items())]) == 1
    err = capsys.readouterr().err
    for message in [
        "line 2, column 'nerf.renderer.background' (asset 'red'): 'lerned' is not one of solid, random, learned",
        "line 2, column 'nerf.cameras.distance_range' (asset 'red'): [2, -1] has min > max; expected [min, max] with min <= max",
        "line 2, column 'nerf.renderer.num_samples' (asset 'red'): 0 must be >= 1",
        "line 3, column 'nerf.field.normal_type' (asset 'blue'): 'autograd' is not one of finite_difference, analytic",
    ]:
        assert message in err, err
    assert "4 problem(s)" in err, err
    assert not (tmp_path / "out").exists()


def test_validate_command_reports_bad_stage_level_values_of_every_stage_with_line_and_column(tmp_path, capsys, tiny):
    path = tmp_path / "stages.csv"
    path.write_text(
        "asset_id,prompt,nerf.perp_neg,nerf.view_dependent,mesh.extraction.resolution,texture.evaluator,export.video\n"
        "red,a red cube,true,false,0,clip,on\n"
    )
    assert main(["validate", str(path), "--out", str(tmp_path / "out"), *(f"--set={k}={v}" for k, v in tiny.items())]) == 1
    err = capsys.readouterr().err
    for message in [
        "line 2, column 'nerf.perp_neg' (asset 'red'): needs view_dependent: true",
        "line 2, column 'mesh.extraction.resolution' (asset 'red'): 0 must be >= 8",
        "line 2, column 'texture.evaluator' (asset 'red'): 'clip' is not one of none, toy",
        # a cell of a Literal field is taken as written (YAML would have read `on` as true)
        "line 2, column 'export.video' (asset 'red'): 'on' is not one of mp4, gif",
    ]:
        assert message in err, err
    assert "4 problem(s)" in err, err
