"""Field checks for configs: each config's `__post_init__` calls `validate(self, checks)`.

`validate` checks every field typed `Literal[...]` against its options and every field named in
`checks` with its check, then raises one `InvalidConfig` that lists every problem as
`(field, why)`, so a planner reports all bad values of a config at once (`stages.config.build_config`
prefixes each field with its dotted path, `nerf.renderer.num_samples`, and the catalog adds the
line and column). A check is a function of the value that returns why it is invalid, or None.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

Check = Callable[[Any], "str | None"]
"""A field check: the value → why it is invalid, or None."""


class InvalidConfig(ValueError):
    """Fields of the config `config` (its class name) hold invalid values; `problems` lists
    `(field, why)` pairs in field order."""

    def __init__(self, config: str, problems: list[tuple[str, str]]):
        self.config = config
        self.problems = list(problems)
        super().__init__("; ".join(f"{config}.{field}: {why}" for field, why in self.problems))


def validate(config: Any, checks: Mapping[str, Check] | None = None) -> None:
    """Raise `InvalidConfig` listing each field of the dataclass `config` outside its `Literal[...]`
    options or failing its entry in `checks`."""
    checks = checks or {}
    names = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(checks) - set(names))
    if unknown:
        raise TypeError(f"checks of {type(config).__name__} name no field: {', '.join(unknown)}")
    options = _literal_options(type(config))
    problems = []
    for name in names:
        value = getattr(config, name)
        problem = one_of(*options[name])(value) if name in options else None
        if problem is None and name in checks:
            problem = checks[name](value)
        if problem:
            problems.append((name, problem))
    if problems:
        raise InvalidConfig(type(config).__name__, problems)


@functools.cache
def _literal_options(cls: type) -> dict[str, tuple[Any, ...]]:
    """The options of each field of `cls` typed `Literal[...]`."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is Literal}


def one_of(*valid: Any) -> Check:
    return lambda value: None if value in valid else f"{value!r} is not one of {', '.join(map(str, valid))}"


def at_least(low: float, exclusive: bool = False) -> Check:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if value < low or (exclusive and value == low):
            return f"{value!r} must be {'>' if exclusive else '>='} {low}"
        return None

    return check


def non_empty(what: str) -> Check:
    """Text that is not blank; `what` says what it is for in the message."""
    return lambda value: None if isinstance(value, str) and value.strip() else f"{value!r} is empty; it is {what}"


def whole(low: int) -> Check:
    """A whole number (not a bool) >= `low`: counts, sizes, steps."""

    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not a whole number"
        return at_least(low)(value)

    return check


def optional(check: Check) -> Check:
    """`check`, or None allowed."""
    return lambda value: None if value is None else check(value)


def between(low: float, high: float) -> Check:
    def check(value):
        problem = at_least(low)(value)
        return problem or (f"{value!r} must be <= {high}" if value > high else None)

    return check


def interval(low: float | None = None, high: float | None = None, positive: bool = False) -> Check:
    """A `(min, max)` pair with min <= max, inside [low, high] (min > 0 when `positive`)."""

    def check(value):
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            return f"{value!r} is not a [min, max] pair of numbers"
        lo, hi = value
        if lo > hi:
            return f"{list(value)} has min > max; expected [min, max] with min <= max"
        if positive and lo <= 0:
            return f"{list(value)} must be positive; expected [min, max] with 0 < min <= max"
        if (low is not None and lo < low) or (high is not None and hi > high):
            return f"{list(value)} must lie within [{low}, {high}]"
        return None

    return check


def unit_rgb(value) -> str | None:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or any(between(0, 1)(v) for v in value):
        return f"{value!r} is not an RGB triple in [0, 1]"
    return None
