"""The guidance formula against a fake noise predictor whose output per prompt is known."""

from dataclasses import dataclass

import pytest
import torch

from csd.guidance import GUIDANCE_PRESETS, GuidanceConfig, ScoreDistillation, guidance_config
from csd.prompts import PromptEmbeddings

PROMPT, NEGATIVE, NULL = 1.0, 2.0, 3.0


@dataclass
class FakePrior:
    """ε(z_t, t, e) = k · e[0, 0] + 0.01 · z_t: a different known constant per prompt, plus a z-term."""

    alphas_cumprod: torch.Tensor
    k: float = 0.3
    calls: int = 0
    batch_sizes: tuple = ()

    @property
    def num_train_timesteps(self):
        return self.alphas_cumprod.shape[0]

    def predict_noise(self, z_t, t, embeddings):
        self.calls += 1
        self.batch_sizes += (z_t.shape[0],)
        return self.k * embeddings[:, 0, 0].view(-1, 1, 1, 1) * torch.ones_like(z_t) + 0.01 * z_t


def _embeddings(batch):
    full = lambda v: torch.full((batch, 4, 8), v)  # noqa: E731
    return PromptEmbeddings(full(PROMPT), full(NEGATIVE), full(NULL))


def _expected_gradient(prior, config, z, step, seed):
    """Recompute g independently from the documented formula."""
    c = config.at(step)
    generator = torch.Generator().manual_seed(seed)
    T = prior.num_train_timesteps
    t_min, t_max = round(c["min_step_percent"] * T), round(c["max_step_percent"] * T)
    t = torch.randint(t_min, max(t_min, t_max) + 1, (z.shape[0],), generator=generator).clamp(max=T - 1)
    noise = torch.randn(z.shape, generator=generator)
    ac = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = ac.sqrt() * z + (1 - ac).sqrt() * noise
    eps = lambda value: prior.k * value + 0.01 * z_t  # noqa: E731
    g = c["prompt_scale"] * eps(PROMPT) + c["null_scale"] * eps(NULL) + c["noise_scale"] * noise
    if c["negative_scale"]:
        g = g + c["negative_scale"] * eps(NEGATIVE)
    if config.weighting == "sds":
        g = g * (1 - ac)
    if config.grad_normalize:
        g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return g, t


@pytest.mark.parametrize("preset", list(GUIDANCE_PRESETS))
@pytest.mark.parametrize("step", [0, 2500, 5000, 10_000])
def test_gradient_equals_formula(preset, step):
    prior = FakePrior(torch.linspace(0.999, 0.01, 1000))
    config = guidance_config(preset)
    z = torch.randn(3, 4, 8, 8, requires_grad=True)
    out = ScoreDistillation(prior, config)(z, _embeddings(3), step, torch.Generator().manual_seed(7))
    out.loss.backward()
    expected, t = _expected_gradient(prior, config, z.detach(), step, 7)
    assert torch.equal(out.timesteps, t)
    # d loss / d z_i = g_i / B
    torch.testing.assert_close(z.grad * 3, expected, atol=1e-6, rtol=1e-5)
    assert prior.calls == 1, "all branches must go through one batched UNet call"


def test_zero_coefficients_skip_branches_and_csd_has_no_noise_term():
    prior = FakePrior(torch.linspace(0.999, 0.01, 1000))
    ScoreDistillation(prior, guidance_config("csd"))(torch.randn(2, 4, 8, 8, requires_grad=True), _embeddings(2), 0)
    assert prior.batch_sizes == (4,)  # prompt + null, no negative branch
    annealed = guidance_config("csd-annealed-negative")
    assert annealed.at(0)["negative_scale"] == 0.0 and annealed.at(0)["null_scale"] == -1.0
    assert annealed.at(5000)["negative_scale"] == -1.0 and annealed.at(5000)["null_scale"] == 0.0
    prior.batch_sizes = ()
    ScoreDistillation(prior, annealed)(torch.randn(2, 4, 8, 8, requires_grad=True), _embeddings(2), 6000)
    assert prior.batch_sizes == (4,)  # prompt + negative, null dropped at the end of the anneal


def test_timesteps_follow_the_tmax_schedule():
    prior = FakePrior(torch.linspace(0.999, 0.01, 1000))
    sd = ScoreDistillation(prior, guidance_config("csd-annealed-negative"))
    late = sd(torch.randn(64, 4, 2, 2, requires_grad=True), _embeddings(64), 5000, torch.Generator().manual_seed(0))
    assert int(late.timesteps.max()) <= 500 and int(late.timesteps.min()) >= 20


def test_sds_preset_is_cfg_minus_noise():
    config = guidance_config("sds")
    c = config.at(0)
    assert (c["prompt_scale"], c["null_scale"], c["noise_scale"]) == (100.0, -99.0, -1.0)
    assert config.weighting == "sds"


def test_missing_negative_prompt_raises():
    prior = FakePrior(torch.linspace(0.999, 0.01, 1000))
    embeddings = PromptEmbeddings(torch.ones(1, 4, 8), None, torch.ones(1, 4, 8))
    with pytest.raises(ValueError, match="negative prompt"):
        ScoreDistillation(prior, guidance_config("csd-refine"))(torch.randn(1, 4, 8, 8, requires_grad=True), embeddings, 0)


def test_nan_and_clip():
    prior = FakePrior(torch.linspace(0.999, 0.01, 1000), k=float("nan"))
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = ScoreDistillation(prior, GuidanceConfig(grad_clip=0.05))(z, _embeddings(2), 0)
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() <= 0.05 / 2 + 1e-9


def test_unknown_names_raise_with_valid_list():
    with pytest.raises(ValueError, match="csd-annealed-negative"):
        guidance_config("csd-typo")
    with pytest.raises(ValueError, match="uniform"):
        GuidanceConfig(weighting="linear")
