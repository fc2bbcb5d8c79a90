"""The toy prior report's per-view section, on the shipped prior and evaluator at a tiny sample count."""

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
