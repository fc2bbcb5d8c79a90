"""Components of the toy prior: a word-level tokenizer, a tiny CLIP text encoder, a small UNet.

All three are stock `transformers` / `diffusers` classes saved in the diffusers layout, so the
prior is loaded by exactly the code that loads Stable Diffusion or DeepFloyd IF. Only one thing is
added at load time: `CanonicalPromptTokenizer`, which rewrites prompts as people write them ("An
orange cube.") into the captions the prior was trained on ("a orange cube") before tokenising.
"""

from __future__ import annotations

import json
from pathlib import Path

from csd.toy.world import canonical_prompt, vocabulary

PROMPT_NORMALISATION = "canonical-prompt-1"
"""Names `canonical_prompt`'s rules in the toy prior's identity (so the embedding cache, keyed by the
raw text, never serves an embedding made before or under other rules)."""

MAX_LENGTH = 16
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")


def build_tokenizer():
    """Word-level fast tokenizer over the world's vocabulary; unknown words map to [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=MAX_LENGTH,
    )


def build_text_encoder(vocab_size: int, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
        bos_token_id=SPECIAL_TOKENS.index("[BOS]"),
        eos_token_id=SPECIAL_TOKENS.index("[EOS]"),
    )
    return CLIPTextModel(config)


def build_unet(seed: int = 0):
    """(32, 64, 128)-wide UNet at 32², cross-attention only at 8² and in the mid block."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    # IF stage I uses the squared-cosine schedule with ε-prediction
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def save_pipeline(directory: Path, unet, text_encoder, tokenizer, scheduler) -> None:
    """Write the diffusers on-disk layout (unet/, text_encoder/, tokenizer/, scheduler/, model_index.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(directory / "unet")
    text_encoder.save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "tokenizer")
    scheduler.save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "IFPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "unet": ["diffusers", type(unet).__name__],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))


class CanonicalPromptTokenizer:
    """The toy prior's tokenizer behind `csd.toy.world.canonical_prompt`: articles, capitals, light
    punctuation and word order as people write them mean what they say (issue 18).

    The prior's vocabulary is the captions' words; "an" or "cube." would be `[UNK]` and "a cube, red"
    a word order it never saw. Normalising here, rather than training those forms in, keeps the
    shipped weights (and the stage identities that hash them) unchanged. Every other attribute is
    the wrapped tokenizer's.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, *args, **kwargs):
        texts = canonical_prompt(text) if isinstance(text, str) else [canonical_prompt(t) for t in text]
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)
