"""Quality scores of rendered views: CLIP score for real-model presets, the toy evaluator for toy ones."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from csd.models import ModelNotFoundError

Scorer = Literal["toy", "clip", "none"]
SCORERS = get_args(Scorer)


@dataclass
class QualityScore:
    """`score` is the headline number (toy: fraction of views right on colour and shape, in [0, 1];
    CLIP: mean 100·cos, clamped at 0); `details` holds the rest for card.json."""

    scorer: str
    score: float
    details: dict[str, float]


@functools.lru_cache(maxsize=2)
def _load_clip(model: str):
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(model).eval(), CLIPProcessor.from_pretrained(model)
    except OSError as error:
        raise ModelNotFoundError(
            f"CLIP model {model!r} not found locally ({error}); give a local folder saved with save_pretrained, "
            "or download it once into the Hugging Face cache on a machine with access"
        ) from error


@torch.no_grad()
def clip_score(images: Tensor, prompt: str, model: str) -> QualityScore:
    """CLIP score (Hessel et al.): 100 · max(cos(image, text), 0) per view, averaged.

    `images` `(B, 3, H, W)` in [0, 1]; `model` a transformers CLIP id or local path.
    """
    clip, processor = _load_clip(model)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    inputs = processor(text=[prompt], images=list(pixels), return_tensors="pt", padding=True, do_rescale=True)
    image_embeds = F.normalize(clip.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
    text_embeds = F.normalize(clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")), dim=-1)
    per_view = (100 * image_embeds @ text_embeds.T).squeeze(-1).clamp(min=0)
    return QualityScore("clip", float(per_view.mean()), {"clip_score_min": float(per_view.min()), "clip_score_max": float(per_view.max())})


def view_accuracy(result) -> dict[str, float]:
    """The toy evaluator's fractions of views (a `csd.toy.evaluator.ScoreResult`) under the project's
    one set of names: `colour_accuracy`, `shape_accuracy` and `accuracy` (colour and shape both right)."""
    return {"colour_accuracy": result.colour_fraction, "shape_accuracy": result.shape_fraction, "accuracy": result.fraction_correct}


def toy_score(images: Tensor, prompt: str) -> QualityScore:
    """Fraction of views the independent toy evaluator classifies with the prompt's colour and shape."""
    from csd.toy.evaluator import load_evaluator

    accuracy = view_accuracy(load_evaluator().score(images, prompt))
    both = accuracy.pop("accuracy")
    return QualityScore("toy", both, {**accuracy, "views": float(len(images))})


def score_views(images: Tensor, prompt: str, scorer: str, clip_model: str = "") -> QualityScore | None:
    """Dispatch by scorer name (`toy`, `clip`, `none`)."""
    if scorer == "none":
        return None
    if scorer == "toy":
        return toy_score(images, prompt)
    if scorer == "clip":
        return clip_score(images, prompt, clip_model)
    raise ValueError(f"unknown scorer {scorer!r}; valid: {', '.join(SCORERS)}")
