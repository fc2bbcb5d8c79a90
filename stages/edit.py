"""Stage `edit` (optional): CSD text-guided editing of a finished textured asset; geometry stays fixed.

The target description is the prompt and the source description the negative prompt (DESIGN.md
§2, Editing), so the classifier score pulls toward the target and away from the source:

    g = (ε_target − ε_∅) − λ (ε_source − ε_∅)      i.e. a = 1, b = −λ, c = λ − 1,

starting from the asset's texture; λ (`negative_weight`, a number or a schedule) trades alignment
with the target against fidelity to the source asset. `run(config, out_dir, inputs={"texture": dir})`
(or `{"uv": dir}` when `texture` did not run) uses the same loop, checkpoints and outputs as
`stages.texture`, and reports evaluator scores against both prompts before and after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csd.checks import Check, non_empty
from csd.guidance import GuidanceConfig, GuidancePreset, guidance_config, guidance_problem
from csd.schedules import Schedule, schedule_problem
from stages.common import StageResult, StepCallback
from stages.texture import TextureOptimConfig, read_input_mesh, refine


_SET_BY_NEGATIVE_WEIGHT = ("prompt_scale", "negative_scale", "null_scale")


@dataclass(frozen=True)
class EditConfig(TextureOptimConfig):
    """Everything the `edit` stage needs; presets fill it, the catalog row's `edit_prompt` sets `prompt`."""

    prompt: str = ""
    """The target description (what the asset should become)."""
    source_prompt: str = ""
    """The description the asset was made from; used as the negative prompt."""
    negative_weight: Schedule = 1.0
    """λ, the weight of the source's classifier score: higher moves further from the source, lower
    keeps more of the asset. A number or `[start_step, start, end, end_step]`."""
    method: GuidancePreset = "csd"
    """Guidance preset the edit starts from; its prompt/negative/null scales are set by `negative_weight`."""
    guidance: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of the preset's other fields (t range, weighting, normalisation)."""

    def _checks(self) -> dict[str, Check]:
        def guidance(overrides):
            if not isinstance(overrides, dict):
                return guidance_problem(self.method, overrides)
            clash = sorted(set(overrides) & set(_SET_BY_NEGATIVE_WEIGHT))
            if clash:
                return f"overrides {clash} are set by negative_weight; remove them and set negative_weight"
            if schedule_problem(self.negative_weight):
                return None  # no guidance without λ; negative_weight's own problem says why
            return guidance_problem(self.method, {**overrides, **_edit_scales(self.negative_weight)})

        return {
            **super()._checks(), "prompt": non_empty("the target description (what the asset should become)"),
            "source_prompt": non_empty("the negative prompt the edit moves away from"),
            "negative_weight": schedule_problem, "guidance": guidance,
        }


def _map_schedule(schedule: Schedule, scale: float, shift: float) -> Schedule:
    """`scale · λ + shift` of a number or a `[start_step, start, end, end_step]` schedule."""
    if isinstance(schedule, (int, float)):
        return scale * schedule + shift
    start_step, start, end, end_step = schedule
    return [start_step, scale * start + shift, scale * end + shift, end_step]


def _edit_scales(negative_weight: Schedule) -> dict[str, Schedule]:
    """a = 1, b = −λ, c = λ − 1 for λ = `negative_weight`."""
    return {
        "prompt_scale": 1.0,
        "negative_scale": _map_schedule(negative_weight, -1.0, 0.0),
        "null_scale": _map_schedule(negative_weight, 1.0, -1.0),
    }


def edit_guidance(config: EditConfig) -> GuidanceConfig:
    """The guidance preset with a = 1, b = −λ, c = λ − 1 (the config refuses guidance overrides of those scales)."""
    return guidance_config(config.method, **config.guidance, **_edit_scales(config.negative_weight))


def run(
    config: EditConfig, out_dir: Path, *, inputs: dict[str, Path] | None = None, identity: str = "", callback: StepCallback = None
) -> StageResult:
    """Edit the texture of `inputs["texture"]` (or `inputs["uv"]`) toward `config.prompt` and commit `out_dir`."""
    mesh = read_input_mesh(inputs, ("texture", "uv"), "edit")
    scored = {"source": config.source_prompt, "target": config.prompt}
    return refine(
        "edit", config, mesh, config.prompt, config.source_prompt, edit_guidance(config), scored, out_dir, identity, callback, score_before=True
    )
