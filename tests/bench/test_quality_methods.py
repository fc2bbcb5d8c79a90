"""bench/nerf_quality.py's method labels (bench/quality.py and bench/nerf_fixed_point.py use the same), and the
fixed-point bench's start field."""

import pytest

from benches import load_bench
from csd.guidance import guidance_config


@pytest.fixture(scope="module")
def nerf_quality():
    return load_bench("nerf_quality")


def test_an_sds_cfg_label_is_sds_at_that_scale(nerf_quality):
    preset, overrides = nerf_quality.method_overrides("sds-cfg7.5")
    config = guidance_config(preset, **overrides)
    # SDS at CFG s: s·ε_y + (1 − s)·ε_∅ − ε, with the preset's weighting
    assert (config.prompt_scale, config.null_scale, config.noise_scale) == (7.5, -6.5, -1.0)
    assert config.weighting == guidance_config("sds").weighting
    assert nerf_quality.method_overrides("csd") == ("csd", {})


@pytest.mark.parametrize("label", ["sds-cfg", "sds-cfgx", "csd-cfg7.5", "SDS"])
def test_a_bad_label_names_what_is_valid(nerf_quality, label):
    with pytest.raises(ValueError, match="sds-cfg<number>"):
        nerf_quality.method_overrides(label)


@pytest.mark.slow
def test_the_fixed_point_bench_starts_from_the_world_primitive():
    import torch

    from csd.fields import FieldConfig, ImplicitVolume
    from csd.toy import groundtruth as gt
    from stages.config import build_config, load_preset

    bench = load_bench("nerf_fixed_point")
    torch.manual_seed(0)
    field = bench.fit_primitive_field(ImplicitVolume(build_config(FieldConfig, load_preset("toy-cpu")["nerf"]["field"])), "cube", "red",
                                      steps=200, points_per_step=4096)
    score = gt.score_field_shape(field, bench._level(field), "cube")
    assert score.best_shape == "cube" and score.shape_iou >= 0.95
    assert score.fits["cube"].radius == pytest.approx(bench.START_RADIUS, abs=0.05)
