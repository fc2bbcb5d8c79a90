"""Stage `nerf`: optimise an implicit volume with CSD from random cameras.

`run(config, out_dir)` trains the field, checkpointing into `<out_dir>.partial/` so a killed run
resumes, and commits `out_dir` with the field weights (`field.safetensors` + `field.json`, enough
for `mesh`/`uv` to rebuild the density and albedo queries), the resolved config, turntable
previews and the per-step metric history.
"""

from __future__ import annotations

import json
import logging
import random
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from csd.cameras import CameraConfig, orbit_cameras, sample_cameras
from csd.fields import FieldConfig, ImplicitVolume, save_field
from csd.guidance import ScoreDistillation, guidance_config
from csd.models import ModelConfig, load_prior_cached
from csd.prompts import PromptProcessor, ViewThresholds
from csd.renderer import SHADING_MODES, RendererConfig, VolumeRenderer
from csd.schedules import Schedule, schedule_value
from stages.common import StageResult, StageWorkspace, StepCallback, Timer, TrainingCheckpoint, write_previews
from stages.config import dump_yaml
from stages.progress import StepProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NerfConfig:
    """Everything the `nerf` stage needs; presets fill it, catalog rows override it."""

    prompt: str = ""
    """What to generate."""
    negative_prompt: str = ""
    """Used by methods with a negative term (official: "oversaturated color, ugly, tiling, low quality, noisy")."""
    seed: int = 0
    model: ModelConfig = ModelConfig()
    method: str = "csd"
    """Guidance preset: csd, csd-annealed-negative, csd-refine or sds (see csd.guidance)."""
    guidance: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of the guidance preset's fields (e.g. {prompt_scale: 7.5})."""
    view_dependent: bool = True
    """Append ", front view" etc. to the prompt by camera."""
    perp_neg: bool = False
    """Perp-Neg view embeddings (official csd-if: use_perp_neg, configs/csd-if.yaml:72); its weight is
    the guidance field `perp_neg_scale` (csd-if.yaml:86: 3)."""
    view_thresholds: ViewThresholds = ViewThresholds()
    """Azimuth/elevation thresholds of the view suffixes (official csd-if: front 30, back 30)."""
    field: FieldConfig = FieldConfig()
    renderer: RendererConfig = RendererConfig()
    cameras: CameraConfig = CameraConfig()
    steps: int = 10_000
    batch_size: int = 1
    resolution: int = 64
    """Render side in pixels (official csd-if: 64)."""
    lr: float = 1e-3
    adam_eps: float = 1e-15
    ambient_only_steps: int = 1000
    """Albedo-only shading for the first N steps (official material: ambient_only_steps)."""
    shading_probs: dict[str, float] = dataclasses.field(default_factory=lambda: {"albedo": 0.2, "diffuse": 0.6, "textureless": 0.2})
    """After the ambient-only phase, per-step probability of each shading mode."""
    lambda_orientation: Schedule = 0.0
    """Weight of the orientation penalty; normals are rendered on every step where it is > 0, as
    threestudio/systems/magic3d.py applies loss_orient whatever the shading."""
    lambda_sparsity: Schedule = 0.0
    """Weight of mean √(opacity² + 0.01) (threestudio/systems/magic3d.py loss_sparsity)."""
    checkpoint_every: int = 200
    preview_views: int = 16
    preview_resolution: int = 64


def _pick_shading(config: NerfConfig, step: int, rng: random.Random) -> str:
    if step < config.ambient_only_steps:
        return "albedo"
    modes = [m for m, p in config.shading_probs.items() if p > 0]
    return rng.choices(modes, weights=[config.shading_probs[m] for m in modes])[0]


def validate(config: NerfConfig) -> None:
    if not config.prompt.strip():
        raise ValueError("nerf: prompt is empty")
    unknown = set(config.shading_probs) - set(SHADING_MODES)
    if unknown:
        raise ValueError(f"nerf: unknown shading mode(s) {sorted(unknown)}; valid: {', '.join(SHADING_MODES)}")
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(f"nerf: steps and batch_size must be >= 1 (got {config.steps}, {config.batch_size})")
    guidance_config(config.method, **config.guidance)
    if config.perp_neg and not config.view_dependent:
        raise ValueError("nerf: perp_neg needs view_dependent: true")


@torch.no_grad()
def render_turntable(volume: ImplicitVolume, renderer: VolumeRenderer, views: int, resolution: int, shading: str = "albedo"):
    """`(views, 3, R, R)` renders on a white background from orbit cameras."""
    cameras = orbit_cameras(views).to(next(volume.parameters()).device)
    frames = [
        renderer.render(volume, cameras[i : i + 4], resolution, shading=shading, training=False).rgb
        for i in range(0, views, 4)
    ]
    return torch.cat(frames)


def run(
    config: NerfConfig, out_dir: Path, *, inputs: dict[str, Path] | None = None, identity: str = "", callback: StepCallback = None
) -> StageResult:
    """Train the field for `config.steps` steps (resuming a checkpoint) and commit `out_dir`.

    `nerf` takes no inputs (`inputs` exists so every stage has the same signature)."""
    validate(config)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with StageWorkspace(out_dir, "nerf", identity) as workspace:
        work = workspace.path
        prior = load_prior_cached(config.model)
        device = prior.device
        torch.manual_seed(config.seed)
        volume = ImplicitVolume(config.field).to(device)
        renderer = VolumeRenderer(config.renderer, config.field.bound, device)
        params = list(volume.parameters()) + (list(renderer.environment.parameters()) if renderer.environment else [])
        optimizer = torch.optim.Adam(params, lr=config.lr, eps=config.adam_eps)
        generator = torch.Generator().manual_seed(config.seed)
        rng = random.Random(config.seed)
        prompts = PromptProcessor(
            prior, config.prompt, config.negative_prompt, view_dependent=config.view_dependent, thresholds=config.view_thresholds,
            perp_neg=config.perp_neg,
        )
        guidance = ScoreDistillation(prior, guidance_config(config.method, **config.guidance))
        history: list[dict[str, float]] = []
        step = 0

        checkpoint = TrainingCheckpoint(work, generator, rng)
        restored = checkpoint.load(device)
        if restored is not None:
            state, step, history = restored
            volume.load_state_dict(state["field"])
            optimizer.load_state_dict(state["optimizer"])
            if renderer.environment is not None:
                renderer.environment.load_state_dict(state["environment"])
            if renderer.grid is not None:
                renderer.grid.density, renderer.grid.occupied = state["grid"]
            log.info("nerf: resuming %s from step %d", out_dir, step)

        def save_checkpoint() -> None:
            checkpoint.save(
                step,
                history,
                field=volume.state_dict(),
                optimizer=optimizer.state_dict(),
                environment=renderer.environment.state_dict() if renderer.environment else None,
                grid=(renderer.grid.density, renderer.grid.occupied) if renderer.grid else None,
            )

        timer = Timer()
        resumed_at = step
        progress = StepProgress(config.steps, step, f"nerf {config.prompt[:30]}", log)
        while step < config.steps:
            step_start = time.perf_counter()
            renderer.update_occupancy(volume, step, generator)
            cameras = sample_cameras(config.batch_size, config.cameras, generator, step).to(device)
            shading = _pick_shading(config, step, rng)
            lambda_orientation = schedule_value(config.lambda_orientation, step)
            with timer("render"):
                out = renderer.render(
                    volume, cameras, config.resolution, shading=shading, generator=generator,
                    compute_normals=lambda_orientation > 0,
                )
            with timer("guidance"):
                z = prior.encode_images(out.rgb)
                guided = guidance(z, prompts(cameras.elevation, cameras.azimuth), step, generator)
            sparsity = (out.opacity**2 + 0.01).sqrt().mean()
            loss = guided.loss + lambda_orientation * out.orientation + schedule_value(config.lambda_sparsity, step) * sparsity
            with timer("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with timer("optimizer"):
                optimizer.step()
            step += 1
            metrics = {
                "loss": float(loss.detach()),
                "guidance_loss": float(guided.loss.detach()),
                "opacity": float(out.opacity.detach().mean()),
                "orientation": float(out.orientation.detach()),
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

        save_field(volume, work)
        if renderer.environment is not None:
            torch.save(renderer.environment.state_dict(), work / "environment.pt")
        dump_yaml(config, work / "config.yaml")
        (work / "history.json").write_text(json.dumps(history))
        with timer("previews"):
            previews = write_previews(
                render_turntable(volume, renderer, config.preview_views, config.preview_resolution), work, "turntable"
            )
            previews += write_previews(
                render_turntable(volume, renderer, config.preview_views, config.preview_resolution, "diffuse"), work, "turntable_shaded"
            )
        checkpoint.remove()
        trained = max(1, step - resumed_at)
        timings = {f"{k}_per_step": v / trained for k, v in timer.totals.items() if k != "previews"}
        timings.update(previews=timer.totals.get("previews", 0.0), total=time.perf_counter() - started)
        final = history[-1] if history else {}
        result = StageResult(
            stage="nerf",
            directory=str(out_dir),
            outputs={"field": "field.safetensors", "field_config": "field.json", "config": "config.yaml", "history": "history.json"},
            metrics={"steps": float(step), "resumed_at": float(resumed_at), "final_loss": final.get("loss", 0.0), "final_opacity": final.get("opacity", 0.0)},
            timings=timings,
            previews=previews,
        )
        return workspace.commit(result)
