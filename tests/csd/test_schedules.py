import pytest

from csd.checks import InvalidConfig
from csd.guidance import GuidanceConfig
from csd.schedules import schedule_problem, schedule_value


def test_constant_schedule():
    assert schedule_value(-1, 0) == -1.0
    assert schedule_value(0.5, 10_000) == 0.5


@pytest.mark.parametrize(
    "step, expected",
    [(-5, 0.98), (0, 0.98), (2500, 0.74), (5000, 0.5), (9000, 0.5)],
)
def test_linear_schedule_boundaries_and_midpoint(step, expected):
    assert schedule_value([0, 0.98, 0.5, 5000], step) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(0, 0.98), (4999, 0.98), (5000, 0.98), (5001, 0.5), (10_000, 0.5)])
def test_official_tmax_is_a_step_at_5000(step, expected):
    # configs/csd-if.yaml:81 [5000, 0.98, 0.5, 5001] under threestudio C() (threestudio/utils/misc.py):
    # start + (end - start) * clamp((step - 5000) / (5001 - 5000), 0, 1)
    assert schedule_value([5000, 0.98, 0.5, 5001], step) == pytest.approx(expected)


def test_schedule_with_late_start():
    schedule = [1000, 0.0, -1.0, 3000]
    assert schedule_value(schedule, 999) == 0.0
    assert schedule_value(schedule, 2000) == pytest.approx(-0.5)
    assert schedule_value(schedule, 3001) == -1.0


def test_step_schedule_with_equal_steps_jumps():
    assert schedule_value([100, 1.0, 2.0, 100], 99) == 1.0
    assert schedule_value([100, 1.0, 2.0, 100], 100) == 2.0


@pytest.mark.parametrize("bad", [[0, 1, 2], "x", [10, 0, 1, 5], [0, "a", 1, 5], True])
def test_invalid_schedules_are_refused_naming_the_field(bad):
    assert schedule_problem(bad)
    if bad is not True:  # schedule_value reads a bool as a number; the config refuses it
        with pytest.raises(ValueError):
            schedule_value(bad, 0)
    with pytest.raises(InvalidConfig, match="null_scale") as error:
        GuidanceConfig(null_scale=bad)
    assert [field for field, _ in error.value.problems] == ["null_scale"]
