"""The toy prior report's per-view and fixed-point sections, on the shipped prior and evaluator at a tiny sample count."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from csd.toy.world import SHAPES
from tools.toy.report import PAIRS, VIEW_CAMERAS, main


@pytest.mark.slow
def test_the_views_section_scores_every_view_and_shape_and_draws_world_over_prior_rows(tmp_path):
    main(["--out", str(tmp_path), "--sections", "views", "--samples-per-pair", "1", "--ddim-steps", "4"])
    views = json.loads((tmp_path / "report.json").read_text())["views"]
    assert list(views) == list(VIEW_CAMERAS)
    for view, numbers in views.items():
        by_shape = numbers["shape by shape"]
        assert list(by_shape) == list(SHAPES)
        # equal groups (6 colours per shape): the per-shape shares average to the overall share
        assert sum(by_shape.values()) / len(SHAPES) == pytest.approx(numbers["shape"]), view
        assert 0.0 <= numbers["colour"] <= 1.0
    grid = Image.open(tmp_path / "views.png")
    assert grid.size == (len(PAIRS) * 32 * 3, 2 * len(VIEW_CAMERAS) * 32 * 3), "a world row over a prior row per view"
    assert "## Prior samples by view" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_the_fixed_point_section_starts_every_guidance_from_the_world_renders(tmp_path):
    from tools.toy.report import ReportConfig, fixed_point_guidances

    main(["--out", str(tmp_path), "--sections", "fixed-point", "--optimise-steps", "1", "--fixed-point-views", "1"])
    rows = json.loads((tmp_path / "report.json").read_text())["fixed-point"]
    guidances = list(fixed_point_guidances(ReportConfig()))
    assert list(rows) == ["world renders", *guidances]
    assert guidances == ["CSD", "CSD, negative prompt", "SDS CFG 100", "SDS CFG 7.5"]
    renders = rows["world renders"]
    assert renders["drift"] == 0.0 and renders["shape"] >= 0.9 and renders["colour"] == 1.0, "the evaluator knows the world's own renders"
    for label in guidances:
        # one Adam step moves a pixel by at most the learning rate (0.02): started from the renders, not from grey
        assert 0.0 < rows[label]["drift"] <= 0.02 + 1e-6, label
        assert sum(rows[label]["shape by shape"].values()) / len(SHAPES) == pytest.approx(rows[label]["shape"]), label
    grid = Image.open(tmp_path / "fixed_point.png")
    assert grid.size == (len(PAIRS) * 32 * 3, (1 + len(guidances)) * 32 * 3), "the renders' row, then one per guidance"
    assert "## Fixed points" in (tmp_path / "report.md").read_text()
