"""An independent evaluator of the shapes world: a small CNN that names the colour and shape in an image.

Our CPU stand-in for CLIP R-precision: `score(images, "a red cube")` says, per image, whether the
prompted colour and shape are what it sees. It is trained separately from the prior, on fresh
renders of `csd.toy.world` drawn from its own seeds, and never on pipeline outputs.

Score-distilled images do not look like the world's renders: their backgrounds are tinted and
often saturated, their edges blurry or noisy. An evaluator trained only on the world's light
backgrounds reads those as something else (it called everything "torus"), so training composites
the object over tinted, gradient and blotchy backgrounds (some in the very colours of the
classes) and adds blur, noise, crops, scaling and colour jitter. Both heads pool the feature map
with a learned spatial attention, so colour is read where the object is, not from the corners.

Training (seeded, a few minutes on one core)::

    python -m csd.toy.evaluator train

writes `csd/toy/evaluator.safetensors` and `csd/toy/evaluator.json` (architecture, training
command, wall time and held-out accuracies).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
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
    render_layers,
    sample_scenes,
    tinted_backgrounds,
)

log = logging.getLogger("csd.toy.evaluator")

EVALUATOR_WEIGHTS = Path(__file__).parent / "evaluator.safetensors"
"""The shipped weights; the architecture and training record sit next to them in `evaluator.json`."""

# World seeds of the evaluator's data, far from the prior's training pool (seed · 1_000_003 + i, i < 10^5).
TRAIN_SEED = 1_000_000_000
VALIDATION_SEED = 1_500_000_000
REPORT_SEED = 2_000_000_000
"""Seed of the report's accuracy renders (not seen by the evaluator's training)."""


@dataclass(frozen=True)
class EvaluatorConfig:
    """Architecture of the evaluator (stored in `evaluator.json`)."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    """Channels per resolution level (32², 16², 8², 4²)."""
    resolution: int = 32
    """Input side; other sizes are resized to it."""
    colours: tuple[str, ...] = COLOUR_NAMES
    """Colour classes, in the order of the colour head's outputs."""
    shapes: tuple[str, ...] = SHAPES
    """Shape classes, in the order of the shape head's outputs."""


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
    into them, parsed from the prompt.
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
        parsed = {p: parse_prompt(p, self.config.colours, self.config.shapes) for p in dict.fromkeys(prompts)}
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
            f"evaluator weights {path} or config {config_path} missing; train them with `python -m csd.toy.evaluator train`"
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
    the world's own `background` `(N, 3)`, and the labels `colour_label`, `shape_label` `(N,)`."""

    colour: Tensor
    alpha: Tensor
    background: Tensor
    colour_label: Tensor
    shape_label: Tensor


def render_objects(n: int, seed: int, config: WorldConfig = WorldConfig(), chunk: int = 512, progress: bool = False) -> Layers:
    """`n` fresh scenes of the world (its scene and camera distributions), rendered as layers; deterministic per seed."""
    parts = []
    for index, start in enumerate(tqdm(range(0, n, chunk), desc="rendering", disable=not progress)):
        generator = torch.Generator().manual_seed(seed + index)
        count = min(chunk, n - start)
        scenes = sample_scenes(count, config, generator)
        cameras = sample_cameras(count, config.cameras, generator)
        colour, alpha = render_layers(scenes, cameras, config)
        parts.append(Layers(colour, alpha, scenes.background, scenes.colour, scenes.shape))
    return Layers(*(torch.cat([getattr(p, f) for p in parts]) for f in Layers.__dataclass_fields__))


def composite(layers: Layers, background: Tensor) -> Tensor:
    """Images `(N, 3, R, R)` of the objects over `background`: `(N, 3)` colours or `(N, 3, R, R)` images."""
    if background.ndim == 2:
        background = background[:, :, None, None]
    return (layers.colour + (1 - layers.alpha) * background).clamp(0, 1)


@dataclass
class HeldOutImages:
    """The same fresh scenes over the world's light backgrounds (`plain`) and over tinted ones
    (`tinted`), each `(N, 3, R, R)`, with the world's share of quality defects; labels `(N,)`."""

    plain: Tensor
    tinted: Tensor
    colour_label: Tensor
    shape_label: Tensor

    def prompts(self) -> list[str]:
        return [f"a {COLOUR_NAMES[c]} {SHAPES[s]}" for c, s in zip(self.colour_label.tolist(), self.shape_label.tolist())]


def held_out_images(n: int, seed: int = REPORT_SEED, config: WorldConfig = WorldConfig(), progress: bool = False) -> HeldOutImages:
    """Held-out renders for measuring the evaluator: solid backgrounds only, no augmentation."""
    layers = render_objects(n, seed, config, progress=progress)
    generator = torch.Generator().manual_seed(seed - 1)
    quality = torch.where(
        torch.rand(n, generator=generator) < config.degraded_prob,
        torch.randint(len(QUALITY_TAGS), (n,), generator=generator),
        torch.full((n,), -1),
    )
    plain = degrade(composite(layers, layers.background), quality, generator)
    tinted = degrade(composite(layers, tinted_backgrounds(n, generator)), quality, generator)
    return HeldOutImages(plain, tinted, layers.colour_label, layers.shape_label)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Per-image Gaussian blur with `sigma` `(N,)` in pixels (5-tap, separable)."""
    n, c, h, w = images.shape
    taps = torch.arange(-2, 3, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None].clamp(min=1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N·C, 5)
    x = images.reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)


def augment(layers: Layers, generator: torch.Generator) -> Tensor:
    """Training images `(N, 3, R, R)` from object layers: moved, scaled, rotated and flipped; over a
    world, tinted, gradient or blotchy background; then colour jitter, blur, noise and the world's defects."""
    n, _, size, _ = layers.colour.shape
    p = lambda prob: torch.rand(n, generator=generator) < prob  # noqa: E731

    # crops and scales: zoom 0.8–1.3, shift up to ±15 % of the image, roll ±15°, mirror
    zoom = _uniform(n, 0.8, 1.3, generator)
    angle = torch.deg2rad(_uniform(n, -15.0, 15.0, generator))
    mirror = torch.where(p(0.5), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = mirror * torch.cos(angle) / zoom, -torch.sin(angle) / zoom
    theta[:, 1, 0], theta[:, 1, 1] = mirror * torch.sin(angle) / zoom, torch.cos(angle) / zoom
    theta[:, :, 2] = _uniform(2 * n, -0.3, 0.3, generator).view(n, 2)
    grid = F.affine_grid(theta, (n, 4, size, size), align_corners=False)
    moved = F.grid_sample(torch.cat([layers.colour, layers.alpha], 1), grid, align_corners=False)
    objects = Layers(moved[:, :3], moved[:, 3:], layers.background, layers.colour_label, layers.shape_label)

    # backgrounds: 25 % the world's own, else tinted; a third of those a gradient, a third blotchy
    tint = tinted_backgrounds(n, generator)[:, :, None, None].expand(n, 3, size, size)
    ramp = torch.linspace(0, 1, size)
    direction = p(0.5)[:, None, None, None]
    ramp = torch.where(direction, ramp.view(1, 1, 1, size), ramp.view(1, 1, size, 1))
    gradient = tint + ramp * (tinted_backgrounds(n, generator)[:, :, None, None] - tint)
    blotches = F.interpolate(torch.rand(n, 3, 4, 4, generator=generator), (size, size), mode="bicubic", align_corners=False)
    blotchy = (tint + 0.5 * (blotches - 0.5)).clamp(0, 1)
    kind = torch.randint(3, (n,), generator=generator)[:, None, None, None]
    background = torch.where(kind == 0, tint, torch.where(kind == 1, gradient, blotchy))
    world = p(0.25)[:, None, None, None]
    background = torch.where(world, layers.background[:, :, None, None].expand(n, 3, size, size), background)
    images = composite(objects, background)

    # brightness, contrast and saturation jitter (keeps hue: the colour label stays true)
    jitter = p(0.8)[:, None, None, None]
    brightness = _uniform(n, 0.7, 1.3, generator)[:, None, None, None]
    contrast = _uniform(n, 0.7, 1.3, generator)[:, None, None, None]
    saturation = _uniform(n, 0.6, 1.8, generator)[:, None, None, None]
    jittered = images * brightness
    jittered = jittered.mean((1, 2, 3), keepdim=True) + contrast * (jittered - jittered.mean((1, 2, 3), keepdim=True))
    grey = jittered.mean(1, keepdim=True)
    jittered = (grey + saturation * (jittered - grey)).clamp(0, 1)
    images = torch.where(jitter, jittered, images)

    blurred = _gaussian_blur(images, _uniform(n, 0.4, 1.3, generator))
    images = torch.where(p(0.25)[:, None, None, None], blurred, images)
    noise_std = torch.where(p(0.35), _uniform(n, 0.0, 0.15, generator), torch.zeros(n))
    images = images + noise_std[:, None, None, None] * torch.randn(images.shape, generator=generator)
    quality = torch.where(p(0.1), torch.randint(len(QUALITY_TAGS), (n,), generator=generator), torch.full((n,), -1))
    return degrade(images.clamp(0, 1), quality, generator)


# --- training -----------------------------------------------------------------------------------


@dataclass
class Accuracy:
    colour: float
    shape: float


def accuracy(evaluator: Evaluator, images: Tensor, colour_label: Tensor, shape_label: Tensor, batch: int = 500) -> Accuracy:
    """Share of `images` whose colour and shape the evaluator names right."""
    prompts = [f"a {COLOUR_NAMES[c]} {SHAPES[s]}" for c, s in zip(colour_label.tolist(), shape_label.tolist())]
    results = [evaluator.score(images[i : i + batch], prompts[i : i + batch]) for i in range(0, len(images), batch)]
    colour = torch.cat([r.colour_correct for r in results]).float().mean()
    shape = torch.cat([r.shape_correct for r in results]).float().mean()
    return Accuracy(float(colour), float(shape))


@dataclass
class TrainConfig:
    """Evaluator training run (recorded in `evaluator.json`)."""

    steps: int = 2500
    """Optimiser steps."""
    batch: int = 64
    """Images per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (one-cycle: warm-up then cosine decay)."""
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    pool: int = 8192
    """Rendered scenes to draw training images from (each step augments them afresh)."""
    validation: int = 1024
    """Held-out scenes (own seed) for the accuracies in the config file."""
    seed: int = 0
    """Offsets every world seed and the augmentation generator."""
    architecture: EvaluatorConfig = field(default_factory=EvaluatorConfig)


def train(config: TrainConfig, cache_dir: Path | None = None) -> tuple[Evaluator, dict]:
    """Train an evaluator from scratch; returns it (eval mode) and its record (accuracies, timing)."""
    started = time.time()
    torch.manual_seed(config.seed)
    layers = None
    cache = cache_dir / f"pool-{config.seed}-{config.pool}.pt" if cache_dir is not None else None
    if cache is not None and cache.exists():
        layers = Layers(**torch.load(cache))
    if layers is None:
        layers = render_objects(config.pool, TRAIN_SEED + 1000 * config.seed, progress=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(asdict(layers), cache.with_suffix(".tmp"))
            os.replace(cache.with_suffix(".tmp"), cache)
    rendered = time.time()

    evaluator = Evaluator(config.architecture)
    optimizer = torch.optim.AdamW(evaluator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, config.steps - warmup)))
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    evaluator.train()
    progress = tqdm(range(config.steps), desc="evaluator", mininterval=2)
    running = None
    for step in progress:
        index = torch.randint(config.pool, (config.batch,), generator=generator)
        batch = Layers(*(getattr(layers, f)[index] for f in Layers.__dataclass_fields__))
        out = evaluator(augment(batch, generator))
        loss = F.cross_entropy(out.colour_logits, batch.colour_label, label_smoothing=config.label_smoothing)
        loss = loss + F.cross_entropy(out.shape_logits, batch.shape_label, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{running:.3f}")
    evaluator.eval().requires_grad_(False)
    trained = time.time()

    held_out = held_out_images(config.validation, VALIDATION_SEED + 1000 * config.seed)
    plain = accuracy(evaluator, held_out.plain, held_out.colour_label, held_out.shape_label)
    tinted = accuracy(evaluator, held_out.tinted, held_out.colour_label, held_out.shape_label)
    record = {
        "validation": {"renders": config.validation, "plain": asdict(plain), "tinted": asdict(tinted)},
        "wall_time_s": {"render": round(rendered - started, 1), "train": round(trained - rendered, 1)},
        "torch_threads": torch.get_num_threads(),
    }
    return evaluator, record


def save_evaluator(evaluator: Evaluator, path: Path, training: dict) -> None:
    """Weights to `path` (safetensors), architecture and training record to `path` with `.json`."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.contiguous() for k, v in evaluator.state_dict().items()}
    save_file(state, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    record = {"architecture": asdict(evaluator.config), "training": training}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m csd.toy.evaluator", description="Train the shapes-world evaluator.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train from fresh renders and write the weights")
    defaults = TrainConfig()
    run.add_argument("--steps", type=int, default=defaults.steps)
    run.add_argument("--batch", type=int, default=defaults.batch)
    run.add_argument("--lr", type=float, default=defaults.lr)
    run.add_argument("--pool", type=int, default=defaults.pool, help="rendered scenes to augment")
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--threads", type=int, default=1, help="torch threads (the default leaves the other cores alone)")
    run.add_argument("--out", type=Path, default=EVALUATOR_WEIGHTS)
    run.add_argument("--cache-dir", type=Path, default=Path(".checkpoints/toy-evaluator"), help="keeps the rendered pool between runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    config = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, pool=args.pool, seed=args.seed)
    evaluator, record = train(config, args.cache_dir)
    record = {"command": "python -m csd.toy.evaluator " + " ".join(sys.argv[1:] if argv is None else argv), "config": asdict(config), **record}
    record["config"].pop("architecture")
    save_evaluator(evaluator, args.out, record)
    log.info("wrote %s; held-out accuracy %s", args.out, json.dumps(record["validation"]))


if __name__ == "__main__":
    main()
