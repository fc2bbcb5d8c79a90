"""The score-distillation loop skeleton shared by `nerf`, `texture` and `edit`.

`DistillationLoop` restores `<work>/checkpoint.pt` (step, history, torch generator, Python RNG and
the stage's state dicts), runs the stage's `step(step, timer) -> metrics` until `steps`, times each
step, appends the history, calls the flow's callback, reports progress, checkpoints every
`checkpoint_every` steps and removes the checkpoint once the loop is done. What a step does (render,
guide, optimise) stays in the stage.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from csd.checks import Check, at_least
from stages.common import StepCallback, Timer, TrainingCheckpoint
from stages.progress import StepProgress

log = logging.getLogger(__name__)


def pick_shading(step: int, ambient_only_steps: int, shading_probs: dict[str, float], rng: random.Random) -> str:
    """`albedo` for the first `ambient_only_steps` steps, then a mode drawn by `shading_probs`."""
    if step < ambient_only_steps:
        return "albedo"
    modes = [m for m, p in shading_probs.items() if p > 0]
    return rng.choices(modes, weights=[shading_probs[m] for m in modes])[0]


def shading_probs_check(modes: tuple[str, ...]) -> Check:
    """The check of a config's `shading_probs` (what `pick_shading` draws from): a mapping of modes
    among `modes` to probabilities >= 0, one of them > 0."""

    def check(probs):
        if not isinstance(probs, dict):
            return f"{probs!r} is not a mapping of shading mode to probability"
        unknown = sorted(set(probs) - set(modes))
        if unknown:
            return f"unknown shading mode(s) {unknown}; valid: {', '.join(modes)}"
        if any(at_least(0)(p) for p in probs.values()) or not any(p > 0 for p in probs.values()):
            return f"{probs} needs probabilities >= 0, one of them > 0"
        return None

    return check


@dataclass
class LoopResult:
    """The metric history (one dict per step, with `step`), the last step, where this run started
    and the seconds per step of each timed section (`<section>_per_step`)."""

    history: list[dict[str, float]]
    step: int
    resumed_at: int
    timings: dict[str, float]


class DistillationLoop:
    """`loop = DistillationLoop(...)` restores a checkpoint through `load_state`; `loop.run(step)` trains.
    Progress is labelled with the stage and the start of its prompt.

    `state()` returns the stage's state dicts to checkpoint (name → object `torch.save` can write);
    `load_state(saved)` puts a restored dict of them back. The generator and RNG are the stage's
    own: they are checkpointed and restored with the rest, so a resumed run draws what an
    uninterrupted one would have drawn."""

    def __init__(
        self,
        stage: str,
        prompt: str,
        work: Path,
        steps: int,
        checkpoint_every: int,
        generator: torch.Generator,
        rng: random.Random,
        state: Callable[[], dict[str, Any]],
        load_state: Callable[[dict[str, Any]], None],
        device: str | torch.device = "cpu",
        callback: StepCallback = None,
    ):
        self.label, self.steps, self.checkpoint_every = f"{stage} {prompt[:30]}", steps, checkpoint_every
        self.state, self.callback = state, callback
        self.checkpoint = TrainingCheckpoint(work, generator, rng)
        self.history: list[dict[str, float]] = []
        self.step = 0
        restored = self.checkpoint.load(device)
        if restored is not None:
            saved, self.step, self.history = restored
            load_state(saved)
            log.info("%s: resuming %s from step %d", stage, work, self.step)

    def run(self, step_fn: Callable[[int, Timer], dict[str, float]]) -> LoopResult:
        """Call `step_fn(step, timer)` (0-based step; time its sections with `timer("name")`) until
        `steps`; it returns the step's metrics, to which the loop adds `step_time`."""
        timer = Timer()
        resumed_at = self.step
        progress = StepProgress(self.steps, self.step, self.label, log)
        while self.step < self.steps:
            started = time.perf_counter()
            metrics = step_fn(self.step, timer)
            metrics["step_time"] = time.perf_counter() - started
            self.step += 1
            self.history.append({"step": self.step, **metrics})
            if self.callback is not None:
                self.callback(self.step, metrics)
            progress.update(metrics)
            if self.step % self.checkpoint_every == 0 and self.step < self.steps:
                self.checkpoint.save(self.step, self.history, **self.state())
        progress.close()
        self.checkpoint.remove()
        trained = max(1, self.step - resumed_at)
        return LoopResult(self.history, self.step, resumed_at, {f"{k}_per_step": v / trained for k, v in timer.totals.items()})
