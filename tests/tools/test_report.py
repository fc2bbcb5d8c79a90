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


def test_the_empirical_prior_denoises_to_its_bank_images_of_the_prompted_pair_only():
    import torch

    from csd.models import ModelConfig, load_prior_cached
    from tools.toy.report import EmpiricalPrior, world_bank

    prior = load_prior_cached(ModelConfig(model="toy"))
    images, pairs = world_bank(2, seed=5)
    assert images.shape == (2 * len(PAIRS), 3, 32, 32) and pairs.tolist() == [p for p in range(len(PAIRS)) for _ in range(2)]
    bank = prior.encode_images(images)
    keys = prior.encode_text([PAIRS[0], PAIRS[7], ""])
    ideal = EmpiricalPrior(prior, bank, pairs, keys, torch.tensor([0, 7, -1]))
    assert ideal.num_train_timesteps == prior.num_train_timesteps, "everything but predict_noise is the prior's"
    t = torch.tensor([20, 20, 20])
    alpha = prior.alphas_cumprod[20]
    z_t = alpha.sqrt() * bank[[0, 0, 0]]  # a noise-free x_t on pair 0's first image
    eps = ideal.predict_noise(z_t, t, keys)
    x0 = (z_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    assert torch.allclose(x0[0], bank[0], atol=1e-4), "pair 0's prompt: its own bank image"
    assert torch.allclose(x0[2], bank[0], atol=1e-4), "the empty prompt: every image, so the same one"
    # pair 7's prompt may only use pair 7's two images: x̂₀ is one of them (at small t the posterior is sharp)
    assert min(float((x0[1] - bank[i]).abs().max()) for i in (14, 15)) < 1e-3
    with pytest.raises(ValueError, match="not one of its keys"):
        ideal.predict_noise(z_t[:1], t[:1], prior.encode_text([PAIRS[3]]))


@pytest.mark.slow
def test_the_fixed_points_under_the_ideal_bank_drop_the_negative_row_and_say_which_prior(tmp_path, monkeypatch):
    import tools.toy.report as report

    asked = []
    predict = report.EmpiricalPrior.predict_noise
    monkeypatch.setattr(report.EmpiricalPrior, "predict_noise", lambda self, *a: asked.append(len(a[0])) or predict(self, *a))
    main(["--out", str(tmp_path), "--sections", "fixed-point", "--optimise-steps", "1", "--fixed-point-views", "1", "--ideal-bank", "1"])
    rows = json.loads((tmp_path / "report.json").read_text())["fixed-point"]
    assert list(rows) == ["world renders", "CSD", "SDS CFG 100", "SDS CFG 7.5"]
    assert asked == [2 * len(PAIRS)] * 3, "each guidance's one step asked the bank's denoiser (prompt and empty branches)"
    assert "exact denoiser of 1 fresh world renders per pair" in (tmp_path / "report.md").read_text()
