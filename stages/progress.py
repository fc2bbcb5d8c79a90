"""Progress of a stage's optimisation loop: a tqdm bar on a terminal, INFO log lines otherwise.

Nightly workers write to files, where tqdm is off; without these lines a 10 000-step stage would be
silent for an hour. One line every `every` of the run (10 % by default) gives the step, the loss, the
mean step time since the last line and the time left at that rate.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

from tqdm import tqdm


def _is_terminal(stream: IO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class StepProgress:
    """Reports steps `initial + 1 … total` of one loop. `update(metrics)` once per step."""

    def __init__(self, total: int, initial: int, desc: str, logger: logging.Logger, every: float = 0.1, stream: IO | None = None):
        stream = stream if stream is not None else sys.stderr
        self.total, self.step, self.desc, self.logger = total, initial, desc, logger
        self.interval = max(1, round(total * every))
        self.bar = tqdm(total=total, initial=initial, desc=desc, mininterval=2, file=stream) if _is_terminal(stream) else None
        self._last_step, self._last_time = initial, time.perf_counter()

    def update(self, metrics: dict[str, float]) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        if self.step % self.interval and self.step != self.total:
            return
        now = time.perf_counter()
        step_time = (now - self._last_time) / max(1, self.step - self._last_step)
        self._last_step, self._last_time = self.step, now
        left = step_time * (self.total - self.step)
        self.logger.info(
            "%s: step %d/%d (%d%%), loss %.4g, %.3f s/step, %s left",
            self.desc, self.step, self.total, 100 * self.step // self.total, metrics.get("loss", float("nan")),
            step_time, _duration(left),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
