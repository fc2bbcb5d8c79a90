"""The shipped GPU presets against the official CSD configs, value by value (no GPU: configs only).

Each row: (preset, dotted path into the resolved stage config, official value, where it comes from in
CVMI-Lab/Classifier-Score-Distillation at commit ffa4f53). `guidance.*` paths read the resolved
guidance preset (csd.guidance.guidance_config of the stage's method and overrides).
"""

import dataclasses

import pytest
import yaml

from csd.guidance import guidance_config
from flows.cli import main
from flows.pipeline import load_catalog

NEG = "oversaturated color, ugly, tiling, low quality, noisy"

CHARACTER = [  # configs/csd-if.yaml, nerf stage
    ("nerf.model.model", "DeepFloyd/IF-I-XL-v1.0", "csd-if.yaml:68,78"),
    ("nerf.model.max_length", 77, "threestudio deepfloyd_prompt_processor.py max_length=77"),
    ("nerf.resolution", 64, "csd-if.yaml:9-10"),
    ("nerf.batch_size", 1, "csd-if.yaml:8"),
    ("nerf.guidance.prompt_scale", 1.0, "csd-if.yaml:82"),
    ("nerf.guidance.negative_scale", [0, 0.0, -1.0, 5000], "csd-if.yaml:83 uncond_scale"),
    ("nerf.guidance.null_scale", [0, -1.0, 0.0, 5000], "csd-if.yaml:84"),
    ("nerf.guidance.noise_scale", 0.0, "csd-if.yaml:85"),
    ("nerf.guidance.weighting", "uniform", "csd-if.yaml:79"),
    ("nerf.guidance.min_step_percent", 0.02, "csd-if.yaml:80"),
    ("nerf.guidance.max_step_percent", [5000, 0.98, 0.5, 5001], "csd-if.yaml:81"),
    ("nerf.guidance.grad_normalize", "batch", "deep_floyd_simple_guidance.py:32,262-263"),
    ("nerf.guidance.grad_clip", None, "deep_floyd_simple_guidance.py:29-31"),
    ("nerf.negative_prompt", NEG, "csd-if.yaml:71"),
    ("nerf.perp_neg", True, "csd-if.yaml:72 use_perp_neg"),
    ("nerf.guidance.perp_neg_scale", 3.0, "csd-if.yaml:86 perpneg_scale"),
    ("nerf.view_dependent", True, "deep_floyd_simple_guidance.py:40"),
    ("nerf.view_thresholds.front", 30.0, "csd-if.yaml:73"),
    ("nerf.view_thresholds.back", 30.0, "csd-if.yaml:74"),
    ("nerf.view_thresholds.overhead", 60.0, "prompt_processors/base.py PromptProcessor.Config overhead_threshold"),
    ("nerf.cameras.distance_range", (1.5, 2.0), "csd-if.yaml:11"),
    ("nerf.cameras.fovy_range", (40.0, 70.0), "csd-if.yaml:12"),
    ("nerf.cameras.elevation_range", (-10.0, 45.0), "csd-if.yaml:13"),
    ("nerf.cameras.elevation_sampling", "mixed", "uncond.py:153-177"),
    ("nerf.cameras.batch_uniform_azimuth", False, "csd-if.yaml:21"),
    ("nerf.cameras.front_back_warmup_steps", 1000, "csd-if.yaml:23"),
    ("nerf.cameras.front_back_halfwidth", 30.0, "uncond.py:194"),
    ("nerf.cameras.light_distance_range", (1.5, 2.0), "csd-if.yaml:18"),
    ("nerf.cameras.light_distance_relative", False, "uncond.py:257-273"),
    ("nerf.cameras.light_position_perturb", 0.1, "csd-if.yaml:17"),
    ("nerf.field.bound", 1.0, "csd-if.yaml:29"),
    ("nerf.field.normal_type", "analytic", "csd-if.yaml:30"),
    ("nerf.field.n_levels", 12, "csd-if.yaml:39"),
    ("nerf.field.n_features_per_level", 2, "csd-if.yaml:40"),
    ("nerf.field.log2_hashmap_size", 19, "csd-if.yaml:41"),
    ("nerf.field.base_resolution", 16, "csd-if.yaml:42"),
    ("nerf.field.max_resolution", 512, "csd-if.yaml:43 per_level_scale 1.3703509847"),
    ("nerf.field.density_bias", "blob_magic3d", "csd-if.yaml:32"),
    ("nerf.field.density_activation", "softplus", "csd-if.yaml:33"),
    ("nerf.field.density_blob_scale", 10.0, "csd-if.yaml:34"),
    ("nerf.field.density_blob_std", 0.5, "csd-if.yaml:35"),
    ("nerf.ambient_only_steps", 5001, "csd-if.yaml:47"),
    ("nerf.shading_probs", {"albedo": 0.5, "normal": 0.5}, "csd-if.yaml:49-50,52; material.py:94-99,110-112"),
    ("nerf.renderer.background", "learned", "csd-if.yaml:54-56"),
    ("nerf.renderer.random_background_prob", 0.5, "csd-if.yaml:57 random_aug"),
    ("nerf.renderer.num_samples", 512, "csd-if.yaml:63"),
    ("nerf.renderer.alpha_threshold", 0.01, "nerf_volume_renderer.py prune_alpha_threshold: true → alpha_thre=0.01"),
    ("nerf.renderer.early_stop_eps", 1e-4, "nerfacc OccGridEstimator.sampling default early_stop_eps"),
    ("nerf.renderer.orientation_reduction", "opaque", "systems/magic3d.py loss_orient"),
    ("nerf.lambda_orientation", [0, 1.0, 100.0, 5000], "csd-if.yaml:96"),
    ("nerf.lambda_sparsity", [0, 10.0, 1.0, 5000], "csd-if.yaml:98"),
    ("nerf.lr", 0.001, "csd-if.yaml:103"),
    ("nerf.adam_eps", 1e-15, "csd-if.yaml:105"),
    ("nerf.steps", 10000, "csd-if.yaml:108"),
]

REFINE = [  # configs/csd-sd-refine.yaml (guidance and cameras; our texture stage is a UV texture, see the preset)
    ("texture.model.model", "stabilityai/stable-diffusion-2-1-base", "csd-sd-refine.yaml:70,78"),
    ("texture.resolution", 512, "csd-sd-refine.yaml:9-10"),
    ("texture.batch_size", 1, "csd-sd-refine.yaml:8"),
    ("texture.guidance.prompt_scale", 1.0, "csd-sd-refine.yaml:81"),
    ("texture.guidance.negative_scale", [0, -1.0, -0.5, 10000], "csd-sd-refine.yaml:82"),
    ("texture.guidance.null_scale", [0, 0.0, -0.5, 10000], "csd-sd-refine.yaml:83"),
    ("texture.guidance.noise_scale", 0.0, "csd-sd-refine.yaml:84"),
    ("texture.guidance.min_step_percent", 0.02, "csd-sd-refine.yaml:79"),
    ("texture.guidance.max_step_percent", 0.5, "csd-sd-refine.yaml:80"),
    ("texture.guidance.weighting", "sds", "stable_diffusion_triple_guidance.py compute_grad_sds: w = 1 - alphas[t], hard-coded"),
    ("texture.guidance.grad_normalize", False, "csd-sd-refine.yaml (none)"),
    ("texture.negative_prompt", NEG, "csd-sd-refine.yaml:73"),
    ("texture.ambient_only_steps", 0, "csd-sd-refine.yaml:52"),
    ("texture.steps", 10000, "csd-sd-refine.yaml:103"),
    ("texture.adam_eps", 1e-15, "csd-sd-refine.yaml:100"),
    ("texture.cameras.distance_range", (1.5, 2.0), "csd-sd-refine.yaml:11"),
    ("texture.cameras.fovy_range", (40.0, 70.0), "csd-sd-refine.yaml:12"),
    ("texture.cameras.elevation_range", (-10.0, 45.0), "csd-sd-refine.yaml:13"),
    ("texture.cameras.batch_uniform_azimuth", False, "csd-sd-refine.yaml:21"),
    ("texture.cameras.front_back_warmup_steps", 0, "csd-sd-refine.yaml:23"),
    ("texture.cameras.light_distance_range", (1.5, 2.0), "csd-sd-refine.yaml:18"),
    ("texture.cameras.light_distance_relative", False, "uncond.py:257-273"),
    ("texture.cameras.light_position_perturb", 0.1, "csd-sd-refine.yaml:17"),
    ("mesh.extraction.threshold", 10.0, "csd-sd-refine.yaml:32 isosurface_threshold"),
    ("mesh.extraction.resolution", 256, "csd-sd-refine.yaml:39 isosurface_resolution"),
]

# configs/csd-if-object.yaml: where it differs from csd-if.yaml (same line layout from line 26 on)
OBJECT_CHANGES = {
    "nerf.batch_size": (4, "csd-if-object.yaml:8"),
    "nerf.cameras.elevation_range": ((-10.0, 90.0), "csd-if-object.yaml:13"),
    "nerf.cameras.batch_uniform_azimuth": (True, "csd-if-object.yaml:21"),
    "nerf.cameras.front_back_warmup_steps": (0, "csd-if-object.yaml:22"),
    "nerf.field.bound": (2.0, "csd-if-object.yaml:30"),
    "nerf.field.normal_type": ("analytic", "csd-if-object.yaml:31"),
    "nerf.field.n_levels": (16, "csd-if-object.yaml:39"),
    "nerf.field.max_resolution": (2048, "csd-if-object.yaml:43 per_level_scale 1.3819128800"),
    "nerf.ambient_only_steps": (2001, "csd-if-object.yaml:47"),
    "nerf.perp_neg": (False, "csd-if-object.yaml:72"),
    "nerf.guidance.perp_neg_scale": (0.0, "csd-if-object.yaml:77-86 (no perpneg_scale; default 0, deep_floyd_simple_guidance.py:49)"),
    "nerf.lambda_orientation": ([5000, 1.0, 20.0, 5001], "csd-if-object.yaml:96"),
    "nerf.lambda_sparsity": (1.0, "csd-if-object.yaml:98"),
    # the code wins over ../shared/OFFICIAL.md (which says 45°): csd-if-object.yaml:73-74 keep 30
    "nerf.view_thresholds.front": (30.0, "csd-if-object.yaml:73"),
    "nerf.view_thresholds.back": (30.0, "csd-if-object.yaml:74"),
}
OBJECT = [(path, *OBJECT_CHANGES.get(path, (value, source.replace("csd-if.yaml", "csd-if-object.yaml"))))
          for path, value, source in CHARACTER] + [
          (p, v, s.replace("csd-sd-refine.yaml", "csd-sd-refine-object.yaml")) for p, v, s in REFINE]


def _stage_configs(tmp_path, preset):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("asset_id,prompt,seed,preset\nthing,a ceramic teapot,0,%s\n" % preset)
    _, plans = load_catalog(catalog, out=tmp_path / "out")
    return {stage.name: stage.config for stage in plans[0].stages}


def _lookup(configs, path):
    stage, _, rest = path.partition(".")
    config = configs[stage]
    if rest.startswith("guidance."):
        config = guidance_config(config.method, **config.guidance)
        rest = rest[len("guidance."):]
    value = config
    for part in rest.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


@pytest.mark.parametrize("preset, table", [("if-gpu", CHARACTER + REFINE), ("if-gpu-object", OBJECT)])
def test_preset_matches_the_official_config(tmp_path, preset, table):
    configs = _stage_configs(tmp_path, preset)
    wrong = []
    for path, official, source in table:
        ours = _lookup(configs, path)
        same = ours == pytest.approx(official) if isinstance(official, float) else ours == official
        if not same:
            wrong.append(f"{path}: ours {ours!r}, official {official!r} ({source})")
    assert not wrong, "\n".join(wrong)


def test_config_command_prints_what_run_would_use(tmp_path, capsys):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("asset_id,prompt,seed,preset,nerf.steps\na,a teapot,0,if-gpu,\nb,a lamp,1,if-gpu-object,77\n")
    assert main(["config", str(catalog), "--out", str(tmp_path / "out"), "--stage", "nerf", "--set", "nerf.lr=0.002"]) == 0
    documents = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["asset"] for d in documents] == ["a", "b"]
    _, plans = load_catalog(catalog, overrides={"nerf.lr": "0.002"}, out=tmp_path / "out")
    for document, plan in zip(documents, plans):
        nerf = document["stages"]["nerf"]
        assert list(document["stages"]) == ["nerf"]
        assert nerf["identity"] == plan.stage("nerf").identity, "the identity run would cache under"
        assert nerf["config"]["lr"] == 0.002
        assert nerf["guidance_resolved"]["max_step_percent"] == [5000, 0.98, 0.5, 5001]
    assert documents[1]["stages"]["nerf"]["config"]["steps"] == 77 and documents[1]["stages"]["nerf"]["config"]["batch_size"] == 4
    assert main(["config", str(catalog), "--out", str(tmp_path / "out"), "--asset", "nope"]) == 1


def test_config_without_a_catalog_plans_one_placeholder_row(tmp_path, capsys):
    assert main(["config", "--preset", "if-gpu-object", "--prompt", "a lamp", "--out", str(tmp_path / "out"),
                 "--set", "nerf.steps=77"]) == 0
    (document,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert document["asset"] == "example" and document["preset"] == "if-gpu-object"
    assert list(document["stages"]) == ["nerf", "mesh", "uv", "texture", "export"]
    nerf = document["stages"]["nerf"]
    assert nerf["config"]["prompt"] == "a lamp" and nerf["config"]["steps"] == 77
    assert nerf["config"]["view_thresholds"] == {"front": 30.0, "back": 30.0, "overhead": 60.0}
    assert main(["config", "--preset", "fancy"]) == 2
    assert "unknown preset 'fancy'" in capsys.readouterr().err
