"""Scalar schedules as in threestudio configs: a number, or `[start_step, start_value, end_value, end_step]`.

The value is `start_value` up to `start_step`, moves linearly to `end_value` at `end_step` and
stays there — threestudio's `C()` (threestudio/utils/misc.py) for integer steps:
`start + (end − start)·clamp((step − s0)/(s1 − s0), 0, 1)`. So `[5000, 0.98, 0.5, 5001]`
(configs/csd-if.yaml:81) is a step at 5000, not a ramp from 0.
"""

from __future__ import annotations

from typing import Sequence, Union

Schedule = Union[float, int, Sequence[float]]


def schedule_problem(schedule: Schedule) -> str | None:
    """Why `schedule` is not a number or a `[start_step, start_value, end_value, end_step]` list with
    `start_step <= end_step`, or None (a `csd.checks` field check)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if number(schedule):
        return None
    if not isinstance(schedule, (list, tuple)) or len(schedule) != 4 or not all(map(number, schedule)):
        return f"{schedule!r} is not a number or [start_step, start_value, end_value, end_step]"
    start_step, _, _, end_step = schedule
    if end_step < start_step:
        return f"end_step {end_step} is before start_step {start_step} in {list(schedule)}"
    return None


def schedule_value(schedule: Schedule, step: int) -> float:
    """The value of `schedule` at `step`."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    problem = schedule_problem(schedule)
    if problem:
        raise ValueError(f"schedule {problem}")
    start_step, start_value, end_value, end_step = (float(v) for v in schedule)
    if step >= end_step:
        return end_value
    if step <= start_step:
        return start_value
    fraction = (step - start_step) / (end_step - start_step)
    return start_value + fraction * (end_value - start_value)
