"""Shared fixtures: tiny random diffusion models saved in the diffusers layout (get_dummy_components)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _write_index(path: Path, components: dict) -> None:
    index = {"_class_name": "Pipeline", **{name: [lib, cls] for name, (lib, cls) in components.items()}}
    (path / "model_index.json").write_text(json.dumps(index))


def _tiny_clip_tokenizer():
    """A real BPE CLIPTokenizer over a tiny vocabulary, built from vocab/merges objects (not files)."""
    from transformers import CLIPTokenizer

    words = ["a", "red", "blue", "cube", "sphere", "front", "side", "back", "overhead", "view", ","]
    letters = sorted(set("".join(words)))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [f"{c}</w>" for c in letters] + [f"{w}</w>" for w in words]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in words:
        if len(word) > 1:  # merge left to right: r e d</w> -> re d</w> -> red</w>
            pieces = list(word[:-1]) + [word[-1] + "</w>"]
            while len(pieces) > 1:
                merged = pieces[0] + pieces[1]
                if merged not in vocab:
                    vocab[merged] = len(vocab)
                merges.append((pieces[0], pieces[1]))
                pieces = [merged] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16, pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def sd_like_model(tmp_path_factory) -> Path:
    """Latent model: tiny UNet (4 channels, 16²), tiny AutoencoderKL (32² → 16²), tiny CLIP, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = tmp_path_factory.mktemp("sd-like")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).save_pretrained(path / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, sample_size=32, norm_num_groups=8,
    ).save_pretrained(path / "vae")
    tokenizer = _tiny_clip_tokenizer()
    tokenizer.save_pretrained(path / "tokenizer")
    CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    ).save_pretrained(path / "text_encoder")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear").save_pretrained(path / "scheduler")
    _write_index(path, {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                        "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
                        "scheduler": ("diffusers", "DDIMScheduler")})
    return path


@pytest.fixture(scope="session")
def if_like_model(tmp_path_factory) -> Path:
    """Pixel model as DeepFloyd IF stage I: 3-channel UNet with learned variance (6 out), tiny T5, no VAE."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from csd.toy.model import build_tokenizer

    path = tmp_path_factory.mktemp("if-like")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).save_pretrained(path / "unet")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path / "tokenizer")
    T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, pad_token_id=0)
    ).save_pretrained(path / "text_encoder")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range").save_pretrained(
        path / "scheduler"
    )
    _write_index(path, {"unet": ("diffusers", "UNet2DConditionModel"), "text_encoder": ("transformers", "T5EncoderModel"),
                        "tokenizer": ("transformers", "PreTrainedTokenizerFast"), "scheduler": ("diffusers", "DDPMScheduler")})
    return path
