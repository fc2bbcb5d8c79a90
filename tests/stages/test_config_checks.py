"""Stage configs check their own fields in `__post_init__` (csd.checks), so a bad value is refused
when the config is built, at planning, naming the field, the value and the valid options."""

import dataclasses

import pytest

from csd.checks import InvalidConfig
from stages.config import ConfigError, build_config
from stages.edit import EditConfig
from stages.export import ExportConfig
from stages.mesh import MeshConfig
from stages.nerf import NerfConfig
from stages.texture import TextureConfig
from stages.uv import UVConfig

VALID = {NerfConfig: {"prompt": "a red cube"}, TextureConfig: {"prompt": "a red cube"}, EditConfig: {"prompt": "a blue cube", "source_prompt": "a red cube"}}
PRESETS = "csd, csd-annealed-negative, csd-refine, sds"

BAD_VALUES = [
    (NerfConfig, "prompt", " ", "' ' is empty; it is what to generate"),
    (NerfConfig, "method", "csd-typo", f"'csd-typo' is not one of {PRESETS}"),
    (NerfConfig, "guidance", {"prompt_scal": 7.5}, "with method 'csd': unknown guidance field(s) prompt_scal; valid: prompt_scale, "
     "negative_scale, null_scale, noise_scale, min_step_percent, max_step_percent, weighting, grad_normalize, perp_neg_scale, grad_clip"),
    (NerfConfig, "guidance", {"weighting": "linear"}, "with method 'csd': GuidanceConfig.weighting: 'linear' is not one of uniform, sds"),
    (NerfConfig, "steps", 0, "0 must be >= 1"),
    (NerfConfig, "shading_probs", {"phong": 1.0}, "unknown shading mode(s) ['phong']; valid: albedo, diffuse, textureless, normal"),
    (NerfConfig, "lambda_sparsity", [10, 1.0, 0.0, 5], "end_step 5 is before start_step 10 in [10, 1.0, 0.0, 5]"),
    (MeshConfig, "user_mesh_up", "x", "'x' is not one of z, y"),
    (MeshConfig, "user_mesh_radius", 0.0, "0.0 must be > 0"),
    (MeshConfig, "device", "auto", "'auto' is not a torch device; valid: cpu, cuda, cuda:<index>, mps, …"),
    (MeshConfig, "preview_resolution", 4, "4 must be >= 8"),
    (UVConfig, "base_color", (0.5, 0.5), "(0.5, 0.5) is not an RGB triple in [0, 1]"),
    (UVConfig, "chunk_size", 0, "0 must be >= 1"),
    (TextureConfig, "prompt", "", "'' is empty; it is what the texture should depict"),
    (TextureConfig, "evaluator", "clip", "'clip' is not one of none, toy"),
    (TextureConfig, "shading_probs", {"textureless": 1.0}, "unknown shading mode(s) ['textureless']; valid: albedo, diffuse"),
    (TextureConfig, "shading_probs", {"albedo": 0.0}, "{'albedo': 0.0} needs probabilities >= 0, one of them > 0"),
    (TextureConfig, "texture_levels", 0, "0 must be >= 1"),
    (EditConfig, "source_prompt", "", "'' is empty; it is the negative prompt the edit moves away from"),
    (EditConfig, "negative_weight", "strong", "'strong' is not a number or [start_step, start_value, end_value, end_step]"),
    (EditConfig, "guidance", {"null_scale": -1.0}, "overrides ['null_scale'] are set by negative_weight; remove them and set negative_weight"),
    (ExportConfig, "scorer", "fid", "'fid' is not one of toy, clip, none"),
    (ExportConfig, "video", "webm", "'webm' is not one of mp4, gif"),
    (ExportConfig, "turntable_frames", 8, "8 must be >= 16"),
]


@pytest.mark.parametrize("cls, name, value, why", BAD_VALUES, ids=[f"{c.__name__}.{n}" for c, n, _, _ in BAD_VALUES])
def test_each_stage_config_refuses_a_bad_value_naming_the_field(cls, name, value, why):
    valid = VALID.get(cls, {})
    cls(**valid)
    with pytest.raises(InvalidConfig) as caught:
        cls(**{**valid, name: value})
    assert caught.value.problems == [(name, why)]
    with pytest.raises(ValueError, match=f"^{cls.__name__}.{name}: "):  # also through dataclasses.replace
        dataclasses.replace(cls(**valid), **{name: value})


def test_a_check_of_a_combination_names_the_field_it_is_about():
    with pytest.raises(InvalidConfig) as caught:
        NerfConfig(prompt="a red cube", perp_neg=True, view_dependent=False)
    assert caught.value.problems == [("perp_neg", "needs view_dependent: true")]
    NerfConfig(prompt="a red cube", perp_neg=True, view_dependent=True)
    # a bad λ is negative_weight's problem alone, not also the guidance's
    with pytest.raises(InvalidConfig) as caught:
        EditConfig(prompt="a", source_prompt="b", negative_weight=[10, 1.0, 0.0, 5], guidance={"max_step_percent": 0.5})
    assert [name for name, _ in caught.value.problems] == ["negative_weight"]


def test_build_config_reports_a_stage_config_and_all_its_nested_configs_together():
    with pytest.raises(ConfigError) as caught:
        build_config(MeshConfig, {"extraction": {"resolution": 0}, "cleanup": {"min_component_ratio": 2.0}},
                     {"user_mesh_up": "x", "preview_views": 0}, where="mesh")
    assert caught.value.problems == [
        ("mesh.extraction.resolution", "0 must be >= 8"),
        ("mesh.cleanup.min_component_ratio", "2.0 must be < 1"),
        ("mesh.user_mesh_up", "'x' is not one of z, y"),
        ("mesh.preview_views", "0 must be >= 1"),
    ]
