"""Score distillation: Classifier Score Distillation (Yu et al. 2023) and SDS as a baseline.

Both are written as the official CSD code writes them,

    g = w(t) · (a·ε_y + b·ε_neg + c·ε_∅ + d·ε)

with ε_y, ε_neg, ε_∅ the noise predictions for the prompt, the negative prompt and the empty
prompt (one batched UNet call, branches with a zero coefficient skipped) and ε the injected noise.

- CSD (paper eq. 7): a = 1, c = −1 — the classifier score ε_y − ε_∅ alone, no −ε term.
- CSD with an annealed negative prompt (paper §4.2, official configs): b and c move linearly so
  the score turns from "prompt minus empty" into "prompt minus negative prompt".
- SDS (DreamFusion) with CFG scale s: a = s, c = 1 − s, d = −1.

The loss is the reparameterisation `0.5 ‖z − (z − g).detach()‖² / B`: its gradient w.r.t. sample
`z_i` is exactly `g_i / B` (the batch mean of the per-sample losses, each with gradient `g_i`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from csd.prompts import PromptEmbeddings
from csd.checks import optional, validate
from csd.schedules import Schedule, schedule_problem, schedule_value

Weighting = Literal["uniform", "sds"]
"""`uniform`: w(t) = 1 (official csd-if); `sds`: w(t) = 1 − ᾱ_t (DreamFusion, official SD refine)."""
GradNormalization = Literal["none", "sample", "batch"]
"""`batch`: g / (‖g‖₂ of the whole batch tensor + 1e-8), as the official code
(threestudio/models/guidance/deep_floyd_simple_guidance.py:262-263); `sample`: each sample's g by
its own norm (our earlier form, kept for the toy preset); `none`."""
GRAD_NORMALIZATIONS = get_args(GradNormalization)


@dataclass(frozen=True)
class GuidanceConfig:
    """Coefficients and sampling of score distillation; every scale may be a schedule."""

    prompt_scale: Schedule = 1.0
    """a: weight of ε_y (prompt)."""
    negative_scale: Schedule = 0.0
    """b: weight of ε_neg (negative prompt)."""
    null_scale: Schedule = -1.0
    """c: weight of ε_∅ (empty prompt)."""
    noise_scale: Schedule = 0.0
    """d: weight of the injected noise ε (−1 for SDS, 0 for CSD)."""
    min_step_percent: Schedule = 0.02
    """t_min as a fraction of the training timesteps."""
    max_step_percent: Schedule = 0.98
    """t_max as a fraction of the training timesteps."""
    weighting: Weighting = "uniform"
    """w(t): `uniform` or `sds` (1 − ᾱ_t)."""
    grad_normalize: bool | GradNormalization = False
    """`none`/False, `sample`/True (each sample's g by its own norm) or `batch` (the whole batch
    tensor's norm, official csd-if: deep_floyd_simple_guidance.py:262-263)."""
    perp_neg_scale: Schedule = 0.0
    """Weight of the Perp-Neg term w·s·Σ_i w_i·perp(ε_neg_i − ε_neg, ε_y − ε_neg) (official csd-if: 3,
    configs/csd-if.yaml:86; deep_floyd_simple_guidance.py:198-206,253-254). Used when the prompt
    embeddings carry Perp-Neg negatives (PromptProcessor(perp_neg=True))."""
    grad_clip: Schedule | None = None
    """Clamp g elementwise to ±value when set; applied before normalisation as the official code
    does (deep_floyd_simple_guidance.py:260-261)."""

    def __post_init__(self):
        def normalization(value):
            if value is None or isinstance(value, bool) or value in GRAD_NORMALIZATIONS:
                return None
            return f"{value!r} is not one of true, false, {', '.join(GRAD_NORMALIZATIONS)}"

        scales = ("prompt_scale", "negative_scale", "null_scale", "noise_scale", "min_step_percent", "max_step_percent", "perp_neg_scale")
        validate(self, {
            **{name: schedule_problem for name in scales},
            "grad_clip": optional(schedule_problem),
            "grad_normalize": normalization,
        })

    @property
    def normalization(self) -> str:
        """`grad_normalize` as one of GRAD_NORMALIZATIONS (True means `sample`, False `none`)."""
        if self.grad_normalize is True:
            return "sample"
        if self.grad_normalize is False or self.grad_normalize is None:
            return "none"
        return str(self.grad_normalize)

    def at(self, step: int) -> dict[str, float]:
        """Coefficients and timestep bounds at `step`."""
        names = ("prompt_scale", "negative_scale", "null_scale", "noise_scale", "perp_neg_scale", "min_step_percent", "max_step_percent")
        values = {name: schedule_value(getattr(self, name), step) for name in names}
        values["grad_clip"] = schedule_value(self.grad_clip, step) if self.grad_clip is not None else None
        return values


GuidancePreset = Literal["csd", "csd-annealed-negative", "csd-refine", "sds"]
"""The names of GUIDANCE_PRESETS (a stage config's `method`)."""
GUIDANCE_PRESETS: dict[GuidancePreset, dict[str, Any]] = {
    # the classifier score alone (paper eq. 7)
    "csd": dict(prompt_scale=1.0, negative_scale=0.0, null_scale=-1.0, noise_scale=0.0, grad_normalize=True),
    # official configs/csd-if.yaml:79-85 (NeRF stage): null_scale [0, -1, 0, 5000], negative_scale
    # [0, 0, -1, 5000], uniform weighting, t_max a step 0.98 -> 0.5 at 5000 ([5000, 0.98, 0.5, 5001]);
    # the whole batch tensor normalised (deep_floyd_simple_guidance.py:32,262-263)
    "csd-annealed-negative": dict(
        prompt_scale=1.0,
        negative_scale=[0, 0.0, -1.0, 5000],
        null_scale=[0, -1.0, 0.0, 5000],
        noise_scale=0.0,
        min_step_percent=0.02,
        max_step_percent=[5000, 0.98, 0.5, 5001],
        weighting="uniform",
        grad_normalize="batch",
    ),
    # official csd-sd-refine.yaml: negative_scale [0, -1, -0.5, 10000], null_scale [0, 0, -0.5, 10000],
    # w(t) = 1 - alphas_cumprod, hard-coded in stable-diffusion-triple-guidance's compute_grad_sds (the
    # refine configs set no weighting), no normalisation (its grad_normalize defaults to False), t in [0.02, 0.5]
    "csd-refine": dict(
        prompt_scale=1.0,
        negative_scale=[0, -1.0, -0.5, 10000],
        null_scale=[0, 0.0, -0.5, 10000],
        noise_scale=0.0,
        min_step_percent=0.02,
        max_step_percent=0.5,
        weighting="sds",
        grad_normalize=False,
    ),
    # DreamFusion SDS with CFG scale 100: a = s, c = 1 - s, d = -1
    "sds": dict(prompt_scale=100.0, negative_scale=0.0, null_scale=-99.0, noise_scale=-1.0, weighting="sds"),
}


def guidance_config(preset: str, **overrides) -> GuidanceConfig:
    """A named preset with field overrides (e.g. `guidance_config("sds", prompt_scale=7.5, null_scale=-6.5)`)."""
    if preset not in GUIDANCE_PRESETS:
        raise ValueError(f"unknown guidance preset {preset!r}; valid: {', '.join(GUIDANCE_PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(GuidanceConfig)})
    if unknown:
        raise ValueError(f"unknown guidance field(s) {', '.join(unknown)}; valid: {', '.join(f.name for f in fields(GuidanceConfig))}")
    return replace(GuidanceConfig(**GUIDANCE_PRESETS[preset]), **overrides)


def guidance_problem(preset: str, overrides: dict[str, Any]) -> str | None:
    """Why `overrides` of the guidance preset `preset` make no valid GuidanceConfig, or None (the
    check of a stage config's `guidance` field; an unknown `preset` is its `method` field's problem)."""
    if preset not in GUIDANCE_PRESETS:
        return None
    if not isinstance(overrides, dict):
        return f"{overrides!r} is not a mapping of GuidanceConfig fields"
    try:
        guidance_config(preset, **overrides)
    except ValueError as error:
        return f"with method {preset!r}: {error}"
    return None


@dataclass
class GuidanceOutput:
    """One score-distillation step: `loss` (scalar, differentiable w.r.t. z), the timesteps `(B,)`,
    mean per-sample ‖g‖ (before normalisation), and norms of each weighted term for logging."""

    loss: Tensor
    timesteps: Tensor
    grad_norm: float
    component_norms: dict[str, float] = field(default_factory=dict)
    coefficients: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """What every distillation loop logs of a step: ‖g‖, mean t and the norm of each term."""
        return {"grad_norm": self.grad_norm, "t": float(self.timesteps.float().mean()),
                **{f"norm_{k}": v for k, v in self.component_norms.items()}}


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """The part of each sample of `x` orthogonal to the same sample of `y`:
    x − (⟨x, y⟩ / max(⟨y, y⟩, 1e-6))·y (threestudio/utils/ops.py perpendicular_component)."""
    dims = tuple(range(1, x.ndim))
    coefficient = (x * y).sum(dims) / (y * y).sum(dims).clamp(min=1e-6)
    return x - coefficient.view(-1, *([1] * (x.ndim - 1))) * y


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


class ScoreDistillation:
    """Computes the guidance loss on model inputs `z` (see `DiffusionPrior.encode_images`)."""

    def __init__(self, prior, config: GuidanceConfig):
        self.prior = prior
        self.config = config

    def __call__(self, z: Tensor, embeddings: PromptEmbeddings, step: int, generator: torch.Generator | None = None) -> GuidanceOutput:
        """`z` is `(B, C, h, w)` (requires grad); `embeddings` holds `(B, L, D)` text embeddings."""
        c = self.config.at(step)
        batch = z.shape[0]
        T = self.prior.num_train_timesteps
        # floor, as set_min_max_steps (deep_floyd_simple_guidance.py:120-122)
        t_min = int(c["min_step_percent"] * T)
        t_max = max(t_min, int(c["max_step_percent"] * T))
        t = torch.randint(t_min, t_max + 1, (batch,), generator=generator).clamp(max=T - 1).to(z.device)
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device, z.dtype)

        perp_neg = embeddings.perp_neg is not None and c["perp_neg_scale"] != 0.0
        branches = [("prompt", c["prompt_scale"], embeddings.prompt), ("null", c["null_scale"], embeddings.null)]
        if c["negative_scale"] != 0.0:
            if embeddings.negative is None:
                raise ValueError("negative_scale is non-zero but no negative prompt was given")
            branches.insert(1, ("negative", c["negative_scale"], embeddings.negative))
        # Perp-Neg needs ε_y and ε_neg (the official "uncond": the negative prompt, or "" without one)
        # whatever their coefficients, and the two view negatives per sample: one batched UNet call
        keep = {"prompt", "negative"} if perp_neg else set()
        branches = [b for b in branches if b[1] != 0.0 or b[0] in keep]
        if perp_neg:
            if not any(name == "negative" for name, _, _ in branches):
                uncond = embeddings.negative if embeddings.negative is not None else embeddings.null
                branches.insert(1, ("negative", 0.0, uncond))
            branches += [(f"perp_neg_{i}", 0.0, embeddings.perp_neg[:, i]) for i in range(embeddings.perp_neg.shape[1])]

        with torch.no_grad():
            alphas_cumprod = self.prior.alphas_cumprod[t].view(-1, 1, 1, 1).to(z.dtype)
            z_t = alphas_cumprod.sqrt() * z.detach() + (1 - alphas_cumprod).sqrt() * noise
            g = torch.zeros_like(z, dtype=torch.float32)
            norms = {}
            if branches:
                k = len(branches)
                eps = self.prior.predict_noise(
                    torch.cat([z_t] * k), torch.cat([t] * k), torch.cat([e for _, _, e in branches])
                ).float()
                by_name = {}
                for (name, scale, _), eps_branch in zip(branches, eps.chunk(k)):
                    by_name[name] = eps_branch
                    if scale != 0.0:
                        g += scale * eps_branch
                        norms[name] = float(_per_sample_norm(scale * eps_branch).mean())
                if perp_neg:
                    e_pos = by_name["prompt"] - by_name["negative"]
                    weights = embeddings.perp_neg_weights.to(g.device, torch.float32)
                    term = sum(
                        weights[:, i].view(-1, 1, 1, 1) * perpendicular_component(by_name[f"perp_neg_{i}"] - by_name["negative"], e_pos)
                        for i in range(weights.shape[1])
                    )
                    g += c["perp_neg_scale"] * term
                    norms["perp_neg"] = float(_per_sample_norm(c["perp_neg_scale"] * term).mean())
            if c["noise_scale"] != 0.0:
                g += c["noise_scale"] * noise.float()
                norms["noise"] = float(_per_sample_norm(c["noise_scale"] * noise.float()).mean())
            if self.config.weighting == "sds":
                g = g * (1 - alphas_cumprod.float())
            # official order: nan_to_num, clip, normalise (deep_floyd_simple_guidance.py:258-263)
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            grad_norm = float(_per_sample_norm(g).mean())
            if c["grad_clip"] is not None:
                g = g.clamp(-c["grad_clip"], c["grad_clip"])
            mode = self.config.normalization
            if mode == "sample":
                g = g / _per_sample_norm(g).clamp(min=1e-8)
            elif mode == "batch":
                g = g / (g.norm(2) + 1e-8)

        target = (z - g.to(z.dtype)).detach()
        loss = 0.5 * ((z.float() - target.float()) ** 2).sum() / batch
        return GuidanceOutput(loss, t, grad_norm, norms, c)
