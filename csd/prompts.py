"""Prompt processing: view-dependent prompts and cached text embeddings.

A `PromptProcessor` turns one prompt, its negative prompt and the empty prompt into text embeddings
once (memory cache, plus an on-disk cache keyed by model and text so a batch of assets sharing a
negative prompt pays once) and releases the prior's text encoder, then serves a batch of cameras
with the view-dependent variant of the prompt (threestudio / DreamFusion: ", front view",
", side view", ", back view", ", overhead view").
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from csd.models import DiffusionPrior

log = logging.getLogger(__name__)

VIEWS = ("front", "side", "back", "overhead")
VIEW_SUFFIXES = {view: f", {view} view" for view in VIEWS}


@dataclass(frozen=True)
class ViewThresholds:
    """Angles (degrees) that pick a view suffix; threestudio defaults."""

    front: float = 45.0
    """Front when |azimuth| < front."""
    back: float = 45.0
    """Back when |azimuth| > 180 - back."""
    overhead: float = 60.0
    """Overhead when elevation > overhead (takes precedence over the azimuth views)."""


def wrap_azimuth(azimuth: Tensor) -> Tensor:
    """Degrees → (-180, 180]."""
    wrapped = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    return torch.where(wrapped == -180.0, torch.full_like(wrapped, 180.0), wrapped)


def view_indices(elevation: Tensor, azimuth: Tensor, thresholds: ViewThresholds = ViewThresholds()) -> Tensor:
    """`(B,)` degrees → `(B,)` long indices into `VIEWS`."""
    azimuth = wrap_azimuth(torch.as_tensor(azimuth, dtype=torch.float32)).abs()
    elevation = torch.as_tensor(elevation, dtype=torch.float32)
    index = torch.full(azimuth.shape, VIEWS.index("side"), dtype=torch.long)
    index[azimuth < thresholds.front] = VIEWS.index("front")
    index[azimuth > 180.0 - thresholds.back] = VIEWS.index("back")
    index[elevation > thresholds.overhead] = VIEWS.index("overhead")
    return index


def view_names(elevation: Tensor, azimuth: Tensor, thresholds: ViewThresholds = ViewThresholds()) -> list[str]:
    return [VIEWS[i] for i in view_indices(elevation, azimuth, thresholds).tolist()]


def view_prompt(prompt: str, view: str) -> str:
    """The prompt with a view suffix; an empty prompt stays empty (it trains/queries ε_∅)."""
    if view not in VIEW_SUFFIXES:
        raise ValueError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")
    return f"{prompt}{VIEW_SUFFIXES[view]}" if prompt else prompt


# Perp-Neg weight curves a·e^(−b·r) + c (threestudio/models/prompt_processors/base.py,
# PromptProcessor.Config perp_neg_f_*; the weights used are their negatives)
PERP_NEG_F_FS = (4.0, 0.5, -2.426)
"""front↔side: the weight of the front negative as the view turns from front (r=1) to side (r=0)."""
PERP_NEG_F_SF = (4.0, 0.5, -2.426)
"""front↔side: the weight of the side negative, evaluated at 1 − r."""
PERP_NEG_F_SB = (1.0, 0.5, -0.606)
"""side→back: the weight of the side negative."""
PERP_NEG_F_FSB = (1.0, 0.5, 0.967)
"""side→back: the weight of the front negative (behind the object the front must stay away)."""


def shifted_exponential(a: float, b: float, c: float, r: Tensor) -> Tensor:
    return a * torch.exp(-b * r) + c


@dataclass
class PromptEmbeddings:
    """Per-camera text embeddings, each `(B, L, D)`; `negative` is None when there is no negative prompt.

    With Perp-Neg, `prompt` is the azimuth-interpolated view embedding, `perp_neg` holds two
    negative view embeddings per camera `(B, 2, L, D)` and `perp_neg_weights` their weights `(B, 2)`."""

    prompt: Tensor
    negative: Tensor | None
    null: Tensor
    perp_neg: Tensor | None = None
    perp_neg_weights: Tensor | None = None


def cache_root() -> Path:
    """The project's cache: `$CSD_ASSET_CACHE`, else `$XDG_CACHE_HOME/csd-asset` (`~/.cache/csd-asset`)."""
    root = os.environ.get("CSD_ASSET_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "csd-asset")
    return Path(root)


def default_cache_dir() -> Path:
    return cache_root() / "text-embeddings"


class TextEmbeddingCache:
    """Text → embedding, in memory and on disk; keyed by the model's identity and the exact text."""

    def __init__(self, prior: "DiffusionPrior", cache_dir: Path | None = None):
        self.prior = prior
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._memory: dict[str, Tensor] = {}

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.prior.identity}\x00{text}".encode()).hexdigest()[:32]

    def get(self, texts: list[str]) -> Tensor:
        """`N` texts → `(N, L, D)` embeddings on the prior's device and dtype."""
        from safetensors.torch import load_file, save_file

        missing = []
        for text in dict.fromkeys(texts):
            key = self._key(text)
            if key in self._memory:
                continue
            path = self.cache_dir / f"{key}.safetensors"
            if path.exists():
                try:
                    self._memory[key] = load_file(str(path))["embedding"]
                    continue
                except Exception as error:  # a torn file from a killed process: recompute it
                    log.warning("ignoring unreadable embedding cache file %s: %s", path, error)
            missing.append(text)
        if missing:
            embeddings = self.prior.encode_text(missing).detach().to("cpu", torch.float32)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for text, embedding in zip(missing, embeddings):
                key = self._key(text)
                self._memory[key] = embedding.contiguous()
                tmp = self.cache_dir / f".{key}.{os.getpid()}.tmp"
                save_file({"embedding": self._memory[key]}, str(tmp))
                os.replace(tmp, self.cache_dir / f"{key}.safetensors")
        stacked = torch.stack([self._memory[self._key(t)] for t in texts])
        return stacked.to(self.prior.device, self.prior.dtype)


class PromptProcessor:
    """Embeddings of one prompt (view-dependent or not), its negative prompt and the empty prompt."""

    def __init__(
        self,
        prior: "DiffusionPrior",
        prompt: str,
        negative_prompt: str = "",
        view_dependent: bool = True,
        thresholds: ViewThresholds = ViewThresholds(),
        cache: TextEmbeddingCache | None = None,
        perp_neg: bool = False,
        release_text_encoder: bool = True,
    ):
        """`release_text_encoder`: free the prior's text encoder once the embeddings are made (the
        prior loads it again if a later prompt needs it)."""
        if not prompt.strip():
            raise ValueError("prompt is empty; a prompt describes the asset to generate")
        if perp_neg and not view_dependent:
            # as the official code (base.py get_text_embeddings_perp_neg asserts view-dependent prompting)
            raise ValueError("perp_neg needs view_dependent prompts (it interpolates the front/side/back embeddings)")
        self.perp_neg = perp_neg
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.view_dependent = view_dependent
        self.thresholds = thresholds
        self.cache = cache or TextEmbeddingCache(prior)
        # every text the stage will condition on (Perp-Neg reuses the view prompts), embedded in one
        # call; then the text encoder is dropped, so optimisation runs without it
        views = [view_prompt(prompt, v) for v in VIEWS] if view_dependent else [prompt]
        embeddings = self.cache.get([*views, "", *([negative_prompt] if negative_prompt else [])])
        self._prompt_embeddings = embeddings[: len(views)]  # (V, L, D)
        self._null = embeddings[len(views) : len(views) + 1]  # (1, L, D)
        self._negative = embeddings[len(views) + 1 :] if negative_prompt else None
        # a stand-in prior without the method (tests' fakes) has nothing to release
        release = getattr(prior, "release_text_encoder", None)
        if release_text_encoder and release is not None:
            release()

    def __call__(self, elevation: Tensor, azimuth: Tensor) -> PromptEmbeddings:
        """Embeddings for a batch of cameras given by `(B,)` elevation and azimuth in degrees."""
        batch = len(elevation)
        if self.view_dependent:
            index = view_indices(elevation.cpu(), azimuth.cpu(), self.thresholds).to(self._prompt_embeddings.device)
            prompt = self._prompt_embeddings[index]
        else:
            prompt = self._prompt_embeddings.expand(batch, -1, -1)
        negative = self._negative.expand(batch, -1, -1) if self._negative is not None else None
        null = self._null.expand(batch, -1, -1)
        if not self.perp_neg:
            return PromptEmbeddings(prompt, negative, null)
        positive, negatives, weights = self._perp_neg(elevation.cpu(), azimuth.cpu(), negative if negative is not None else null)
        return PromptEmbeddings(positive, negative, null, negatives, weights)

    def _perp_neg(self, elevation: Tensor, azimuth: Tensor, uncond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Interpolated positive `(B, L, D)`, two negative view embeddings `(B, 2, L, D)` and their
        weights `(B, 2)`, as threestudio/models/prompt_processors/base.py get_text_embeddings_perp_neg:

        - overhead (elevation > threshold): the overhead embedding, no negatives (weights 0);
        - |az| < 90: r = 1 − |az|/90, positive r·front + (1 − r)·side, negatives front and side with
          weights −f_fs(r), −f_sf(1 − r);
        - otherwise: r = 2 − |az|/90, positive r·side + (1 − r)·back, negatives side and front with
          weights −f_sb(r), −f_fsb(r)."""
        views = self._prompt_embeddings.float()
        front, side, back, overhead = (views[VIEWS.index(v)] for v in ("front", "side", "back", "overhead"))
        index = view_indices(elevation, azimuth, self.thresholds)
        az = wrap_azimuth(torch.as_tensor(azimuth, dtype=torch.float32)).abs().to(views.device)
        is_overhead = (index == VIEWS.index("overhead")).to(views.device)
        front_side = az < 90.0
        r = torch.where(front_side, 1.0 - az / 90.0, 2.0 - az / 90.0)
        rv = r.view(-1, 1, 1)
        positive = torch.where(front_side.view(-1, 1, 1), rv * front + (1 - rv) * side, rv * side + (1 - rv) * back)
        first = torch.where(front_side.view(-1, 1, 1), front, side)
        second = torch.where(front_side.view(-1, 1, 1), side, front)
        w_first = torch.where(front_side, -shifted_exponential(*PERP_NEG_F_FS, r), -shifted_exponential(*PERP_NEG_F_SB, r))
        w_second = torch.where(front_side, -shifted_exponential(*PERP_NEG_F_SF, 1 - r), -shifted_exponential(*PERP_NEG_F_FSB, r))
        weights = torch.stack([w_first, w_second], dim=1)
        negatives = torch.stack([first, second], dim=1)
        # overhead: the overhead embedding and two dummy negatives (the negative prompt) of weight 0
        positive = torch.where(is_overhead.view(-1, 1, 1), overhead.expand_as(positive), positive)
        dummy = uncond.float().to(views.device)[:, None].expand_as(negatives)
        negatives = torch.where(is_overhead.view(-1, 1, 1, 1), dummy, negatives)
        weights = torch.where(is_overhead.view(-1, 1), torch.zeros_like(weights), weights)
        dtype = self._prompt_embeddings.dtype
        return positive.to(dtype), negatives.to(dtype), weights

    def texts(self, elevation: Tensor, azimuth: Tensor) -> list[str]:
        """The prompts used for these cameras (for logging)."""
        if not self.view_dependent:
            return [self.prompt] * len(elevation)
        return [view_prompt(self.prompt, v) for v in view_names(elevation, azimuth, self.thresholds)]
