"""Stage `texture`: refine a mesh's texture image with CSD through a rasterizer; geometry stays fixed.

`run(config, out_dir, inputs={"uv": <textured-mesh dir>})` starts from the baked texture of the
`uv` stage (for a user mesh without colours that is whatever `uv` baked, so the stage synthesises a
texture from the prompt — the paper's texture-synthesis task), renders it from the `nerf` stage's
camera sampler, and optimises the image with score distillation (the official refine stage uses
SD 2.1-base at 512² with `csd-refine`). It checkpoints into `<out_dir>.partial/` so a killed run
resumes, and commits `out_dir` with the textured mesh (OBJ/MTL/PNG + GLB, vertices, faces and UVs
unchanged), the resolved config, turntable previews and the per-step metric history.

`refine` is the texture path `stages.edit` runs too, with its own prompts and guidance; the loop
skeleton is `stages.loop.DistillationLoop` (shared with `nerf`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from csd.cameras import CameraConfig, sample_cameras
from csd.checks import Check, at_least, non_empty, validate, whole
from csd.guidance import GuidanceConfig, GuidancePreset, ScoreDistillation, guidance_config, guidance_problem
from csd.models import DiffusionPrior, ModelConfig, load_prior_cached
from csd.prompts import PromptProcessor
from csd.metrics import view_accuracy
from csd.raster import MESH_SHADING_MODES, MeshRenderer, MeshRendererConfig, rasterize_uv
from csd.texture import TextureImage, fill_seams
from stages.assets import TexturedMesh, read_textured_mesh, write_textured_mesh
from stages.common import StageResult, StageWorkspace, StepCallback, Timer, write_previews
from stages.config import dump_yaml
from stages.loop import DistillationLoop, LoopResult, pick_shading, shading_probs_check

log = logging.getLogger(__name__)


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
    """Texels up to this many texels from the UV charts are filled from the nearest chart texel after
    optimisation (seam dilation, `csd.texture.fill_seams`), so bilinear and mip-mapped lookups near
    chart borders never read unused texels."""
    checkpoint_every: int = 200
    preview_views: int = 16
    preview_resolution: int = 128
    evaluator: Literal["none", "toy"] = "none"
    """Scores renders of the result against the prompt(s): `none` or `toy` (the shapes-world classifier
    `csd.toy.evaluator`: fraction of views with the prompt's colour/shape)."""
    evaluation_views: int = 8
    """Orbit views rendered for the evaluator."""

    def __post_init__(self):
        validate(self, self._checks())

    def _checks(self) -> dict[str, Check]:
        """The field checks of this config (a subclass adds its own fields')."""
        return {
            "steps": whole(1), "batch_size": whole(1), "resolution": whole(1), "lr": at_least(0, exclusive=True),
            "adam_eps": at_least(0), "texture_levels": whole(1), "ambient_only_steps": whole(0),
            "shading_probs": shading_probs_check(MESH_SHADING_MODES), "dilation": whole(0), "checkpoint_every": whole(1),
            "preview_views": whole(1), "preview_resolution": whole(1), "evaluator": _evaluator_weights,
            "evaluation_views": whole(1),
        }


def _evaluator_weights(evaluator: str) -> str | None:
    """`toy` needs the evaluator's weights. They ship inside the installed package (`csd/toy/`), so the
    config can look for them when it is built, at planning (a checkout that never trained them lacks them)."""
    if evaluator != "toy":
        return None
    from csd.toy.evaluator import EVALUATOR_WEIGHTS

    if EVALUATOR_WEIGHTS.exists():
        return None
    return f"'toy' needs its weights {EVALUATOR_WEIGHTS}; train them with `python tools/toy/train_evaluator.py` or set evaluator: none"


@dataclass(frozen=True)
class TextureConfig(TextureOptimConfig):
    """Everything the `texture` stage needs; presets fill it, catalog rows override it."""

    prompt: str = ""
    """What the texture should depict."""
    negative_prompt: str = ""
    """Used by methods with a negative term (official: "oversaturated color, ugly, tiling, low quality, noisy")."""
    method: GuidancePreset = "csd-refine"
    """Guidance preset (see csd.guidance); `csd-refine` is the official refine-stage schedule."""
    guidance: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of the guidance preset's fields (e.g. {max_step_percent: 0.5})."""

    def _checks(self) -> dict[str, Check]:
        return {
            **super()._checks(), "prompt": non_empty("what the texture should depict"),
            "guidance": lambda overrides: guidance_problem(self.method, overrides),
        }


def read_input_mesh(inputs: dict[str, Path] | None, names: tuple[str, ...], stage: str) -> TexturedMesh:
    """The textured mesh of the first of `names` present in `inputs` (a stage directory each)."""
    for name in names:
        if inputs and name in inputs:
            return read_textured_mesh(Path(inputs[name]))
    given = ", ".join(inputs or {}) or "none"
    raise ValueError(f"{stage}: needs a textured-mesh directory as input {' or '.join(repr(n) for n in names)}; given: {given}")


def finish_texture(texture: Tensor, mesh: TexturedMesh, rings: int) -> np.ndarray:
    """`(H, W, 3)` in [0, 1] → uint8 with seams dilated from the texels the UV charts read
    (covered texel centres plus the one-texel ring a bilinear lookup reaches)."""
    height, width, _ = texture.shape
    covered = rasterize_uv(mesh.uvs, mesh.faces, height, width).mask.float()
    covered = (F.max_pool2d(covered[None], 3, stride=1, padding=1)[0, 0] > 0).numpy()
    dilated = fill_seams(texture.detach().float().clamp(0, 1).cpu().numpy(), covered, rings)
    return (dilated * 255).round().astype(np.uint8)


def evaluate(config: TextureOptimConfig, renderer: MeshRenderer, texture: Tensor, prompts: dict[str, str]) -> dict[str, float]:
    """Evaluator scores of shaded orbit views against each named prompt: `<name>_colour_accuracy`,
    `<name>_shape_accuracy` and `<name>_accuracy` (fractions of views with the prompt's colour, shape,
    both; `csd.metrics.view_accuracy`)."""
    if config.evaluator == "none":
        return {}
    from csd.toy.evaluator import load_evaluator

    evaluator = load_evaluator(device=renderer.device)
    frames = renderer.turntable(texture.detach(), config.evaluation_views, evaluator.config.resolution, "diffuse")
    metrics = {}
    for name, prompt in prompts.items():
        metrics.update({f"{name}_{key}": value for key, value in view_accuracy(evaluator.score(frames, prompt)).items()})
    return metrics


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
) -> tuple[Tensor, LoopResult]:
    """Run (or resume from `work/checkpoint.pt`) the score-distillation loop on the texture image
    `initial` `(H, W, 3)` in [0, 1]; returns the final texture (same shape, on the prior's device)
    and the loop's history and timings."""
    device = prior.device
    texture = TextureImage(initial.to(device), config.texture_levels)
    optimizer = torch.optim.Adam(texture.parameters(), lr=config.lr, eps=config.adam_eps)
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)

    def state() -> dict:
        return {"texture": texture.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state(saved: dict) -> None:
        texture.load_state_dict(saved["texture"])
        optimizer.load_state_dict(saved["optimizer"])

    def train_step(step: int, timer: Timer) -> dict[str, float]:
        cameras = sample_cameras(config.batch_size, config.cameras, generator, step).to(device)
        shading = pick_shading(step, config.ambient_only_steps, config.shading_probs, rng)
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
        return {"loss": float(guided.loss.detach()), "coverage": float(out.opacity.detach().mean()), **guided.metrics()}

    loop = DistillationLoop(
        stage, prompts.prompt, work, config.steps, config.checkpoint_every, generator, rng, state, load_state, device, callback
    )
    trained = loop.run(train_step)
    with torch.no_grad():
        return texture(), trained


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
    previews = write_previews(renderer.turntable(image, config.preview_views, config.preview_resolution), work, "turntable")
    previews += write_previews(renderer.turntable(image, config.preview_views, config.preview_resolution, "diffuse"), work, "turntable_shaded")
    return {**outputs, "config": "config.yaml", "history": "history.json"}, previews, time.perf_counter() - started


def texture_tensor(texture: np.ndarray) -> Tensor:
    """`(H, W, 3)` uint8 → float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(texture)).float().div(255)


def mean_change(before: np.ndarray, after: np.ndarray) -> float:
    """Mean absolute texel difference of two uint8 textures, in [0, 1]."""
    return float(np.abs(after.astype(np.int16) - before.astype(np.int16)).mean() / 255)


def refine(
    stage: str,
    config: TextureOptimConfig,
    mesh: TexturedMesh,
    prompt: str,
    negative_prompt: str,
    guidance_preset: GuidanceConfig,
    scored_prompts: dict[str, str],
    out_dir: Path,
    identity: str = "",
    callback: StepCallback = None,
    score_before: bool = False,
) -> StageResult:
    """The texture path `texture` and `edit` share: distil `mesh`'s texture toward `prompt` (away from
    `negative_prompt`) with `guidance_preset`, dilate seams, write the textured mesh and previews,
    score the result against each of `scored_prompts` (name → prompt) and commit `out_dir` as `stage`.
    `score_before`: also score the input texture (metrics `before_<name>_…` and `after_<name>_…`)."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with StageWorkspace(out_dir, stage, identity) as workspace:
        prior = load_prior_cached(config.model)
        renderer = MeshRenderer(config.renderer, mesh.vertices, mesh.faces, mesh.uvs, prior.device)
        prompts = PromptProcessor(prior, prompt, negative_prompt, view_dependent=config.view_dependent)
        guidance = ScoreDistillation(prior, guidance_preset)
        initial = texture_tensor(mesh.texture)
        before = evaluate(config, renderer, initial.to(prior.device), scored_prompts) if score_before else {}
        final, trained = optimise_texture(stage, config, prior, renderer, initial, prompts, guidance, workspace.path, callback)
        texture = finish_texture(final, mesh, config.dilation)
        outputs, previews, preview_seconds = write_result(config, mesh, texture, renderer, trained.history, workspace.path)
        after = evaluate(config, renderer, texture_tensor(texture).to(renderer.device), scored_prompts)
        if score_before:
            after = {**{f"before_{k}": v for k, v in before.items()}, **{f"after_{k}": v for k, v in after.items()}}
        last = trained.history[-1] if trained.history else {}
        result = StageResult(
            stage=stage,
            directory=str(out_dir),
            outputs=outputs,
            metrics={
                "steps": float(trained.step),
                "resumed_at": float(trained.resumed_at),
                "final_loss": last.get("loss", 0.0),
                "texture_change": mean_change(mesh.texture, texture),
                **after,
            },
            timings={**trained.timings, "previews": preview_seconds, "total": time.perf_counter() - started},
            previews=previews,
        )
        return workspace.commit(result)


def run(
    config: TextureConfig, out_dir: Path, *, inputs: dict[str, Path] | None = None, identity: str = "", callback: StepCallback = None
) -> StageResult:
    """Refine the texture of `inputs["uv"]` for `config.steps` steps (resuming a checkpoint) and commit `out_dir`."""
    mesh = read_input_mesh(inputs, ("uv",), "texture")
    guidance = guidance_config(config.method, **config.guidance)
    return refine("texture", config, mesh, config.prompt, config.negative_prompt, guidance, {"prompt": config.prompt}, out_dir, identity, callback)
