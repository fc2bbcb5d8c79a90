"""An independent evaluator of the shapes world: a small CNN that names the colour and shape in an image.

Our CPU stand-in for CLIP R-precision: `score(images, "a red cube")` says, per image, whether the
prompted colour and shape are what it sees. It is trained separately from the prior, on fresh
renders of `csd.toy.world` drawn from its own seeds, and never on pipeline outputs.

It is open-set (issue 13): besides the world's four shapes its shape head has an `other` class,
trained on renders of non-primitives (`csd.toy.world.sample_other_scenes`: stretched and deformed
primitives, unions and differences of two, horns, bumps, blobs, two objects side by side), so a
vase with a horn is not "a cube". Only views that do not look like a primitive are `other` examples
(`OTHER_MAX_IOU`). A prediction of `other` is a wrong shape for every prompt.

Score-distilled images do not look like the world's renders: their backgrounds are tinted and
often saturated, their edges blurry or noisy. An evaluator trained only on the world's light
backgrounds reads those as something else (it called everything "torus"), so training composites
the object over tinted, gradient and blotchy backgrounds (some in the very colours of the
classes) and adds blur, noise, crops, scaling and colour jitter. Both heads pool the feature map
with a learned spatial attention, so colour is read where the object is, not from the corners.

Training lives outside the package (seeded; see `evaluator.json` for the commands and wall times)::

    python tools/toy/train_evaluator.py

writes `csd/toy/evaluator.safetensors` and `csd/toy/evaluator.json` (architecture, training
command and config, wall time and held-out accuracies: plain, tinted and other).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from csd.cameras import sample_cameras
from csd.toy.world import (
    COLOUR_NAMES,
    QUALITY_TAGS,
    SHAPES,
    WorldConfig,
    degrade,
    primitive_silhouette_iou,
    render_layers,
    sample_other_scenes,
    sample_scenes,
    tinted_backgrounds,
)

EVALUATOR_WEIGHTS = Path(__file__).parent / "evaluator.safetensors"
"""The shipped weights; the architecture and training record sit next to them in `evaluator.json`."""

# World seeds of the evaluator's data, far from the prior's training pool (seed · 1_000_003 + i, i < 10^5).
TRAIN_SEED = 1_000_000_000
VALIDATION_SEED = 1_500_000_000
REPORT_SEED = 2_000_000_000
"""Seed of the report's accuracy renders (not seen by the evaluator's training)."""
OTHER_SEED_OFFSET = 250_000_000
"""Added to a seed for the non-primitive renders drawn next to the primitives of that seed."""
OTHER_MAX_IOU = 0.85
"""An `other` view is kept only when its silhouette's IoU with the best-fitting primitive is at most
this (true primitives score 0.94 or more in 95 % of views; see `primitive_silhouette_iou`)."""
OTHER = "other"
"""The shape class of everything that is none of the world's shapes; never a prompt's shape."""


@dataclass(frozen=True)
class EvaluatorConfig:
    """Architecture of the evaluator (stored in `evaluator.json`)."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    """Channels per resolution level (32², 16², 8², 4²)."""
    resolution: int = 32
    """Input side; other sizes are resized to it."""
    colours: tuple[str, ...] = COLOUR_NAMES
    """Colour classes, in the order of the colour head's outputs."""
    shapes: tuple[str, ...] = SHAPES + (OTHER,)
    """Shape classes, in the order of the shape head's outputs (the world's, then `other`)."""


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class AttentionPool(nn.Module):
    """Features `(B, C, h, w)` → `(B, C)`: a softmax-weighted mean over positions, weights from a 1×1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.logits = nn.Conv2d(channels, 1, 1)

    def forward(self, features: Tensor) -> Tensor:
        weights = self.logits(features).flatten(1).softmax(dim=1)  # (B, h·w)
        return torch.einsum("bn,bcn->bc", weights, features.flatten(2))


@dataclass
class EvaluatorOutput:
    """Logits `(B, n_colours)` and `(B, n_shapes)`."""

    colour_logits: Tensor
    shape_logits: Tensor


@dataclass
class ScoreResult:
    """What the evaluator sees in `B` images against the prompt(s) they were made for.

    Probabilities are over `colour_names` / `shape_names`, in that order; `*_target` are indices
    into them, parsed from the prompt. `shape_names` may end in `other` (never a target, so an image
    seen as `other` has a wrong shape whatever it was prompted for).
    """

    colour_names: tuple[str, ...]
    shape_names: tuple[str, ...]
    colour_probs: Tensor  # (B, n_colours)
    shape_probs: Tensor  # (B, n_shapes)
    colour_target: Tensor  # (B,) long
    shape_target: Tensor  # (B,) long
    colour_correct: Tensor  # (B,) bool: the most probable colour is the prompted one
    shape_correct: Tensor  # (B,) bool

    @property
    def correct(self) -> Tensor:
        """`(B,)` bool: colour and shape both right."""
        return self.colour_correct & self.shape_correct

    @property
    def colour_fraction(self) -> float:
        return float(self.colour_correct.float().mean())

    @property
    def shape_fraction(self) -> float:
        return float(self.shape_correct.float().mean())

    @property
    def fraction_correct(self) -> float:
        """Share of images whose colour and shape both match the prompt."""
        return float(self.correct.float().mean())

    @property
    def predicted_colours(self) -> list[str]:
        return [self.colour_names[i] for i in self.colour_probs.argmax(1).tolist()]

    @property
    def predicted_shapes(self) -> list[str]:
        return [self.shape_names[i] for i in self.shape_probs.argmax(1).tolist()]

    @property
    def other(self) -> Tensor:
        """`(B,)` bool: the image shows none of the world's shapes (always false for a closed-set evaluator)."""
        if OTHER not in self.shape_names:
            return torch.zeros(self.shape_probs.shape[0], dtype=torch.bool)
        return self.shape_probs.argmax(1) == self.shape_names.index(OTHER)

    @property
    def other_fraction(self) -> float:
        """Share of images seen as none of the world's shapes."""
        return float(self.other.float().mean())


def parse_prompt(prompt: str, colours: Sequence[str] = COLOUR_NAMES, shapes: Sequence[str] = SHAPES) -> tuple[str, str]:
    """`"a red cube, front view"` → `("red", "cube")`; other words (articles, view and quality words) are ignored.

    Raises `ValueError` when the prompt names no known colour or shape, or more than one of either.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    found = {}
    for kind, names in (("colour", colours), ("shape", shapes)):
        named = list(dict.fromkeys(w for w in words if w in names))
        if len(named) != 1:
            problem = "names no known" if not named else f"names several ({', '.join(named)}) of"
            raise ValueError(f"prompt {prompt!r} {problem} {kind}; the evaluator knows: {', '.join(names)}")
        found[kind] = named[0]
    return found["colour"], found["shape"]


class Evaluator(nn.Module):
    """Colour and shape classifier for images of the shapes world."""

    def __init__(self, config: EvaluatorConfig = EvaluatorConfig()):
        super().__init__()
        self.config = config
        widths = config.widths
        layers = [_conv(3, widths[0])]
        for previous, width in zip(widths[:-1], widths[1:]):
            layers += [_conv(previous, width, stride=2), _conv(width, width)]
        self.features = nn.Sequential(*layers)
        self.colour_pool, self.shape_pool = AttentionPool(widths[-1]), AttentionPool(widths[-1])
        self.colour_head = nn.Linear(widths[-1], len(config.colours))
        self.shape_head = nn.Linear(widths[-1], len(config.shapes))

    def forward(self, images: Tensor) -> EvaluatorOutput:
        """`images` `(B, 3, R, R)` in [0, 1] at the configured resolution."""
        features = self.features(images * 2.0 - 1.0)
        return EvaluatorOutput(self.colour_head(self.colour_pool(features)), self.shape_head(self.shape_pool(features)))

    def prepare(self, images: Tensor) -> Tensor:
        """Any `(B, 3, H, W)` in [0, 1] → `(B, 3, R, R)` on the evaluator's device (antialiased resize)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images in [0, 1], got {images.dtype}")
        device = next(self.parameters()).device
        images = images.detach().to(device, torch.float32)
        size = self.config.resolution
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, (size, size), mode="bilinear", align_corners=False, antialias=True)
        return images.clamp(0, 1)

    @torch.no_grad()
    def score(self, images: Tensor, prompt: str | Sequence[str]) -> ScoreResult:
        """Score `images` `(B, 3, H, W)` in [0, 1] (any size) against one prompt, or one prompt per image."""
        prompts = [prompt] * images.shape[0] if isinstance(prompt, str) else list(prompt)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        prompt_shapes = [s for s in self.config.shapes if s != OTHER]
        parsed = {p: parse_prompt(p, self.config.colours, prompt_shapes) for p in dict.fromkeys(prompts)}
        colour_target = torch.tensor([self.config.colours.index(parsed[p][0]) for p in prompts], dtype=torch.long)
        shape_target = torch.tensor([self.config.shapes.index(parsed[p][1]) for p in prompts], dtype=torch.long)
        was_training = self.training
        self.eval()
        out = self(self.prepare(images))
        self.train(was_training)
        colour_probs, shape_probs = out.colour_logits.softmax(1).cpu(), out.shape_logits.softmax(1).cpu()
        return ScoreResult(
            self.config.colours,
            self.config.shapes,
            colour_probs,
            shape_probs,
            colour_target,
            shape_target,
            colour_probs.argmax(1) == colour_target,
            shape_probs.argmax(1) == shape_target,
        )


def load_evaluator(path: str | Path = EVALUATOR_WEIGHTS, device: str | torch.device = "cpu") -> Evaluator:
    """The evaluator from `path` (`.safetensors`, with its `.json` next to it), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path = path.with_suffix(".json")
    if not path.exists() or not config_path.exists():
        raise FileNotFoundError(
            f"evaluator weights {path} or config {config_path} missing; train them with `python tools/toy/train_evaluator.py`"
        )
    architecture = json.loads(config_path.read_text())["architecture"]
    config = EvaluatorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in architecture.items()})
    evaluator = Evaluator(config)
    evaluator.load_state_dict(load_file(str(path)))
    return evaluator.to(device).eval().requires_grad_(False)


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Layers:
    """Rendered objects without background: premultiplied `colour` `(N, 3, R, R)`, `alpha` `(N, 1, R, R)`,
    the world's own `background` `(N, 3)`, and the labels `colour_label`, `shape_label` `(N,)` (an index
    into `EvaluatorConfig.shapes`: `len(SHAPES)` is `other`)."""

    colour: Tensor
    alpha: Tensor
    background: Tensor
    colour_label: Tensor
    shape_label: Tensor


def render_objects(
    n: int,
    seed: int,
    config: WorldConfig = WorldConfig(),
    chunk: int = 512,
    progress: bool = False,
    other: bool = False,
    max_iou: float | None = OTHER_MAX_IOU,
) -> Layers:
    """`n` fresh scenes of the world (its scene and camera distributions), rendered as layers; deterministic
    per seed. With `other`, non-primitive scenes (`sample_other_scenes`), all labelled `other`; of those,
    views whose silhouette matches a primitive's better than `max_iou` (`primitive_silhouette_iou`) are
    dropped and more are drawn, so every `other` image shows a non-primitive (None keeps them all)."""
    parts, kept = [], 0
    bar = tqdm(total=n, desc="rendering others" if other else "rendering", disable=not progress)
    for index in itertools.count():
        if kept >= n:
            break
        generator = torch.Generator().manual_seed(seed + index)
        count = min(chunk, n - kept) if not other or max_iou is None else chunk
        scenes = (sample_other_scenes if other else sample_scenes)(count, config, generator)
        cameras = sample_cameras(count, config.cameras, generator)
        colour, alpha = render_layers(scenes, cameras, config)
        shape = torch.full((count,), len(SHAPES)) if other else scenes.shape
        layers = Layers(colour, alpha, scenes.background, scenes.colour, shape)
        if other and max_iou is not None:
            keep = (primitive_silhouette_iou(scenes, cameras, config, alpha) <= max_iou).nonzero().flatten()[: n - kept]
            layers = Layers(*(getattr(layers, f)[keep] for f in Layers.__dataclass_fields__))
        parts.append(layers)
        kept += len(layers.shape_label)
        bar.update(len(layers.shape_label))
    bar.close()
    return Layers(*(torch.cat([getattr(p, f) for p in parts]) for f in Layers.__dataclass_fields__))


def composite(layers: Layers, background: Tensor) -> Tensor:
    """Images `(N, 3, R, R)` of the objects over `background`: `(N, 3)` colours or `(N, 3, R, R)` images."""
    if background.ndim == 2:
        background = background[:, :, None, None]
    return (layers.colour + (1 - layers.alpha) * background).clamp(0, 1)


@dataclass
class HeldOutImages:
    """The same fresh scenes over the world's light backgrounds (`plain`) and over tinted ones
    (`tinted`), each `(N, 3, R, R)`, with the world's share of quality defects; labels `(N,)`
    (`shape_label` `len(SHAPES)` for non-primitives)."""

    plain: Tensor
    tinted: Tensor
    colour_label: Tensor
    shape_label: Tensor

    def prompts(self) -> list[str]:
        """The prompt each image answers (a non-primitive answers none; it is prompted as a sphere)."""
        shapes = SHAPES + (SHAPES[0],)
        return [f"a {COLOUR_NAMES[c]} {shapes[s]}" for c, s in zip(self.colour_label.tolist(), self.shape_label.tolist())]


def held_out_images(
    n: int, seed: int = REPORT_SEED, config: WorldConfig = WorldConfig(), progress: bool = False, other: bool = False,
    max_iou: float | None = OTHER_MAX_IOU,
) -> HeldOutImages:
    """Held-out renders for measuring the evaluator: solid backgrounds only, no augmentation. With
    `other`, non-primitives (from `seed + OTHER_SEED_OFFSET`, so they differ from the primitives' scenes),
    by default only views that do not look like a primitive (`render_objects`' `max_iou`)."""
    layers = render_objects(n, seed + OTHER_SEED_OFFSET if other else seed, config, progress=progress, other=other, max_iou=max_iou)
    generator = torch.Generator().manual_seed(seed - 1)
    quality = torch.where(
        torch.rand(n, generator=generator) < config.degraded_prob,
        torch.randint(len(QUALITY_TAGS), (n,), generator=generator),
        torch.full((n,), -1),
    )
    plain = degrade(composite(layers, layers.background), quality, generator)
    tinted = degrade(composite(layers, tinted_backgrounds(n, generator)), quality, generator)
    return HeldOutImages(plain, tinted, layers.colour_label, layers.shape_label)


@dataclass
class Accuracy:
    colour: float
    shape: float
    """For non-primitives: the share called `other`."""


@torch.no_grad()
def accuracy(evaluator: Evaluator, images: Tensor, colour_label: Tensor, shape_label: Tensor, batch: int = 500) -> Accuracy:
    """Share of `images` whose colour and shape class (`shape_label` indexes `evaluator.config.shapes`,
    so `other` counts as right for non-primitives) the evaluator names right."""
    evaluator.eval()
    outputs = [evaluator(evaluator.prepare(images[i : i + batch])) for i in range(0, len(images), batch)]
    colour = torch.cat([o.colour_logits.argmax(1).cpu() for o in outputs]) == colour_label
    shape = torch.cat([o.shape_logits.argmax(1).cpu() for o in outputs]) == shape_label
    return Accuracy(float(colour.float().mean()), float(shape.float().mean()))
