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
    "line 6, column 'prompt': is empty",
    "line 7, column 'seed': 'abc' is not a whole number from 0 to 4294967295",
    "line 8, column 'preset': unknown preset 'fancy'; valid: ",
    "line 9, column 'mesh': file 'meshes/missing.obj' does not exist",
    "line 10, column 'nerf.steps': 'many' is not a whole number",
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
