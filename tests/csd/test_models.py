"""Loading tiny random SD-like and IF-like models through the loader used for real model ids."""

import pytest
import torch

from csd.guidance import ScoreDistillation, guidance_config
from csd.models import ModelConfig, ModelNotFoundError, load_prior
from csd.prompts import PromptProcessor, TextEmbeddingCache


def test_sd_like_is_a_latent_model_and_guides(sd_like_model, tmp_path):
    prior = load_prior(ModelConfig(model=str(sd_like_model)))
    assert prior.kind == "latent" and prior.resolution == 32 and prior.dtype == torch.float32
    assert not any(p.requires_grad for p in prior.unet.parameters()) and not prior.unet.training
    ids = prior.tokenizer(["a red cube", "a blue sphere"]).input_ids
    assert ids[0] != ids[1], "two different prompts must tokenise differently"
    image = torch.rand(2, 3, 64, 64, requires_grad=True)
    z = prior.encode_images(image)
    assert z.shape == (2, 4, 16, 16)
    processor = PromptProcessor(prior, "a red cube", "blue", cache=TextEmbeddingCache(prior, tmp_path))
    embeddings = processor(torch.zeros(2), torch.tensor([0.0, 180.0]))
    out = ScoreDistillation(prior, guidance_config("csd-refine"))(z, embeddings, step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and image.grad is not None and image.grad.abs().sum() > 0


def test_if_like_is_a_pixel_model_and_drops_variance_channels(if_like_model, tmp_path):
    prior = load_prior(ModelConfig(model=str(if_like_model)))
    assert prior.kind == "pixel" and prior.resolution == 16
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    z = prior.encode_images(image)
    assert z.shape == (1, 3, 16, 16) and z.min() >= -1 and z.max() <= 1
    embeddings = PromptProcessor(prior, "a red cube", cache=TextEmbeddingCache(prior, tmp_path))(torch.zeros(1), torch.zeros(1))
    assert prior.predict_noise(z.detach(), torch.tensor([10]), embeddings.prompt).shape == (1, 3, 16, 16)
    out = ScoreDistillation(prior, guidance_config("csd"))(z, embeddings, step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and image.grad.abs().sum() > 0


def test_different_prompts_give_different_embeddings(if_like_model):
    prior = load_prior(ModelConfig(model=str(if_like_model)))
    e = prior.encode_text(["a red cube", "a blue cube"])
    assert not torch.allclose(e[0], e[1])


def test_missing_model_id_names_it_and_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as error:
        load_prior(ModelConfig(model="stabilityai/not-a-real-model"))
    message = str(error.value)
    assert "stabilityai/not-a-real-model" in message and "HF_HUB_OFFLINE" in message and "local folder" in message
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_prior(ModelConfig(model=str(tmp_path / "not-a-model")))


def test_unknown_dtype_raises(if_like_model):
    with pytest.raises(ValueError, match="float16"):
        load_prior(ModelConfig(model=str(if_like_model), dtype="float8"))


class _VUnet(torch.nn.Module):
    """Returns a fixed v (and records the dtype it was called with)."""

    def __init__(self, v):
        super().__init__()
        self.v, self.dtypes = v, []
        self.config = type("Config", (), {"sample_size": v.shape[-1]})()

    def forward(self, z_t, t, encoder_hidden_states):
        self.dtypes.append((z_t.dtype, encoder_hidden_states.dtype))
        return type("Out", (), {"sample": self.v.to(z_t.dtype)})()


def _prior_with(unet, prediction_type, alphas, dtype=torch.float32):
    from csd.models import DiffusionPrior

    return DiffusionPrior("fake", unet, None, None, alphas, None, torch.device("cpu"), dtype, 77, prediction_type)


def test_v_prediction_is_converted_to_epsilon():
    # x_t = √ᾱ·x0 + √(1−ᾱ)·ε and v = √ᾱ·ε − √(1−ᾱ)·x0  =>  ε = √ᾱ·v + √(1−ᾱ)·x_t
    alphas = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([100, 700])
    a = alphas[t].view(-1, 1, 1, 1)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    prior = _prior_with(_VUnet(v), "v_prediction", alphas)
    torch.testing.assert_close(prior.predict_noise(x_t, t, torch.zeros(2, 5, 8)), eps, atol=1e-5, rtol=1e-5)
    # an ε model's output is passed through unchanged
    torch.testing.assert_close(_prior_with(_VUnet(eps), "epsilon", alphas).predict_noise(x_t, t, torch.zeros(2, 5, 8)), eps)


def test_unsupported_prediction_type_raises_naming_it():
    with pytest.raises(ValueError, match="'sample'"):
        _prior_with(_VUnet(torch.zeros(1)), "sample", torch.ones(10))


def test_half_precision_model_gets_fp16_inputs_but_distils_fp32():
    # official forward_unet (deep_floyd_simple_guidance.py:125-136): only the UNet input is cast
    unet = _VUnet(torch.ones(1, 3, 4, 4))
    prior = _prior_with(unet, "epsilon", torch.linspace(0.99, 0.01, 1000), dtype=torch.float16)
    z = prior.encode_images(torch.rand(1, 3, 4, 4))
    assert z.dtype == torch.float32
    out = prior.predict_noise(z, torch.tensor([5]), torch.zeros(1, 5, 8))
    assert unet.dtypes == [(torch.float16, torch.float16)] and out.dtype == torch.float32


def test_scheduler_prediction_type_is_read_at_load(if_like_model, tmp_path):
    import json
    import shutil

    copy = tmp_path / "v-model"
    shutil.copytree(if_like_model, copy)
    config_file = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    assert load_prior(ModelConfig(model=str(if_like_model))).prediction_type == config.get("prediction_type", "epsilon")
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    assert load_prior(ModelConfig(model=str(copy))).prediction_type == "v_prediction"
    config_file.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        load_prior(ModelConfig(model=str(copy)))


@pytest.mark.parametrize("fixture", ["sd_like_model", "if_like_model"])
def test_perp_neg_guides_latent_and_pixel_priors(fixture, request, tmp_path):
    prior = load_prior(ModelConfig(model=str(request.getfixturevalue(fixture))))
    processor = PromptProcessor(prior, "a red cube", "blurry", cache=TextEmbeddingCache(prior, tmp_path), perp_neg=True)
    image = torch.rand(3, 3, 32, 32, requires_grad=True)
    embeddings = processor(torch.tensor([0.0, 10.0, 70.0]), torch.tensor([30.0, 150.0, 0.0]))
    assert embeddings.perp_neg.shape[:2] == (3, 2) and embeddings.perp_neg_weights[2].tolist() == [0.0, 0.0]
    out = ScoreDistillation(prior, guidance_config("csd-annealed-negative", perp_neg_scale=3.0))(prior.encode_images(image), embeddings, step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and image.grad.abs().sum() > 0 and out.component_norms["perp_neg"] > 0


def test_release_frees_the_text_encoder_and_encode_loads_it_again(if_like_model):
    import gc
    import weakref

    prior = load_prior(ModelConfig(model=str(if_like_model)))
    assert not prior.text_encoder_resident, "loaded on first use: cached prompts never need it"
    before = prior.encode_text(["a red cube"])
    encoder = weakref.ref(prior.text_encoder)
    prior.release_text_encoder()
    gc.collect()
    assert not prior.text_encoder_resident and encoder() is None, "nothing may keep the released encoder alive"
    again = prior.encode_text(["a red cube"])
    assert prior.text_encoder_resident
    torch.testing.assert_close(again, before, msg="the reloaded encoder is the one on disk")
    prior.release_text_encoder()
    assert prior.text_encoder is not None and prior.text_encoder_resident, "attribute access loads it too (tools use it)"


def test_a_prior_without_loader_keeps_its_text_encoder():
    prior = _prior_with(_VUnet(torch.zeros(1, 3, 4, 4)), "epsilon", torch.linspace(0.99, 0.01, 10))
    prior.text_encoder = torch.nn.Identity()
    prior.release_text_encoder()
    assert prior.text_encoder_resident


def test_latent_resolution_is_unet_size_times_vae_downsampling():
    from types import SimpleNamespace

    from csd.models import DiffusionPrior

    # stable-diffusion-2-1-base: unet sample_size 64, VAE 4 blocks (3 downsamplings) but VAE sample_size 768
    unet = SimpleNamespace(config=SimpleNamespace(sample_size=64))
    vae = SimpleNamespace(config=SimpleNamespace(sample_size=768, block_out_channels=[128, 256, 512, 512]))
    prior = DiffusionPrior("sd21", unet, None, None, torch.linspace(0.99, 0.01, 10), vae, torch.device("cpu"), torch.float32, 77)
    assert prior.resolution == 512


@pytest.mark.parametrize("option", ["channels_last", "attention_slicing"])
def test_speed_and_memory_options_change_the_layout_not_the_noise_prediction(sd_like_model, option):
    plain = load_prior(ModelConfig(model=str(sd_like_model)))
    tuned = load_prior(ModelConfig(model=str(sd_like_model), **{option: True}))
    conv = next(m for m in tuned.unet.modules() if isinstance(m, torch.nn.Conv2d))
    if option == "channels_last":
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    else:
        sliced = [m.processor for m in tuned.unet.modules() if hasattr(m, "processor")]
        assert sliced and all("Sliced" in type(p).__name__ for p in sliced), {type(p).__name__ for p in sliced}
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=generator)
    text = plain.encode_text(["a red cube", "a blue sphere"])
    t = torch.tensor([100, 700])
    torch.testing.assert_close(tuned.predict_noise(z, t, text), plain.predict_noise(z, t, text), atol=1e-5, rtol=1e-4)
