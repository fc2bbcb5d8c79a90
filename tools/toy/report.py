"""Quality report of the toy prior and its evaluator: `python -m tools.toy.report --out out/toy-report`.

Writes `report.md`, `report.json` and PNG grids into `--out`:

1. the evaluator's accuracy on fresh renders (unseen seeds), over the world's light backgrounds
   and over tinted ones;
2. **2D CSD**: per (colour, shape) pair and seed, a 32² image optimised from grey with the
   classifier score alone (`guidance_config("csd")`) and, for comparison, with SDS at CFG 100
   (`guidance_config("sds")`), scored by the evaluator — what the pipeline relies on;
3. prior samples per pair (DDIM, classifier-free guidance at several scales), scored by the evaluator;
4. prior samples per pair from the front, the side and the back (`views`), scored per view and shape,
   beside world renders from the same cameras: what a 3D distillation asks of the prior;
5. **fixed points** (`fixed-point`): the world's own renders of every pair, optimised in 2D by each
   guidance from where a perfect asset would stand, scored by the evaluator before and after: does
   the guidance keep the prompted object, or pull it somewhere else? With `--ideal-bank N` the prior
   is replaced by `EmpiricalPrior`, the exact denoiser of N fresh world renders per pair: a drift that
   stays there is the guidance's own, not the learned prior's;
6. the UNet's forward time at batch 3.

Every prompt carries the view suffix of a front camera (elevation 15°, azimuth 0°): all non-empty
training captions of the toy prior carry a view suffix.

Cost is UNet calls: one image costs ≈ 12 ms on one free 2-core-laptop core (batches of ≤ 48; larger
ones are slower per image). The defaults make ≈ 134 k image evaluations (sampling 77 k, 2D CSD and
SDS 29 k each) besides the fixed points (4 guidances × 300 steps over 48 renders, ≈ 36 CPU-min
measured): ≈ 60 min on one core. `--quick` (2 samples per pair, 25 DDIM steps, one 2D seed, one
render per pair for the fixed points) ≈ 26 min. `--sections` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from csd.cameras import Cameras
from csd.guidance import GuidanceConfig, ScoreDistillation, guidance_config
from csd.models import DiffusionPrior, ModelConfig, load_prior, resolve_model_path
from csd.prompts import PromptEmbeddings, PromptProcessor, TextEmbeddingCache
from csd.toy.evaluator import REPORT_SEED, Evaluator, ScoreResult, held_out_images, load_evaluator
from tools.toy.train import sample_grid, write_grid
from csd.toy.world import COLOUR_NAMES, SHAPES

log = logging.getLogger("tools.toy.report")

PAIRS = [f"a {colour} {shape}" for shape in SHAPES for colour in COLOUR_NAMES]
"""Every (colour, shape) prompt of the world, shape-major."""
FRONT_CAMERA = (15.0, 0.0)
"""Elevation and azimuth (degrees) of the camera that picks the prompts' view suffix."""
VIEW_CAMERAS = {"front": (15.0, 0.0), "side": (15.0, 90.0), "back": (15.0, 180.0)}
"""A camera (elevation, azimuth) per view the world's captions name (its cameras stop at 45°: no `overhead`)."""
SECTIONS = ("evaluator", "distillation", "samples", "views", "fixed-point", "timing")

# issue 9's bars: (metric, threshold) per measurement
BARS = {
    "evaluator plain": {"colour": 0.98, "shape": 0.95},
    "evaluator tinted": {"colour": 0.95, "shape": 0.90},
    "2D CSD": {"colour": 0.90, "shape": 0.75},
    "prior samples (best CFG)": {"colour": 0.80, "shape": 0.70},
}
UNET_BAR_MS = 60.0
"""UNet forward, batch 3 at 32², on 2 CPU cores."""


@dataclass(frozen=True)
class ReportConfig:
    """What the report measures; the defaults are issue 9's."""

    accuracy_renders: int = 2000
    """Fresh renders for the evaluator's accuracy."""
    guidance_scales: tuple[float, ...] = (2.0, 3.0, 5.0, 7.5)
    """Classifier-free guidance scales of the prior samples."""
    samples_per_pair: int = 8
    ddim_steps: int = 50
    optimise_steps: int = 300
    """Adam steps of the 2D score distillation."""
    optimise_lr: float = 0.02
    """Adam learning rate on the image's pixels (in [0, 1])."""
    optimise_seeds: int = 2
    """2D runs per pair; each is one batched run over all pairs, its noise drawn from its own seed."""
    chunk: int = 24
    """Samples drawn per DDIM run (bigger UNet batches are slower per image on CPU)."""
    view_guidance_scale: float = 3.0
    """Classifier-free guidance scale of the per-view samples (that of the shipped sample grid)."""
    fixed_point_views: int = 2
    """World renders per pair (random cameras of the nerf stage's distribution) in the fixed-point section."""
    fixed_point_sds_scales: tuple[float, ...] = (100.0, 7.5)
    """CFG scales of the SDS rows of the fixed-point section (100: the paper's baseline)."""
    ideal_bank: int = 0
    """> 0: the fixed-point section asks `EmpiricalPrior`, the exact denoiser of this many fresh world
    renders per pair, in place of the prior (an ideal prior of the world, no learned errors)."""
    seed: int = 0


QUICK = {"samples_per_pair": 2, "ddim_steps": 25, "optimise_seeds": 1, "fixed_point_views": 1}
"""`--quick`: an eighth of the sampling, half of the 2D optimisation and of the fixed points."""


def _fractions(results: list[ScoreResult]) -> dict[str, float]:
    colour = torch.cat([r.colour_correct for r in results])
    shape = torch.cat([r.shape_correct for r in results])
    return {
        "colour": float(colour.float().mean()),
        "shape": float(shape.float().mean()),
        "both": float((colour & shape).float().mean()),
    }


def _per_pair(result: ScoreResult, pair_of: list[int]) -> dict[str, float]:
    """Share of images per prompt whose colour and shape are both right."""
    index = torch.tensor(pair_of)
    return {p: float(result.correct[index == i].float().mean()) for i, p in enumerate(PAIRS)}


def evaluator_accuracy(evaluator: Evaluator, config: ReportConfig, out: Path) -> dict:
    images = held_out_images(config.accuracy_renders, REPORT_SEED, progress=True)
    prompts = images.prompts()
    numbers = {"renders": config.accuracy_renders}
    for name in ("plain", "tinted"):
        batch = getattr(images, name)
        results = [evaluator.score(batch[i : i + 500], prompts[i : i + 500]) for i in range(0, len(batch), 500)]
        predicted = [f"{c} {s}" for r in results for c, s in zip(r.predicted_colours, r.predicted_shapes)]
        wrong = torch.cat([~r.correct for r in results]).nonzero().flatten().tolist()
        numbers[name] = _fractions(results)
        numbers[f"{name} mistakes"] = [f"{prompts[i][2:]} → {predicted[i]}" for i in wrong[:32]]
        write_grid(batch[:64], 16, out / f"evaluator_{name}.png")
        if wrong:
            write_grid(batch[wrong[:32]], 16, out / f"evaluator_{name}_mistakes.png")
    return numbers


def front_view_embeddings(prior: DiffusionPrior, cache: TextEmbeddingCache) -> tuple[PromptEmbeddings, list[str]]:
    """Embeddings `(24, L, D)` of every pair seen from the front camera, and their texts."""
    elevation, azimuth = torch.tensor([FRONT_CAMERA[0]]), torch.tensor([FRONT_CAMERA[1]])
    processors = [PromptProcessor(prior, pair, cache=cache) for pair in PAIRS]
    per_pair = [processor(elevation, azimuth) for processor in processors]
    texts = [processor.texts(elevation, azimuth)[0] for processor in processors]
    return PromptEmbeddings(torch.cat([e.prompt for e in per_pair]), None, torch.cat([e.null for e in per_pair])), texts


def distill_2d(prior: DiffusionPrior, embeddings: PromptEmbeddings, guidance: GuidanceConfig, seed: int, config: ReportConfig,
               start: torch.Tensor | None = None, desc: str = "2D") -> torch.Tensor:
    """Images `(N, 3, R, R)` in [0, 1], each optimised toward its prompt with score distillation from
    `start` `(N, 3, R, R)` (default: grey), pixels as the parameters (Adam, `config.optimise_*`).

    All prompts share one batch (a UNet batch of 2N or 3N: prompt, empty and negative prompt), so a
    run costs `optimise_steps` UNet calls however many pairs there are.
    """
    distil = ScoreDistillation(prior, guidance)
    generator = torch.Generator().manual_seed(seed)
    size = prior.resolution
    if start is None:
        start = torch.full((embeddings.prompt.shape[0], 3, size, size), 0.5)
    image = start.clone().to(prior.device).requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=config.optimise_lr)
    for step in tqdm(range(config.optimise_steps), desc=desc, mininterval=5):
        out = distil(prior.encode_images(image), embeddings, step, generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        with torch.no_grad():
            image.clamp_(0, 1)
    return image.detach().cpu()


def distillation(prior: DiffusionPrior, evaluator: Evaluator, config: ReportConfig, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        embeddings, texts = front_view_embeddings(prior, TextEmbeddingCache(prior, Path(cache_dir)))
    seeds = [config.seed + i for i in range(config.optimise_seeds)]
    pair_of = [i for _ in seeds for i in range(len(PAIRS))]
    numbers = {"prompts": texts}
    for name, preset in (("CSD", "csd"), ("SDS", "sds")):
        images = torch.cat([distill_2d(prior, embeddings, guidance_config(preset), seed, config, desc=f"2D {preset}, seed {seed}")
                            for seed in seeds])
        result = evaluator.score(images, texts * len(seeds))
        numbers[name] = {**_fractions([result]), "per_pair": _per_pair(result, pair_of)}
        # rows: each shape once per seed; columns: colours
        by_shape = images.view(len(seeds), len(SHAPES), len(COLOUR_NAMES), *images.shape[1:]).transpose(0, 1)
        write_grid(by_shape.reshape(images.shape), len(COLOUR_NAMES), out / f"distill_{preset}.png", scale=3)
    return numbers


def _draw(prior: DiffusionPrior, scheduler, prompts: list[str], scale: float, config: ReportConfig, desc: str) -> torch.Tensor:
    """DDIM samples `(N, 3, 32, 32)` for `prompts`, `config.chunk` at a time, chunk i from seed `1000 · config.seed + i`."""
    return torch.cat([
        sample_grid(prior.unet, prior.text_encoder, prior.tokenizer, scheduler, prompts[start : start + config.chunk], scale,
                    config.seed * 1000 + index, config.ddim_steps)
        for index, start in enumerate(tqdm(range(0, len(prompts), config.chunk), desc=desc))])


def prior_samples(prior: DiffusionPrior, model_path: Path, evaluator: Evaluator, config: ReportConfig, out: Path) -> dict:
    from diffusers import DDIMScheduler

    if prior.kind != "pixel" or prior.resolution != 32:
        raise ValueError(f"prior samples need a 32² pixel prior like the toy one; {prior.identity} is {prior.kind} at {prior.resolution}²")
    scheduler = DDIMScheduler.from_pretrained(model_path, subfolder="scheduler")
    elevation, azimuth = torch.tensor([FRONT_CAMERA[0]]), torch.tensor([FRONT_CAMERA[1]])
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = TextEmbeddingCache(prior, Path(cache_dir))
        texts = [PromptProcessor(prior, pair, cache=cache).texts(elevation, azimuth)[0] for pair in PAIRS]
    prompts = [text for text in texts for _ in range(config.samples_per_pair)]
    pair_of = [i for i in range(len(PAIRS)) for _ in range(config.samples_per_pair)]
    numbers = {}
    for scale in config.guidance_scales:
        images = _draw(prior, scheduler, prompts, scale, config, f"samples CFG {scale:g}")
        result = evaluator.score(images, prompts)
        numbers[f"{scale:g}"] = {**_fractions([result]), "per_pair": _per_pair(result, pair_of)}
        # one row per pair
        write_grid(images, config.samples_per_pair, out / f"samples_cfg{scale:g}.png")
    return numbers


def view_samples(prior: DiffusionPrior, model_path: Path, evaluator: Evaluator, config: ReportConfig, out: Path) -> dict:
    """Does the prior draw each shape from every side a 3D distillation looks from? Samples of every
    pair with the caption of each view in `VIEW_CAMERAS` (CFG `config.view_guidance_scale`, the same
    noise for every view), scored by the evaluator per view and shape, and `views.png`: per view, a
    row of world renders from that camera (one per pair, shape-major) over a row of the prior's first
    sample for the same caption. In the toy world a view caption shows nothing: every primitive looks
    the same after a quarter turn about z and the light sits at the camera, so the world's rows are
    equal, and equal prior rows mean the prior learned to ignore the view words."""
    from diffusers import DDIMScheduler

    from csd.cameras import CameraConfig, make_cameras
    from csd.toy.world import COLOURS, WorldConfig, render, sample_scenes

    scheduler = DDIMScheduler.from_pretrained(model_path, subfolder="scheduler")
    world, cameras = WorldConfig(), CameraConfig()
    scenes = sample_scenes(len(PAIRS), world, torch.Generator().manual_seed(config.seed))
    scenes.shape = torch.arange(len(SHAPES)).repeat_interleave(len(COLOUR_NAMES))
    scenes.colour = torch.arange(len(COLOUR_NAMES)).repeat(len(SHAPES))
    scenes.albedo = torch.tensor(list(COLOURS.values()))[scenes.colour]
    shape_of = torch.arange(len(PAIRS)).repeat_interleave(config.samples_per_pair) // len(COLOUR_NAMES)  # PAIRS is shape-major
    numbers, rows = {}, []
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = TextEmbeddingCache(prior, Path(cache_dir))
        for view, (elevation, azimuth) in VIEW_CAMERAS.items():
            angles = torch.tensor([elevation]), torch.tensor([azimuth])
            texts = [PromptProcessor(prior, pair, cache=cache).texts(*angles)[0] for pair in PAIRS]
            prompts = [text for text in texts for _ in range(config.samples_per_pair)]
            images = _draw(prior, scheduler, prompts, config.view_guidance_scale, config, f"samples, {view} view")
            result = evaluator.score(images, prompts)
            numbers[view] = {**_fractions([result]), "shape by shape": {
                name: float(result.shape_correct[shape_of == i].float().mean()) for i, name in enumerate(SHAPES)}}
            n = len(PAIRS)
            view_cameras = make_cameras(torch.full((n,), elevation), torch.full((n,), azimuth),
                                        torch.full((n,), sum(cameras.distance_range) / 2), torch.full((n,), sum(cameras.fovy_range) / 2))
            rows += [render(scenes, view_cameras, world), images[:: config.samples_per_pair]]
    write_grid(torch.cat(rows), len(PAIRS), out / "views.png", scale=3)
    return numbers


def fixed_point_guidances(config: ReportConfig) -> dict[str, GuidanceConfig]:
    """Label → guidance of each row of the fixed-point section: the classifier score (`csd`), the end
    point of `csd-annealed-negative` (ε_y − ε_neg with the official negative prompt, configs/csd-if.yaml:79-85
    after step 5000; not with `ideal_bank`) and SDS at each of `config.fixed_point_sds_scales`."""
    rows = {"CSD": guidance_config("csd")}
    if not config.ideal_bank:  # the bank has no degraded images for the negative prompt to name
        rows["CSD, negative prompt"] = guidance_config("csd", negative_scale=-1.0, null_scale=0.0)
    for scale in config.fixed_point_sds_scales:
        rows[f"SDS CFG {scale:g}"] = guidance_config("sds", prompt_scale=scale, null_scale=1.0 - scale)
    return rows


class EmpiricalPrior:
    """The exact denoiser of a bank of world renders in a prior's place (`predict_noise`; everything else
    is `prior`'s): x̂₀(x_t, y) = Σᵢ softmaxᵢ(−‖x_t − √ᾱ_t bᵢ‖² / 2(1 − ᾱ_t)) bᵢ over the bank's images bᵢ
    (model space) of the prompt's pair, over every image for the empty prompt, and ε̂ = (x_t − √ᾱ_t x̂₀) /
    √(1 − ᾱ_t): what an ideal prior of the bank's distribution predicts (Tweedie). A guidance that still
    moves the world's own object under it does so by its own objective, not by the learned prior's errors.
    Text embeddings are told apart by exact match with `keys` `(K, L, D)` (`key_pairs`: pair index, −1 for
    the empty prompt); any other embedding (a negative prompt: the bank has no degraded images) raises."""

    def __init__(self, prior: DiffusionPrior, bank: torch.Tensor, bank_pairs: torch.Tensor, keys: torch.Tensor, key_pairs: torch.Tensor):
        self.prior, self.bank, self.bank_pairs = prior, bank.flatten(1), bank_pairs
        self.keys, self.key_pairs, self.bank_norms = keys.flatten(1), key_pairs, (bank.flatten(1) ** 2).sum(1)

    def __getattr__(self, name: str):
        return getattr(self.prior, name)

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(text_embeddings.flatten(1).float(), self.keys.float(), compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distances.argmin(1)
        if float(distances.gather(1, nearest[:, None]).max()) > 1e-4:
            raise ValueError("EmpiricalPrior: a text embedding that is not one of its keys (a pair's prompt or the empty prompt)")
        pair = self.key_pairs[nearest]
        alpha = self.prior.alphas_cumprod[t.cpu()].to(z_t).view(-1, 1)
        x = z_t.flatten(1).float()
        logits = -((x**2).sum(1, keepdim=True) - 2 * alpha.sqrt() * x @ self.bank.T + alpha * self.bank_norms) / (2 * (1 - alpha))
        allowed = (self.bank_pairs[None] == pair[:, None]) | (pair[:, None] < 0)
        x0 = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=1) @ self.bank
        return ((x - alpha.sqrt() * x0) / (1 - alpha).sqrt()).view_as(z_t)


def pair_renders(pairs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Cameras]:
    """World renders `(N, 3, 32, 32)` in [0, 1] of the pairs `pairs` `(N,)` (indices into `PAIRS`; the world's
    radius, yaw, background and light draws, palette albedo) from random nerf cameras, and those cameras."""
    from csd.cameras import CameraConfig, sample_cameras
    from csd.toy.world import COLOURS, WorldConfig, render, sample_scenes

    world = WorldConfig()
    scenes = sample_scenes(len(pairs), world, generator)
    scenes.shape, scenes.colour = pairs // len(COLOUR_NAMES), pairs % len(COLOUR_NAMES)  # PAIRS is shape-major
    scenes.albedo = torch.tensor(list(COLOURS.values()))[scenes.colour]
    cameras = sample_cameras(len(pairs), CameraConfig(), generator)
    return render(scenes, cameras, world), cameras


def world_bank(per_pair: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_pair` `pair_renders` of every pair, as images `(24·per_pair, 3, 32, 32)` and their pair indices."""
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.arange(len(PAIRS)).repeat_interleave(per_pair)
    images = [pair_renders(chunk, generator)[0] for chunk in tqdm(pairs.split(256), desc="world bank", mininterval=5)]
    return torch.cat(images), pairs


def fixed_points(prior: DiffusionPrior, evaluator: Evaluator, config: ReportConfig, out: Path) -> dict:
    """Is the world's own object a fixed point of each guidance? `fixed_point_views` world renders of
    every pair (random cameras of the nerf stage's distribution, captions with their view suffixes) are
    optimised in 2D as `distill_2d` does, starting from the renders; the evaluator scores the renders and
    each result (shares of views still the prompted shape / colour, per shape too), and `drift` is the
    mean absolute pixel change. A guidance a distillation can trust keeps a perfect asset where it is;
    one that moves it away will not make it either. `fixed_point.png`: the renders (first view of each
    pair, shape-major), then one row per guidance in `fixed_point_guidances` order."""
    from stages.config import load_preset

    n = len(PAIRS) * config.fixed_point_views
    pair_of = torch.arange(len(PAIRS)).repeat(config.fixed_point_views)  # view-major: the first len(PAIRS) are view 0
    renders, cameras = pair_renders(pair_of, torch.Generator().manual_seed(config.seed))
    shape_of = pair_of // len(COLOUR_NAMES)

    def judged(images: torch.Tensor, prompts: list[str]) -> dict:
        result = evaluator.score(images, prompts)
        return {**_fractions([result]), "shape by shape": {
            name: float(result.shape_correct[shape_of == i].float().mean()) for i, name in enumerate(SHAPES)}}

    # every camera's view caption, with the official negative prompt (a guidance with no negative term
    # never runs that branch: `ScoreDistillation` skips zero coefficients)
    negative = load_preset("if-gpu")["nerf"]["negative_prompt"]
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = TextEmbeddingCache(prior, Path(cache_dir))
        processors = [PromptProcessor(prior, PAIRS[p], negative, cache=cache) for p in pair_of.tolist()]
        views = [(cameras.elevation[i : i + 1], cameras.azimuth[i : i + 1]) for i in range(n)]
        embedded = [processor(*view) for processor, view in zip(processors, views)]
        texts = [processor.texts(*view)[0] for processor, view in zip(processors, views)]
    embeddings = PromptEmbeddings(*(torch.cat([getattr(e, part) for e in embedded]) for part in ("prompt", "negative", "null")))
    if config.ideal_bank:
        bank, bank_pairs = world_bank(config.ideal_bank, config.seed + 1)
        keys = torch.cat([embeddings.prompt, embeddings.null[:1]])
        prior = EmpiricalPrior(prior, prior.encode_images(bank), bank_pairs, keys, torch.cat([pair_of, torch.tensor([-1])]))

    numbers, rows = {"world renders": {**judged(renders, texts), "drift": 0.0}}, [renders[: len(PAIRS)]]
    for label, guidance in fixed_point_guidances(config).items():
        images = distill_2d(prior, embeddings, guidance, config.seed, config, start=renders, desc=f"fixed point, {label}")
        numbers[label] = {**judged(images, texts), "drift": float((images - renders).abs().mean())}
        rows.append(images[: len(PAIRS)])
    write_grid(torch.cat(rows), len(PAIRS), out / "fixed_point.png", scale=3)
    return numbers


@torch.no_grad()
def unet_forward_ms(prior: DiffusionPrior, repeats: int = 30) -> float:
    """Median wall time (ms) of one UNet forward at batch 3 (prompt, negative, empty) at the model's size."""
    embeddings = prior.encode_text(["a red cube, front view", "", ""])
    channels = prior.unet.config.in_channels
    size = prior.unet.config.sample_size
    z = torch.randn(3, channels, size, size, device=prior.device, dtype=prior.dtype)
    t = torch.full((3,), 500, device=prior.device)
    times = []
    for i in range(repeats + 3):
        started = time.perf_counter()
        prior.predict_noise(z, t, embeddings)
        if prior.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(1000 * (time.perf_counter() - started))
    return float(torch.tensor(times).median())


def _bar(value: float, threshold: float) -> str:
    return f"{100 * value:.1f} % ({'≥' if value >= threshold else '<'} {100 * threshold:.0f} % {'✓' if value >= threshold else '✗'})"


def write_markdown(numbers: dict, out: Path) -> None:
    lines = [
        "# Toy prior report",
        "",
        f"Model `{numbers['model']}` (training step {numbers['training_step']}), evaluator `{numbers['evaluator_weights']}`, "
        f"{numbers['threads']} torch thread(s), {numbers['wall_time_s']:.0f} s wall, {numbers['cpu_time_s']:.0f} s CPU. Prompts: \"a {{colour}} {{shape}}, front view\".",
        "",
    ]
    if "evaluator" in numbers:
        e = numbers["evaluator"]
        lines += [
            f"## Evaluator on {e['renders']} fresh renders (unseen seeds)",
            "",
            "| backgrounds | colour | shape | both |",
            "|---|---|---|---|",
        ]
        for name in ("plain", "tinted"):
            bar = BARS[f"evaluator {name}"]
            lines.append(f"| {name} | {_bar(e[name]['colour'], bar['colour'])} | {_bar(e[name]['shape'], bar['shape'])} | {100 * e[name]['both']:.1f} % |")
        lines += ["", "Renders: `evaluator_plain.png`, `evaluator_tinted.png`; mistakes (true → predicted):", ""]
        for name in ("plain", "tinted"):
            lines.append(f"- {name}: {', '.join(e[f'{name} mistakes']) or 'none'}")
        lines.append("")
    if "distillation" in numbers:
        d = numbers["distillation"]
        c = numbers["config"]
        lines += [
            f"## 2D score distillation ({len(PAIRS)} pairs × {c['optimise_seeds']} seed(s), {c['optimise_steps']} Adam steps, lr {c['optimise_lr']}, from grey)",
            "",
            "| guidance | colour | shape | both |",
            "|---|---|---|---|",
            f"| CSD (classifier score) | {_bar(d['CSD']['colour'], BARS['2D CSD']['colour'])} | {_bar(d['CSD']['shape'], BARS['2D CSD']['shape'])} | {100 * d['CSD']['both']:.1f} % |",
            f"| SDS (CFG 100) | {100 * d['SDS']['colour']:.1f} % | {100 * d['SDS']['shape']:.1f} % | {100 * d['SDS']['both']:.1f} % |",
            "",
            f"Images: `distill_csd.png`, `distill_sds.png` (columns: {', '.join(COLOUR_NAMES)}; rows: "
            f"{', '.join(SHAPES)}, each once per seed). Per pair, both right, CSD / SDS:",
            "",
            _pair_matrix(d["CSD"]["per_pair"], d["SDS"]["per_pair"]),
            "",
        ]
    if "samples" in numbers:
        s = numbers["samples"]
        c = numbers["config"]
        best = max(s, key=lambda k: s[k]["both"])
        bar = BARS["prior samples (best CFG)"]
        lines += [
            f"## Prior samples ({c['samples_per_pair']} per pair, {c['ddim_steps']} DDIM steps)",
            "",
            "| CFG | colour | shape | both |",
            "|---|---|---|---|",
        ]
        for scale, r in s.items():
            if scale == best:
                lines.append(f"| **{scale}** (best) | {_bar(r['colour'], bar['colour'])} | {_bar(r['shape'], bar['shape'])} | {100 * r['both']:.1f} % |")
            else:
                lines.append(f"| {scale} | {100 * r['colour']:.1f} % | {100 * r['shape']:.1f} % | {100 * r['both']:.1f} % |")
        lines += [
            "",
            f"Grids: `samples_cfg{{scale}}.png` (a row per pair: {', '.join(COLOUR_NAMES)} for each of {', '.join(SHAPES)}). "
            f"Per pair at CFG {best}, both right:",
            "",
            _pair_matrix(s[best]["per_pair"]),
            "",
        ]
    if "views" in numbers:
        c = numbers["config"]
        lines += [
            f"## Prior samples by view ({c['samples_per_pair']} per pair and view, CFG {c['view_guidance_scale']:g}, {c['ddim_steps']} DDIM steps)",
            "",
            "| view | colour | shape | " + " | ".join(SHAPES) + " |",
            "|---|---|---|" + "---|" * len(SHAPES),
        ]
        for view, r in numbers["views"].items():
            lines.append(f"| {view} | {100 * r['colour']:.1f} % | {100 * r['shape']:.1f} % | "
                         + " | ".join(f"{100 * r['shape by shape'][name]:.0f} %" for name in SHAPES) + " |")
        lines += ["", "Grid: `views.png` (per view: world renders from its camera over the prior's samples for the same caption; "
                  f"columns: {', '.join(COLOUR_NAMES)} for each of {', '.join(SHAPES)}).", ""]
    if "fixed-point" in numbers:
        c = numbers["config"]
        lines += [
            f"## Fixed points ({len(PAIRS)} pairs × {c['fixed_point_views']} world renders from random nerf cameras, "
            f"{c['optimise_steps']} Adam steps, lr {c['optimise_lr']}, from the renders)",
            "",
            *([f"Under the exact denoiser of {c['ideal_bank']} fresh world renders per pair (`EmpiricalPrior`), not the prior.", ""]
              if c.get("ideal_bank") else []),
            "Shares of views the evaluator still judges the prompted colour / shape; drift = mean |pixel change|.",
            "",
            "| start → guidance | colour | shape | " + " | ".join(SHAPES) + " | drift |",
            "|---|---|---|" + "---|" * len(SHAPES) + "---|",
        ]
        for label, r in numbers["fixed-point"].items():
            lines.append(f"| {label} | {100 * r['colour']:.1f} % | {100 * r['shape']:.1f} % | "
                         + " | ".join(f"{100 * r['shape by shape'][name]:.0f} %" for name in SHAPES) + f" | {r['drift']:.3f} |")
        lines += ["", "Grid: `fixed_point.png` (the renders, then one row per guidance in the table's order; "
                  f"columns: {', '.join(COLOUR_NAMES)} for each of {', '.join(SHAPES)}).", ""]
    if "unet_forward_ms" in numbers:
        ms = numbers["unet_forward_ms"]
        verdict = "✓" if ms <= UNET_BAR_MS else "✗"
        lines += [
            "## UNet forward",
            "",
            f"Batch 3 at 32², median of 30: **{ms:.1f} ms** on {numbers['threads']} thread(s) "
            f"(bar: ≤ {UNET_BAR_MS:.0f} ms on 2 cores {verdict}).",
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))


def _pair_matrix(*per_pair: dict[str, float]) -> str:
    """A shape × colour table; each cell lists the given per-pair fractions, separated by " / "."""
    rows = ["| | " + " | ".join(COLOUR_NAMES) + " |", "|---" * (len(COLOUR_NAMES) + 1) + "|"]
    for shape in SHAPES:
        cells = [" / ".join(f"{100 * values[f'a {colour} {shape}']:.0f}" for values in per_pair) for colour in COLOUR_NAMES]
        rows.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.toy.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the grids")
    parser.add_argument("--model", default="toy", help="prior: a shipped short name, a diffusers folder or id")
    parser.add_argument("--evaluator", type=Path, default=None, help="evaluator weights (default: the shipped ones)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help=f"fewer samples and seeds: {QUICK}")
    parser.add_argument("--accuracy-renders", type=int)
    parser.add_argument("--guidance-scales", type=float, nargs="+")
    parser.add_argument("--samples-per-pair", type=int)
    parser.add_argument("--ddim-steps", type=int)
    parser.add_argument("--optimise-steps", type=int)
    parser.add_argument("--optimise-seeds", type=int)
    parser.add_argument("--optimise-lr", type=float)
    parser.add_argument("--fixed-point-views", type=int)
    parser.add_argument("--fixed-point-sds-scales", type=float, nargs="+")
    parser.add_argument("--ideal-bank", type=int, help="fixed points under the exact denoiser of N world renders per pair (EmpiricalPrior)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = replace(ReportConfig(), **QUICK) if args.quick else ReportConfig()
    overrides = {f.name: getattr(args, f.name, None) for f in fields(ReportConfig)}
    for name in ("guidance_scales", "fixed_point_sds_scales"):
        if overrides[name] is not None:
            overrides[name] = tuple(overrides[name])
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    args.out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.time(), time.process_time()
    evaluator = load_evaluator(args.evaluator) if args.evaluator else load_evaluator()
    model_path = resolve_model_path(args.model)
    prior = load_prior(ModelConfig(model=args.model))
    step_file = model_path / "TRAINING.txt"
    training_step = step_file.read_text().split(":")[-1].strip() if step_file.exists() else "unknown"
    numbers: dict = {
        "model": args.model,
        "model_path": str(model_path),
        "training_step": training_step,
        "evaluator_weights": str(args.evaluator or "shipped"),
        "threads": torch.get_num_threads(),
        "config": asdict(config),
    }
    if "timing" in sections:
        numbers["unet_forward_ms"] = unet_forward_ms(prior)
        log.info("UNet forward, batch 3: %.1f ms", numbers["unet_forward_ms"])
    if "evaluator" in sections:
        numbers["evaluator"] = evaluator_accuracy(evaluator, config, args.out)
        log.info("evaluator plain %s, tinted %s", numbers["evaluator"]["plain"], numbers["evaluator"]["tinted"])
    if "distillation" in sections:
        numbers["distillation"] = distillation(prior, evaluator, config, args.out)
        for name in ("CSD", "SDS"):
            r = numbers["distillation"][name]
            log.info("2D %s: colour %.3f, shape %.3f, both %.3f", name, r["colour"], r["shape"], r["both"])
    if "samples" in sections:
        numbers["samples"] = prior_samples(prior, model_path, evaluator, config, args.out)
        for scale, r in numbers["samples"].items():
            log.info("samples CFG %s: colour %.3f, shape %.3f, both %.3f", scale, r["colour"], r["shape"], r["both"])
    if "views" in sections:
        numbers["views"] = view_samples(prior, model_path, evaluator, config, args.out)
        for view, r in numbers["views"].items():
            log.info("samples, %s view: colour %.3f, shape %.3f (%s)", view, r["colour"], r["shape"],
                     ", ".join(f"{k} {v:.2f}" for k, v in r["shape by shape"].items()))
    if "fixed-point" in sections:
        numbers["fixed-point"] = fixed_points(prior, evaluator, config, args.out)
        for label, r in numbers["fixed-point"].items():
            log.info("fixed point, %s: colour %.3f, shape %.3f, drift %.3f (%s)", label, r["colour"], r["shape"], r["drift"],
                     ", ".join(f"{k} {v:.2f}" for k, v in r["shape by shape"].items()))
    numbers["wall_time_s"] = time.time() - started
    numbers["cpu_time_s"] = time.process_time() - cpu_started  # wall time on a busy machine says little
    (args.out / "report.json").write_text(json.dumps(numbers, indent=2) + "\n")
    write_markdown(numbers, args.out)
    log.info("wrote %s in %.0f s (%.0f s CPU)", args.out / "report.md", numbers["wall_time_s"], numbers["cpu_time_s"])


if __name__ == "__main__":
    main()
