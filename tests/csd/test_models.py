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
