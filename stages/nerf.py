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

from csd.cameras import CameraConfig, sample_cameras
from csd.checks import at_least, non_empty, validate, whole
from csd.fields import FieldConfig, ImplicitVolume, save_field
from csd.guidance import GuidancePreset, ScoreDistillation, guidance_config, guidance_problem
from csd.models import ModelConfig, load_prior_cached
from csd.prompts import PromptProcessor, ViewThresholds
from csd.renderer import SHADING_MODES, RendererConfig, VolumeRenderer
from csd.schedules import Schedule, schedule_problem, schedule_value
from csd.views import render_orbit
from stages.common import StageResult, StageWorkspace, StepCallback, Timer, write_previews
from stages.config import dump_yaml
from stages.loop import DistillationLoop, pick_shading, shading_probs_check

log = logging.getLogger(__name__)


class FieldCollapsed(ValueError):
    """The field rendered nothing that depends on its weights: every sample fell below the occupancy
    grid's and the renderer's alpha thresholds, so no gradient reaches the field and no later step can
    bring it back. A `ValueError`: a retry resumes from the checkpoint and collapses again."""


@dataclass(frozen=True)
class NerfConfig:
    """Everything the `nerf` stage needs; presets fill it, catalog rows override it."""

    prompt: str = ""
    """What to generate."""
    negative_prompt: str = ""
    """Used by methods with a negative term (official: "oversaturated color, ugly, tiling, low quality, noisy")."""
    seed: int = 0
    model: ModelConfig = ModelConfig()
    method: GuidancePreset = "csd"
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

    def __post_init__(self):
        validate(self, {
            "prompt": non_empty("what to generate"),
            "guidance": lambda overrides: guidance_problem(self.method, overrides),
            "perp_neg": lambda on: "needs view_dependent: true" if on and not self.view_dependent else None,
            "steps": whole(1), "batch_size": whole(1), "resolution": whole(1), "lr": at_least(0, exclusive=True),
            "adam_eps": at_least(0), "ambient_only_steps": whole(0), "shading_probs": shading_probs_check(SHADING_MODES),
            "lambda_orientation": schedule_problem, "lambda_sparsity": schedule_problem,
            "checkpoint_every": whole(1), "preview_views": whole(1), "preview_resolution": whole(1),
        })


def render_turntable(
    volume: ImplicitVolume, renderer: VolumeRenderer, views: int, resolution: int, shading: str = "albedo", elevation: float = 15.0
):
    """`(views, 3, R, R)` renders on the solid background from orbit cameras (`csd.views.render_orbit`)."""
    device = next(volume.parameters()).device
    return render_orbit(
        lambda cameras: renderer.render(volume, cameras.to(device), resolution, shading=shading, training=False).rgb, views, elevation
    )


def run(
    config: NerfConfig, out_dir: Path, *, inputs: dict[str, Path] | None = None, identity: str = "", callback: StepCallback = None
) -> StageResult:
    """Train the field for `config.steps` steps (resuming a checkpoint) and commit `out_dir`.

    `nerf` takes no inputs (`inputs` exists so every stage has the same signature)."""
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

        def state() -> dict:
            return {
                "field": volume.state_dict(),
                "optimizer": optimizer.state_dict(),
                "environment": renderer.environment.state_dict() if renderer.environment else None,
                "grid": (renderer.grid.density, renderer.grid.occupied) if renderer.grid else None,
            }

        def load_state(saved: dict) -> None:
            volume.load_state_dict(saved["field"])
            optimizer.load_state_dict(saved["optimizer"])
            if renderer.environment is not None:
                renderer.environment.load_state_dict(saved["environment"])
            if renderer.grid is not None:
                renderer.grid.density, renderer.grid.occupied = saved["grid"]

        def train_step(step: int, timer: Timer) -> dict[str, float]:
            renderer.update_occupancy(volume, step, generator)
            cameras = sample_cameras(config.batch_size, config.cameras, generator, step).to(device)
            shading = pick_shading(step, config.ambient_only_steps, config.shading_probs, rng)
            lambda_orientation = schedule_value(config.lambda_orientation, step)
            with timer("render"):
                out = renderer.render(
                    volume, cameras, config.resolution, shading=shading, generator=generator, compute_normals=lambda_orientation > 0
                )
            with timer("guidance"):
                z = prior.encode_images(out.rgb)
                guided = guidance(z, prompts(cameras.elevation, cameras.azimuth), step, generator)
            sparsity = (out.opacity**2 + 0.01).sqrt().mean()
            loss = guided.loss + lambda_orientation * out.orientation + schedule_value(config.lambda_sparsity, step) * sparsity
            if not loss.requires_grad:
                raise FieldCollapsed(
                    f"nerf {config.prompt!r}: the field is empty at step {step + 1} of {config.steps} (mean opacity "
                    f"{float(out.opacity.mean()):.3g}; no sample above the occupancy / alpha thresholds, so no gradient "
                    "reaches it): the guidance drove every density to zero. Try another seed, a lower guidance or "
                    "negative scale, or a sparsity/occupancy setting that keeps the object"
                )
            with timer("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with timer("optimizer"):
                optimizer.step()
            return {
                "loss": float(loss.detach()),
                "guidance_loss": float(guided.loss.detach()),
                "opacity": float(out.opacity.detach().mean()),
                "orientation": float(out.orientation.detach()),
                **guided.metrics(),
            }

        loop = DistillationLoop(
            "nerf", config.prompt, work, config.steps, config.checkpoint_every, generator, rng, state, load_state, device, callback
        )
        trained = loop.run(train_step)
        history, step = trained.history, trained.step

        save_field(volume, work)
        if renderer.environment is not None:
            torch.save(renderer.environment.state_dict(), work / "environment.pt")
        dump_yaml(config, work / "config.yaml")
        (work / "history.json").write_text(json.dumps(history))
        preview_start = time.perf_counter()
        previews = write_previews(render_turntable(volume, renderer, config.preview_views, config.preview_resolution), work, "turntable")
        previews += write_previews(
            render_turntable(volume, renderer, config.preview_views, config.preview_resolution, "diffuse"), work, "turntable_shaded"
        )
        timings = {**trained.timings, "previews": time.perf_counter() - preview_start, "total": time.perf_counter() - started}
        final = history[-1] if history else {}
        result = StageResult(
            stage="nerf",
            directory=str(out_dir),
            outputs={"field": "field.safetensors", "field_config": "field.json", "config": "config.yaml", "history": "history.json"},
            metrics={"steps": float(step), "resumed_at": float(trained.resumed_at), "final_loss": final.get("loss", 0.0), "final_opacity": final.get("opacity", 0.0)},
            timings=timings,
            previews=previews,
        )
        return workspace.commit(result)
