"""Configs check their own fields in `__post_init__` (csd.checks): Literal options and value ranges."""

import dataclasses
from typing import Literal

import pytest

from csd.cameras import CameraConfig
from csd.checks import InvalidConfig, at_least, interval, validate
from csd.fields import FieldConfig
from csd.guidance import GuidanceConfig
from csd.mesh import CleanupConfig, ExtractionConfig
from csd.models import ModelConfig
from csd.raster import MeshRendererConfig
from csd.renderer import RendererConfig
from csd.uv import UnwrapConfig

BAD_VALUES = [
    (RendererConfig, "num_samples", 0, "0 must be >= 1"),
    (RendererConfig, "background", "lerned", "'lerned' is not one of solid, random, learned"),
    (RendererConfig, "orientation_reduction", "all", "'all' is not one of rays, opaque"),
    (RendererConfig, "occupancy_decay", 1.5, "1.5 must be <= 1"),
    (RendererConfig, "background_color", (1.0, 2.0, 0.0), "(1.0, 2.0, 0.0) is not an RGB triple in [0, 1]"),
    (RendererConfig, "random_background_range", (0.5, 1.5), "[0.5, 1.5] must lie within [0, 1]"),
    (FieldConfig, "bound", 0.0, "0.0 must be > 0"),
    (FieldConfig, "n_levels", 0, "0 must be >= 1"),
    (FieldConfig, "density_bias", "ball", "'ball' is not one of blob_magic3d, none"),
    (FieldConfig, "density_activation", "relu", "'relu' is not one of softplus, exp"),
    (FieldConfig, "normal_type", "autograd", "'autograd' is not one of finite_difference, analytic"),
    (FieldConfig, "normal_eps", -0.01, "-0.01 must be > 0"),
    (CameraConfig, "distance_range", (2.0, -1.0), "[2.0, -1.0] has min > max; expected [min, max] with min <= max"),
    (CameraConfig, "fovy_range", (40.0, 200.0), "[40.0, 200.0] must lie within [0, 180]"),
    (CameraConfig, "elevation_sampling", "sphere", "'sphere' is not one of uniform, mixed"),
    (CameraConfig, "light_position_perturb", "much", "'much' is not a number"),
    (CameraConfig, "front_back_halfwidth", 120.0, "120.0 must be <= 90"),
    (GuidanceConfig, "weighting", "linear", "'linear' is not one of uniform, sds"),
    (GuidanceConfig, "grad_normalize", "global", "'global' is not one of true, false, none, sample, batch"),
    (GuidanceConfig, "max_step_percent", [10, 0.98, 0.5, 5], "end_step 5 is before start_step 10 in [10, 0.98, 0.5, 5]"),
    (GuidanceConfig, "grad_clip", [0, 1], "[0, 1] is not a number or [start_step, start_value, end_value, end_step]"),
    (MeshRendererConfig, "rasterizer", "opengl", "'opengl' is not one of cpu, nvdiffrast, auto"),
    (MeshRendererConfig, "normals", "phong", "'phong' is not one of flat, smooth"),
    (MeshRendererConfig, "supersample", 1.5, "1.5 is not a whole number"),
    (MeshRendererConfig, "ambient", 1.5, "1.5 must be <= 1"),
    (ExtractionConfig, "resolution", 0, "0 must be >= 8"),
    (ExtractionConfig, "threshold", "otsu", "'otsu' is not a number; valid: a positive density or 'auto'"),
    (ExtractionConfig, "threshold", 0.0, "0.0 must be > 0; valid: a positive density or 'auto'"),
    (CleanupConfig, "min_component_ratio", 1.0, "1.0 must be < 1"),
    (CleanupConfig, "target_faces", -1, "-1 must be >= 0"),
    (UnwrapConfig, "resolution", 8, "8 must be >= 16"),
    (UnwrapConfig, "max_cost", 0.0, "0.0 must be > 0"),
    (ModelConfig, "dtype", "fp8", "'fp8' is not one of auto, float32, float16, bfloat16"),
    (ModelConfig, "device", "gpu", "'gpu' is not a torch device; valid: auto, cpu, cuda, cuda:<index>, mps, …"),
    (ModelConfig, "max_length", 0, "0 must be >= 1"),
    (ModelConfig, "model", " ", "' ' names no model"),
]


@pytest.mark.parametrize("cls, name, value, why", BAD_VALUES, ids=[f"{c.__name__}.{n}" for c, n, _, _ in BAD_VALUES])
def test_each_config_refuses_a_bad_value_naming_the_field_and_the_valid_range(cls, name, value, why):
    with pytest.raises(InvalidConfig) as caught:
        cls(**{name: value})
    assert caught.value.problems == [(name, why)]
    assert str(caught.value) == f"{cls.__name__}.{name}: {why}"
    with pytest.raises(ValueError, match=f"^{cls.__name__}.{name}: "):  # also through dataclasses.replace
        dataclasses.replace(cls(), **{name: value})


def test_the_defaults_are_valid_and_every_problem_is_reported_in_field_order():
    for cls in {cls for cls, *_ in BAD_VALUES}:
        cls()
    ExtractionConfig(threshold="auto"), ModelConfig(device="cuda:1"), MeshRendererConfig(supersample=None)
    with pytest.raises(InvalidConfig) as caught:
        RendererConfig(background="lerned", num_samples=0, random_background_prob=-0.5)
    assert caught.value.problems == [
        ("num_samples", "0 must be >= 1"),
        ("background", "'lerned' is not one of solid, random, learned"),
        ("random_background_prob", "-0.5 must be >= 0"),
    ]


def test_a_camera_warmup_needs_the_iid_azimuth_sampler():
    with pytest.raises(InvalidConfig) as caught:
        CameraConfig(batch_uniform_azimuth=True, front_back_warmup_steps=10)
    assert caught.value.problems == [
        ("front_back_warmup_steps", "10 needs batch_uniform_azimuth: false (the two azimuth samplers exclude each other)")
    ]
    CameraConfig(batch_uniform_azimuth=False, front_back_warmup_steps=10)
    with pytest.raises(InvalidConfig, match="'ten' is not a number"):  # a wrong type is named, not a TypeError
        CameraConfig(batch_uniform_azimuth=True, front_back_warmup_steps="ten")


@dataclasses.dataclass(frozen=True)
class Sample:
    mode: Literal["a", "b"] = "a"
    span: tuple[float, float] = (0.0, 1.0)
    count: int = 1


def test_validate_checks_literal_options_and_named_fields_and_refuses_a_misspelt_check():
    validate(Sample(), {"span": interval(0, 1), "count": at_least(1)})
    with pytest.raises(InvalidConfig) as caught:
        validate(Sample(mode="c", span=(1.0, 0.0), count=0), {"span": interval(0, 1), "count": at_least(1)})
    assert [name for name, _ in caught.value.problems] == ["mode", "span", "count"]
    with pytest.raises(TypeError, match="checks of Sample name no field: cuont"):
        validate(Sample(), {"cuont": at_least(1)})
