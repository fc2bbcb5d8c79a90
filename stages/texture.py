"""Stage `texture`: refine a mesh's texture image with CSD through a rasterizer; geometry stays fixed.

`run(config, out_dir, inputs={"uv": <textured-mesh dir>})` starts from the baked texture of the
`uv` stage (for a user mesh without colours that is whatever `uv` baked, so the stage synthesises a
texture from the prompt — the paper's texture-synthesis task), renders it from the `nerf` stage's
camera sampler, and optimises the image with score distillation (the official refine stage uses
SD 2.1-base at 512² with `csd-refine`). It checkpoints into `<out_dir>.partial/` so a killed run
resumes, and commits `out_dir` with the textured mesh (OBJ/MTL/PNG + GLB, vertices, faces and UVs
unchanged), the resolved config, turntable previews and the per-step metric history.

The optimisation loop and its helpers are shared with `stages.edit`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csd.cameras import CameraConfig, orbit_cameras, sample_cameras
from csd.guidance import ScoreDistillation, guidance_config
from csd.models import DiffusionPrior, ModelConfig, load_prior_cached
from csd.prompts import PromptProcessor
from csd.raster import MESH_SHADING_MODES, MeshRenderer, MeshRendererConfig, uv_coverage
from stages.assets import TexturedMesh, read_textured_mesh, write_textured_mesh
from stages.common import StageResult, StageWorkspace, StepCallback, Timer, TrainingCheckpoint, write_previews
from stages.config import dump_yaml
from stages.progress import StepProgress

log = logging.getLogger(__name__)

EVALUATORS = ("none", "toy")
"""`toy`: the shapes-world classifier `csd.toy.evaluator` (fraction of views with the prompt's colour/shape)."""
_LOGIT_EPS = 0.25 / 255
"""Texel values are clamped this far inside (0, 1) before the logit, so an untouched texel keeps its uint8 value."""


@dataclass(frozen=True)
class TextureOptimConfig:
    """What `texture` and `edit` share: prior, renderer, cameras and the optimisation of the texture image."""

    seed: int = 0
    model: ModelConfig = ModelConfig()
    view_dependent: bool = True
    """Append ", front view" etc. to the prompt by camera."""
    renderer: MeshRendererConfig = MeshRendererConfig()
    cameras: CameraConfig = CameraConfig()
    steps: int = 10_000
    """Optimisation steps (official csd-sd-refine: 10 000)."""
    batch_size: int = 1
    """Cameras per step."""
    resolution: int = 512
    """Render side in pixels (official refine with SD 2.1-base: 512; the toy prior: 32)."""
    lr: float = 0.01
    """Adam learning rate on the texture's logit residuals."""
    adam_eps: float = 1e-15
    texture_levels: int = 4
    """The texture is `sigmoid(logit(initial) + Σ_k residual_k)` with residual grids at the texture
    size / 2^k, k < levels: coarse levels spread each view's gradient over whole charts (a 32²
    render samples few texels of a 256² image), level 0 keeps per-texel detail."""
    ambient_only_steps: int = 0
    """Albedo-only shading for the first N steps (as in `nerf`)."""
    shading_probs: dict[str, float] = dataclasses.field(default_factory=lambda: {"albedo": 0.5, "diffuse": 0.5})
    """After the albedo-only phase, per-step probability of each shading mode (albedo, diffuse)."""
    dilation: int = 8
    """Texel rings filled outward from the UV charts after optimisation (seam dilation), so
    bilinear and mip-mapped lookups near chart borders never read unused texels."""
    checkpoint_every: int = 200
    preview_views: int = 16
    preview_resolution: int = 128
    evaluator: str = "none"
    """Scores renders of the result against the prompt(s): `none` or `toy` (the shapes-world classifier)."""
    evaluation_views: int = 8
    """Orbit views rendered for the evaluator."""


@dataclass(frozen=True)
class TextureConfig(TextureOptimConfig):
    """Everything the `texture` stage needs; presets fill it, catalog rows override it."""

    prompt: str = ""
    """What the texture should depict."""
    negative_prompt: str = ""
    """Used by methods with a negative term (official: "oversaturated color, ugly, tiling, low quality, noisy")."""
    method: str = "csd-refine"
    """Guidance preset (see csd.guidance); `csd-refine` is the official refine-stage schedule."""
    guidance: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of the guidance preset's fields (e.g. {max_step_percent: 0.5})."""


def validate_optim(config: TextureOptimConfig, stage: str) -> None:
    unknown = set(config.shading_probs) - set(MESH_SHADING_MODES)
    if unknown:
        raise ValueError(f"{stage}: unknown shading mode(s) {sorted(unknown)}; valid: {', '.join(MESH_SHADING_MODES)}")
    if not any(p > 0 for p in config.shading_probs.values()):
        raise ValueError(f"{stage}: shading_probs needs a positive probability, got {config.shading_probs}")
    if config.evaluator not in EVALUATORS:
        raise ValueError(f"{stage}: unknown evaluator {config.evaluator!r}; valid: {', '.join(EVALUATORS)}")
    if config.evaluator == "toy":
        from csd.toy.evaluator import EVALUATOR_WEIGHTS

        if not EVALUATOR_WEIGHTS.exists():
            raise ValueError(
                f"{stage}: evaluator 'toy' needs its weights {EVALUATOR_WEIGHTS}; train them with "
                "`python tools/toy/train_evaluator.py` or set evaluator: none"
            )
    if config.steps < 1 or config.batch_size < 1 or config.texture_levels < 1:
        raise ValueError(
            f"{stage}: steps, batch_size and texture_levels must be >= 1 "
            f"(got {config.steps}, {config.batch_size}, {config.texture_levels})"
        )


def validate(config: TextureConfig) -> None:
    if not config.prompt.strip():
        raise ValueError("texture: prompt is empty")
    validate_optim(config, "texture")
    guidance_config(config.method, **config.guidance)


def read_input_mesh(inputs: dict[str, Path] | None, names: tuple[str, ...], stage: str) -> TexturedMesh:
    """The textured mesh of the first of `names` present in `inputs` (a stage directory each)."""
    for name in names:
        if inputs and name in inputs:
            return read_textured_mesh(Path(inputs[name]))
    given = ", ".join(inputs or {}) or "none"
    raise ValueError(f"{stage}: needs a textured-mesh directory as input {' or '.join(repr(n) for n in names)}; given: {given}")


class TextureImage(nn.Module):
    """The optimised texture: `sigmoid(logit(initial) + Σ_k residual_k)`, residual grids at the
    texture size / 2^k, each looked up bilinearly (so a step costs per rendered pixel, not per texel)."""

    def __init__(self, initial: Tensor, levels: int):
        super().__init__()
        height, width, _ = initial.shape
        self.size = (height, width)
        self.register_buffer("initial", initial.float().contiguous())
        self.residuals = nn.ParameterList(
            nn.Parameter(torch.zeros(max(1, height >> k), max(1, width >> k), 3, device=initial.device)) for k in range(levels)
        )

    def sample(self, lookup: Callable[[Tensor], Tensor]) -> Tensor:
        """Colours at the points `lookup(image)` samples (e.g. `lambda t: rasterizer.texture(t, uv)`)."""
        logits = _logit(lookup(self.initial))
        for residual in self.residuals:
            logits = logits + lookup(residual)
        return torch.sigmoid(logits)

    def forward(self) -> Tensor:
        """The whole image `(H, W, 3)` in [0, 1] (texel centres, where sampling and composing agree)."""
        logits = _logit(self.initial).permute(2, 0, 1)[None]
        for residual in self.residuals:
            grid = residual.permute(2, 0, 1)[None]
            if grid.shape[-2:] != logits.shape[-2:]:
                grid = F.interpolate(grid, size=self.size, mode="bilinear", align_corners=False)
            logits = logits + grid
        return torch.sigmoid(logits)[0].permute(1, 2, 0)


def _logit(colour: Tensor) -> Tensor:
    return torch.logit(colour.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS))


def dilate_seams(texture: Tensor, covered: Tensor, rings: int) -> Tensor:
    """Fill up to `rings` texel rings around the `covered` `(H, W)` texels with the mean of their
    already-filled neighbours; `texture` `(H, W, 3)`. Texels further out keep their values."""
    colour = (texture * covered[..., None]).permute(2, 0, 1)[None]
    filled = covered[None, None].float()
    for _ in range(rings):
        neighbours = F.avg_pool2d(filled, 3, stride=1, padding=1, count_include_pad=False)
        grown = F.avg_pool2d(colour * filled, 3, stride=1, padding=1, count_include_pad=False)
        fresh = (neighbours > 0) & (filled == 0)
        if not fresh.any():
            break
        colour = torch.where(fresh, grown / neighbours.clamp(min=1e-8), colour)
        filled = torch.where(fresh, torch.ones_like(filled), filled)
    result = colour[0].permute(1, 2, 0)
    return torch.where(filled[0, 0, ..., None] > 0, result, texture)


def finish_texture(texture: Tensor, mesh: TexturedMesh, rings: int) -> np.ndarray:
    """`(H, W, 3)` in [0, 1] → uint8 with seams dilated from the texels the UV charts read
    (covered texel centres plus the one-texel ring a bilinear lookup reaches)."""
    height, width, _ = texture.shape
    covered = uv_coverage(mesh.uvs, mesh.faces, height, width).to(texture.device)
    covered = F.max_pool2d(covered[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    dilated = dilate_seams(texture.detach().float(), covered, rings)
    return (dilated.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _pick_shading(config: TextureOptimConfig, step: int, rng: random.Random) -> str:
    if step < config.ambient_only_steps:
        return "albedo"
    modes = [m for m, p in config.shading_probs.items() if p > 0]
    return rng.choices(modes, weights=[config.shading_probs[m] for m in modes])[0]


@torch.no_grad()
def render_turntable(renderer: MeshRenderer, texture: Tensor, views: int, resolution: int, shading: str = "albedo") -> Tensor:
    """`(views, 3, R, R)` renders on the solid background from orbit cameras."""
    cameras = orbit_cameras(views)
    frames = [
        renderer.render(texture, cameras[i : i + 4], resolution, shading=shading, training=False).rgb for i in range(0, views, 4)
    ]
    return torch.cat(frames)


def evaluate(config: TextureOptimConfig, renderer: MeshRenderer, texture: Tensor, prompts: dict[str, str]) -> dict[str, float]:
    """Evaluator scores of shaded orbit views against each named prompt: `<name>_colour`,
    `<name>_shape` and `<name>_correct` (fractions of views with the prompt's colour, shape, both)."""
    if config.evaluator == "none":
        return {}
    from csd.toy.evaluator import load_evaluator

    evaluator = load_evaluator(device=renderer.device)
    frames = render_turntable(renderer, texture.detach(), config.evaluation_views, evaluator.config.resolution, "diffuse")
    metrics = {}
    for name, prompt in prompts.items():
        scores = evaluator.score(frames, prompt)
        metrics[f"{name}_colour"] = scores.colour_fraction
        metrics[f"{name}_shape"] = scores.shape_fraction
        metrics[f"{name}_correct"] = scores.fraction_correct
    return metrics


@dataclass
class Optimised:
    """What `optimise_texture` hands back: the final texture `(H, W, 3)` in [0, 1], the metric
    history, per-step timings and where the run started and ended."""

    texture: Tensor
    history: list[dict[str, float]]
    timings: dict[str, float]
    step: int
    resumed_at: int


def optimise_texture(
    stage: str,
    config: TextureOptimConfig,
    prior: DiffusionPrior,
    renderer: MeshRenderer,
    initial: Tensor,
    prompts: PromptProcessor,
    guidance: ScoreDistillation,
    work: Path,
    callback: StepCallback = None,
) -> Optimised:
    """Run (or resume from `work/checkpoint.pt`) the score-distillation loop on the texture image."""
    device = prior.device
    texture = TextureImage(initial.to(device), config.texture_levels)
    optimizer = torch.optim.Adam(texture.parameters(), lr=config.lr, eps=config.adam_eps)
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    history: list[dict[str, float]] = []
    step = 0

    checkpoint = TrainingCheckpoint(work, generator, rng)
    restored = checkpoint.load(device)
    if restored is not None:
        state, step, history = restored
        texture.load_state_dict(state["texture"])
        optimizer.load_state_dict(state["optimizer"])
        log.info("%s: resuming %s from step %d", stage, work, step)

    def save_checkpoint() -> None:
        checkpoint.save(step, history, texture=texture.state_dict(), optimizer=optimizer.state_dict())

    timer = Timer()
    resumed_at = step
    progress = StepProgress(config.steps, step, f"{stage} {prompts.prompt[:30]}", log)
    while step < config.steps:
        step_start = time.perf_counter()
        cameras = sample_cameras(config.batch_size, config.cameras, generator, step).to(device)
        shading = _pick_shading(config, step, rng)
        with timer("raster"):
            fragments = renderer.rasterize(cameras, config.resolution)
        with timer("texture"):
            uv = renderer.uv(fragments)
            albedo = texture.sample(lambda image: renderer.rasterizer.texture(image, uv))
            out = renderer.shade(albedo, fragments, cameras, shading=shading, generator=generator)
        with timer("guidance"):
            z = prior.encode_images(out.rgb)
            guided = guidance(z, prompts(cameras.elevation, cameras.azimuth), step, generator)
        with timer("backward"):
            optimizer.zero_grad(set_to_none=True)
            guided.loss.backward()
        with timer("optimizer"):
            optimizer.step()
        step += 1
        metrics = {
            "loss": float(guided.loss.detach()),
            "coverage": float(out.opacity.detach().mean()),
            "step_time": time.perf_counter() - step_start,
            **guided.metrics(),
        }
        history.append({"step": step, **metrics})
        if callback is not None:
            callback(step, metrics)
        progress.update(metrics)
        if step % config.checkpoint_every == 0 and step < config.steps:
            save_checkpoint()
    progress.close()
    checkpoint.remove()
    trained = max(1, step - resumed_at)
    with torch.no_grad():
        final = texture()
    return Optimised(final, history, {f"{k}_per_step": v / trained for k, v in timer.totals.items()}, step, resumed_at)


def write_result(
    config: TextureOptimConfig, mesh: TexturedMesh, texture: np.ndarray, renderer: MeshRenderer, history: list, work: Path
) -> tuple[dict[str, str], list[str], float]:
    """Write the mesh with `texture` `(H, W, 3)` uint8 (geometry untouched), the config, the history
    and turntable previews into `work`; returns the outputs, the preview files and their seconds."""
    outputs = write_textured_mesh(TexturedMesh(mesh.vertices, mesh.faces, mesh.uvs, texture), work)
    dump_yaml(config, work / "config.yaml")
    (work / "history.json").write_text(json.dumps(history))
    started = time.perf_counter()
    image = texture_tensor(texture).to(renderer.device)
    previews = write_previews(render_turntable(renderer, image, config.preview_views, config.preview_resolution), work, "turntable")
    previews += write_previews(
        render_turntable(renderer, image, config.preview_views, config.preview_resolution, "diffuse"), work, "turntable_shaded"
    )
    return {**outputs, "config": "config.yaml", "history": "history.json"}, previews, time.perf_counter() - started


def texture_tensor(texture: np.ndarray) -> Tensor:
    """`(H, W, 3)` uint8 → float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(texture)).float().div(255)


def mean_change(before: np.ndarray, after: np.ndarray) -> float:
    """Mean absolute texel difference of two uint8 textures, in [0, 1]."""
    return float(np.abs(after.astype(np.int16) - before.astype(np.int16)).mean() / 255)


def commit_textured(
    workspace: StageWorkspace,
    config: TextureOptimConfig,
    mesh: TexturedMesh,
    renderer: MeshRenderer,
    optimised: Optimised,
    scores: Callable[[Tensor], dict[str, float]],
    started: float,
) -> StageResult:
    """Dilate seams, write the textured mesh and previews, score the final texture and commit.

    `scores` maps the final texture `(Ht, Wt, 3)` in [0, 1] (on the prior's device) to metrics."""
    texture = finish_texture(optimised.texture, mesh, config.dilation)
    outputs, previews, preview_seconds = write_result(config, mesh, texture, renderer, optimised.history, workspace.path)
    last = optimised.history[-1] if optimised.history else {}
    result = StageResult(
        stage=workspace.stage,
        directory=str(workspace.final),
        outputs=outputs,
        metrics={
            "steps": float(optimised.step),
            "resumed_at": float(optimised.resumed_at),
            "final_loss": last.get("loss", 0.0),
            "texture_change": mean_change(mesh.texture, texture),
            **scores(texture_tensor(texture).to(renderer.device)),
        },
        timings={**optimised.timings, "previews": preview_seconds, "total": time.perf_counter() - started},
        previews=previews,
    )
    return workspace.commit(result)


def run(
    config: TextureConfig, out_dir: Path, *, inputs: dict[str, Path] | None = None, identity: str = "", callback: StepCallback = None
) -> StageResult:
    """Refine the texture of `inputs["uv"]` for `config.steps` steps (resuming a checkpoint) and commit `out_dir`."""
    validate(config)
    mesh = read_input_mesh(inputs, ("uv",), "texture")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with StageWorkspace(out_dir, "texture", identity) as workspace:
        prior = load_prior_cached(config.model)
        renderer = MeshRenderer(config.renderer, mesh.vertices, mesh.faces, mesh.uvs, prior.device)
        prompts = PromptProcessor(prior, config.prompt, config.negative_prompt, view_dependent=config.view_dependent)
        guidance = ScoreDistillation(prior, guidance_config(config.method, **config.guidance))
        optimised = optimise_texture(
            "texture", config, prior, renderer, texture_tensor(mesh.texture), prompts, guidance, workspace.path, callback
        )
        scores = lambda texture: evaluate(config, renderer, texture, {"prompt": config.prompt})  # noqa: E731
        return commit_textured(workspace, config, mesh, renderer, optimised, scores, started)
