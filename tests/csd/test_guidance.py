"""The guidance formula against a fake noise predictor whose output per prompt is known."""

import math
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
    # floor, as the official set_min_max_steps (deep_floyd_simple_guidance.py:120-122)
    t_min, t_max = int(c["min_step_percent"] * T), int(c["max_step_percent"] * T)
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
    if c["grad_clip"] is not None:
        g = g.clamp(-c["grad_clip"], c["grad_clip"])
    if config.grad_normalize is True or config.grad_normalize == "sample":
        g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    elif config.grad_normalize == "batch":
        g = g / (torch.sqrt((g**2).sum()) + 1e-8)
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


def test_tmax_is_a_step_at_5000():
    # configs/csd-if.yaml:81 max_step_percent [5000, 0.98, 0.5, 5001]: threestudio C() is linear
    # between the integer steps 5000 and 5001, so t_max is 0.98 up to step 5000 and 0.5 from 5001
    prior = FakePrior(torch.linspace(0.999, 0.01, 1000))
    sd = ScoreDistillation(prior, guidance_config("csd-annealed-negative"))
    for step, t_max in ((0, 980), (5000, 980), (5001, 500), (9999, 500)):
        out = sd(torch.randn(512, 4, 2, 2, requires_grad=True), _embeddings(512), step, torch.Generator().manual_seed(0))
        assert out.coefficients["max_step_percent"] == pytest.approx(t_max / 1000)
        assert int(out.timesteps.min()) >= 20 and int(out.timesteps.max()) <= t_max
        assert int(out.timesteps.max()) > t_max - 40, "t_max must be reached, not a smaller bound"


def test_batch_normalisation_divides_by_the_whole_tensor_norm():
    # deep_floyd_simple_guidance.py:262-263: grad / (grad.norm(2) + 1e-8) over the whole (B, C, H, W)
    prior = FakePrior(torch.linspace(0.999, 0.01, 1000))
    z = torch.randn(4, 3, 8, 8, requires_grad=True)
    # per-sample prompt constants: g_i = k·(p_i − NULL) = 0.3·(1, 10, 100, 1000)
    prompt = (NULL + torch.tensor([1.0, 10.0, 100.0, 1000.0])).view(4, 1, 1).expand(4, 4, 8)
    embeddings = PromptEmbeddings(prompt, None, torch.full((4, 4, 8), NULL))
    ScoreDistillation(prior, GuidanceConfig(grad_normalize="batch"))(z, embeddings, 0, torch.Generator().manual_seed(3)).loss.backward()
    g = z.grad * 4  # d loss / d z_i = g_i / B
    assert float(g.norm()) == pytest.approx(1.0, abs=1e-5)
    # whole-tensor norm of 0.3·(1, 10, 100, 1000) over 192 values per sample, by hand
    whole = 0.3 * (192 * (1 + 100 + 10_000 + 1_000_000)) ** 0.5
    torch.testing.assert_close(g[:, 0, 0, 0], 0.3 * torch.tensor([1.0, 10.0, 100.0, 1000.0]) / whole, rtol=1e-4, atol=1e-7)
    z.grad = None
    ScoreDistillation(prior, GuidanceConfig(grad_normalize="sample"))(z, embeddings, 0, torch.Generator().manual_seed(3)).loss.backward()
    torch.testing.assert_close((z.grad * 4).flatten(1).norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)


def test_clip_comes_before_normalisation():
    # deep_floyd_simple_guidance.py:258-263: nan_to_num, clamp, then normalise: the result has norm 1
    prior = FakePrior(torch.linspace(0.999, 0.01, 1000), k=50.0)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    ScoreDistillation(prior, GuidanceConfig(grad_clip=0.05, grad_normalize="batch"))(z, _embeddings(2), 0).loss.backward()
    assert float((z.grad * 2).norm()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="batch"):
        GuidanceConfig(grad_normalize="whole")


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


# --- Perp-Neg (threestudio/models/prompt_processors/base.py get_text_embeddings_perp_neg,
#     deep_floyd_simple_guidance.py:168-206,253-254) ---


class TextPrior(FakePrior):
    """Texts → fixed random (2, 16) embeddings; ε(z_t, e) = e[:, 0] as a (4, 2, 2) image + 0.01·z_t,
    so different prompts give non-parallel ε and the perpendicular parts are not trivially zero."""

    identity = "text-prior"
    device = torch.device("cpu")
    dtype = torch.float32

    def encode_text(self, texts):
        out = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(text)) % (2**31))
            out.append(torch.randn(2, 16, generator=g))
        return torch.stack(out)

    def predict_noise(self, z_t, t, embeddings):
        self.calls += 1
        self.batch_sizes += (z_t.shape[0],)
        return embeddings[:, 0].reshape(z_t.shape) + 0.01 * z_t


def _perp(x, y):
    """x minus its projection on y, with explicit flat dot products."""
    x, y = x.flatten(), y.flatten()
    return (x - (x @ y) / max(float(y @ y), 1e-6) * y).view(4, 2, 2)


def _expected_perp_neg(prior, prompt, negative, elevation, azimuth, scale):
    """g per camera from the documented formula, sample by sample in plain Python."""
    from csd.prompts import view_prompt

    emb = lambda text: prior.encode_text([text])[0]  # noqa: E731
    eps = lambda e: e[0].view(4, 2, 2)  # noqa: E731 (the 0.01·z_t terms cancel in every difference below)
    front, side, back, overhead = (emb(view_prompt(prompt, v)) for v in ("front", "side", "back", "overhead"))
    uncond, null = emb(negative), emb("")
    f = lambda a, b, c, r: a * math.exp(-b * r) + c  # noqa: E731
    rows = []
    for el, az in zip(elevation, azimuth):
        a = abs((az + 180) % 360 - 180)
        if el > 60:
            pos, negs, weights = overhead, [], []
        elif a < 90:
            r = 1 - a / 90
            pos, negs, weights = r * front + (1 - r) * side, [front, side], [-f(4, 0.5, -2.426, r), -f(4, 0.5, -2.426, 1 - r)]
        else:
            r = 2 - a / 90
            pos, negs, weights = r * side + (1 - r) * back, [side, front], [-f(1, 0.5, -0.606, r), -f(1, 0.5, 0.967, r)]
        e_pos = eps(pos) - eps(uncond)
        g = eps(pos) - eps(null)  # csd-if.yaml at step 0: cond 1, uncond 0, null -1
        for w, n in zip(weights, negs):
            g = g + scale * w * _perp(eps(n) - eps(uncond), e_pos)
        rows.append(g)
    return torch.stack(rows)


def _perp_neg_run(tmp_path, elevation, azimuth, normalize="none"):
    from csd.prompts import PromptProcessor, TextEmbeddingCache, ViewThresholds

    prior = TextPrior(torch.linspace(0.999, 0.01, 1000))
    processor = PromptProcessor(prior, "a corgi", "ugly", thresholds=ViewThresholds(front=30, back=30),
                                cache=TextEmbeddingCache(prior, tmp_path), perp_neg=True)
    elevation, azimuth = torch.tensor(elevation), torch.tensor(azimuth)
    embeddings = processor(elevation, azimuth)
    config = guidance_config("csd-annealed-negative", perp_neg_scale=3.0, grad_normalize=normalize)
    z = torch.randn(len(elevation), 4, 2, 2, requires_grad=True)
    prior.calls, prior.batch_sizes = 0, ()
    ScoreDistillation(prior, config)(z, embeddings, 0, torch.Generator().manual_seed(0)).loss.backward()
    return prior, embeddings, z.grad * len(elevation)


def test_perp_neg_matches_an_independent_recomputation(tmp_path):
    elevation = [0.0, 10.0, 0.0, 20.0, 0.0, 70.0, -5.0]
    azimuth = [0.0, 45.0, 90.0, 135.0, 180.0, -60.0, -120.0]
    prior, _, g = _perp_neg_run(tmp_path, elevation, azimuth)
    expected = _expected_perp_neg(prior, "a corgi", "ugly", elevation, azimuth, 3.0)
    torch.testing.assert_close(g, expected, atol=1e-5, rtol=1e-5)
    without = _expected_perp_neg(prior, "a corgi", "ugly", elevation, azimuth, 0.0)
    term = (expected - without).flatten(1).norm(dim=1)
    assert term[[0, 2, 3, 4, 6]].min() > 0.1, "the Perp-Neg term must matter here"
    # at 45° the two equal weights cancel: (F − u) + (S − u) = 2(P − u) has no perpendicular part;
    # overhead has no negatives
    assert term[1] < 1e-4 and term[5] == 0
    # prompt, negative ("uncond", needed even at coefficient 0), null, two view negatives: one call
    assert prior.calls == 1 and prior.batch_sizes == (5 * 7,)
    _, _, g_batch = _perp_neg_run(tmp_path, elevation, azimuth, normalize="batch")
    torch.testing.assert_close(g_batch, expected / expected.norm(), atol=1e-6, rtol=1e-5)


def test_perp_neg_side_and_overhead_views_by_hand(tmp_path):
    prior, embeddings, g = _perp_neg_run(tmp_path, [0.0, 75.0], [90.0, 90.0])
    # side (azimuth 90): the side→back branch with r = 1: weights −(e^−0.5 − 0.606), −(e^−0.5 + 0.967)
    e = math.exp(-0.5)
    torch.testing.assert_close(embeddings.perp_neg_weights[0], torch.tensor([-(e - 0.606), -(e + 0.967)]))
    side, front = (prior.encode_text([f"a corgi, {v} view"])[0] for v in ("side", "front"))
    torch.testing.assert_close(embeddings.prompt[0], side)
    torch.testing.assert_close(embeddings.perp_neg[0, 0], side)
    torch.testing.assert_close(embeddings.perp_neg[0, 1], front)
    eps = lambda e_: e_[0].view(4, 2, 2)  # noqa: E731
    ugly, null = prior.encode_text(["ugly"])[0], prior.encode_text([""])[0]
    # the side negative is the positive itself: no perpendicular part; only the front one pushes
    by_hand = eps(side) - eps(null) + 3.0 * -(e + 0.967) * _perp(eps(front) - eps(ugly), eps(side) - eps(ugly))
    torch.testing.assert_close(g[0], by_hand, atol=1e-5, rtol=1e-5)
    # overhead (elevation 75 > 60): the overhead prompt, no negatives
    overhead = prior.encode_text(["a corgi, overhead view"])[0]
    torch.testing.assert_close(embeddings.prompt[1], overhead)
    assert embeddings.perp_neg_weights[1].tolist() == [0.0, 0.0]
    torch.testing.assert_close(g[1], eps(overhead) - eps(null), atol=1e-5, rtol=1e-5)


def test_perp_neg_off_keeps_plain_view_prompts(tmp_path):
    from csd.prompts import PromptProcessor, TextEmbeddingCache

    prior = TextPrior(torch.linspace(0.999, 0.01, 1000))
    processor = PromptProcessor(prior, "a corgi", "ugly", cache=TextEmbeddingCache(prior, tmp_path))
    embeddings = processor(torch.tensor([0.0]), torch.tensor([45.0]))
    assert embeddings.perp_neg is None
    torch.testing.assert_close(embeddings.prompt[0], prior.encode_text(["a corgi, side view"])[0])
    with pytest.raises(ValueError, match="view_dependent"):
        PromptProcessor(prior, "a corgi", view_dependent=False, cache=TextEmbeddingCache(prior, tmp_path), perp_neg=True)
