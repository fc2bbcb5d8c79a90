"""Contracts whose breakage the rest of the fast suite did not notice (issue #15): each test here
fails when one line of the method is removed — the [0, 1] → [-1, 1] mapping of the model input, the
VAE scaling factor, the elementwise guidance clamp, the clamp of the sampled timestep."""

import torch

from csd.guidance import GuidanceConfig, ScoreDistillation
from csd.models import DiffusionPrior
from csd.prompts import PromptEmbeddings


class _Config(dict):
    __getattr__ = dict.__getitem__


class _PixelUNet(torch.nn.Module):
    config = _Config(sample_size=8)


def _prior(vae=None) -> DiffusionPrior:
    """A prior around `vae` (None: a pixel model at 8²); encode_images reads only sizes, VAE and dtype."""
    return DiffusionPrior("test", _PixelUNet(), torch.nn.Identity(), None, torch.linspace(0.99, 0.01, 10), vae,
                          torch.device("cpu"), torch.float32, 8)


def test_a_pixel_model_sees_renders_mapped_from_0_1_to_minus_1_1():
    prior = _prior()
    black, grey, white = (torch.full((1, 3, 8, 8), v) for v in (0.0, 0.5, 1.0))
    assert torch.equal(prior.encode_images(black), torch.full((1, 3, 8, 8), -1.0)), "black is -1, as IF and the toy prior were trained"
    assert torch.equal(prior.encode_images(grey), torch.zeros(1, 3, 8, 8)), "mid grey is the model's zero"
    assert torch.equal(prior.encode_images(white), torch.ones(1, 3, 8, 8))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = prior.encode_images(images)
    assert z.shape == (2, 3, 8, 8) and -1.0 <= float(z.min()) < -0.5 and 0.5 < float(z.max()) <= 1.0, "resized, then mapped"


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         sample_size=16, norm_num_groups=8, scaling_factor=scaling_factor).eval()


def test_a_latent_model_sees_the_scaled_posterior_mean_of_the_mapped_render():
    vae = _tiny_vae(scaling_factor=0.25)
    prior = _prior(vae)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = prior.encode_images(images)
        unscaled = vae.encode(images * 2 - 1).latent_dist.mean
    assert z.shape == (2, 4, 8, 8)
    # SD's UNet was trained on latents × scaling_factor (0.18215); without it the latents are ~5× too large
    torch.testing.assert_close(z, unscaled * 0.25)
    assert float(z.abs().mean()) < 0.5 * float(unscaled.abs().mean())


class _ConstantNoise:
    """ε = `value` everywhere for every prompt: g is known exactly."""

    def __init__(self, value: float, timesteps: int = 10):
        self.value = value
        self.alphas_cumprod = torch.linspace(0.99, 0.01, timesteps)
        self.seen_t: list[torch.Tensor] = []

    @property
    def num_train_timesteps(self):
        return self.alphas_cumprod.shape[0]

    def predict_noise(self, z_t, t, embeddings):
        self.seen_t.append(t)
        return torch.full_like(z_t, self.value)


def _embeddings(batch):
    return PromptEmbeddings(torch.ones(batch, 2, 4), None, torch.zeros(batch, 2, 4))


def _gradient(prior, config, step=0, batch=2):
    """The g a step applies: loss = 0.5‖z − (z − g)‖² / B, so g = B · ∂loss/∂z."""
    z = torch.zeros(batch, 3, 4, 4, requires_grad=True)
    out = ScoreDistillation(prior, config)(z, _embeddings(batch), step, torch.Generator().manual_seed(0))
    out.loss.backward()
    return z.grad * batch, out


def test_grad_clip_clamps_every_element_of_g_to_its_schedule():
    config = GuidanceConfig(prompt_scale=1.0, null_scale=0.0, grad_clip=[0, 2.0, 0.5, 10])
    grad, out = _gradient(_ConstantNoise(7.0), config, step=0)
    assert torch.allclose(grad, torch.full_like(grad, 2.0)), "g clamped from 7 to 2"
    assert out.grad_norm > 2.0 * grad[0].numel() ** 0.5, "the logged ‖g‖ is before the clamp"
    grad, _ = _gradient(_ConstantNoise(-7.0), config, step=10)
    assert torch.allclose(grad, torch.full_like(grad, -0.5)), "both signs, at the schedule's end value"
    grad, _ = _gradient(_ConstantNoise(7.0), GuidanceConfig(prompt_scale=1.0, null_scale=0.0))
    assert torch.allclose(grad, torch.full_like(grad, 7.0)), "no clamp without grad_clip"


def test_a_max_step_of_one_never_draws_a_timestep_past_the_schedule():
    prior = _ConstantNoise(1.0, timesteps=10)
    _, out = _gradient(prior, GuidanceConfig(prompt_scale=1.0, null_scale=0.0, min_step_percent=0.5, max_step_percent=1.0),
                       batch=64)
    assert int(out.timesteps.max()) == 9 and int(out.timesteps.min()) >= 5, "t in [t_min, T - 1]"
