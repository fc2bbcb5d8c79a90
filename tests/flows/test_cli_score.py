"""`csd-asset score`: finds finished stages as `status` does, prints a table or JSON per asset."""

import json

from flows.cli import main
from flows.pipeline import AssetRecord
from tests.stages.test_score import commit_uv, textured_cube


def _asset(root, asset_id, prompt, colour):
    commit_uv(root / asset_id / "uv", textured_cube(colour), identity=f"{asset_id}-uv")
    stages = {"nerf": {"status": "failed", "identity": "x"}, "uv": {"status": "ran", "identity": f"{asset_id}-uv"},
              "texture": {"status": "pending", "identity": "y"}}
    AssetRecord(asset_id, {"asset_id": asset_id, "prompt": prompt}, "toy-cpu", {}, status="failed", stages=stages).save(root)


def test_score_json_and_table(tmp_path, capsys):
    _asset(tmp_path, "red-cube", "a red cube", (0.85, 0.10, 0.08))
    _asset(tmp_path, "chair", "a wooden chair", (0.5, 0.3, 0.1))
    assert main(["score", str(tmp_path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by_id = {line["asset_id"]: line for line in lines}
    assert set(by_id) == {"red-cube", "chair"}
    uv = by_id["red-cube"]["stages"]["uv"]
    assert list(by_id["red-cube"]["stages"]) == ["uv"]  # the failed nerf and the missing texture are not scored
    assert by_id["red-cube"]["prompt"] == "a red cube"
    assert uv["best_shape"] == "cube" and uv["shape_iou"] >= 0.97 and uv["colour_error"] < 0.01
    for key in ("shape_margin", "colour_accuracy", "shape_accuracy", "views"):
        assert key in uv
    assert by_id["chair"]["stages"]["uv"]["not_scored"] == "not a toy-world prompt"

    assert main(["score", str(tmp_path), "--asset", "chair"]) == 0
    out = capsys.readouterr().out
    assert "not a toy-world prompt" in out and "red-cube" not in out
    assert main(["score", str(tmp_path), "--asset", "nope"]) == 1
    assert "no asset 'nope'" in capsys.readouterr().err
