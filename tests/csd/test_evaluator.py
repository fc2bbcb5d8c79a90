"""The open-set toy evaluator (issue 13): the world's four shapes stay recognised, non-primitives are `other`."""

import dataclasses

import pytest
import torch

from csd.cameras import orbit_cameras, sample_cameras
from csd.toy.evaluator import OTHER, OTHER_MAX_IOU, accuracy, held_out_images, load_evaluator, parse_prompt
from csd.toy.world import (
    BOUND,
    COLOUR_NAMES,
    COLOURS,
    OTHER_KINDS,
    SHAPES,
    WorldConfig,
    primitive_silhouette_iou,
    render,
    render_layers,
    sample_other_scenes,
    vase_with_horn,
)

UNSEEN_SEED = 3_000_000_007  # used by nothing that trains
OTHER_PLAIN, OTHER_TINTED = 0.911, 0.883
"""Shares of 1024 fresh non-primitive renders the shipped weights call `other` (evaluator.json, validation)."""


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


def test_shape_head_is_open_set(evaluator):
    assert evaluator.config.shapes == SHAPES + (OTHER,)
    # `other` is a class, never a prompt's shape
    with pytest.raises(ValueError, match="no known shape"):
        parse_prompt("a red other")
    with pytest.raises(ValueError, match="no known shape"):
        evaluator.score(torch.rand(2, 3, 32, 32), "a red other")


def test_fresh_primitives_keep_their_shape(evaluator):
    held_out = held_out_images(320, UNSEEN_SEED)
    plain = accuracy(evaluator, held_out.plain, held_out.colour_label, held_out.shape_label)
    assert plain.shape >= 0.98 and plain.colour >= 0.97, plain
    tinted = accuracy(evaluator, held_out.tinted, held_out.colour_label, held_out.shape_label)
    assert tinted.shape >= 0.95 and tinted.colour >= 0.95, tinted  # measured 0.979 on 1024
    # through the public API: the prompted shape, rarely `other`
    result = evaluator.score(held_out.plain, held_out.prompts())
    assert result.shape_fraction >= 0.98 and result.other_fraction <= 0.02


def test_fresh_non_primitives_are_other(evaluator):
    held_out = held_out_images(96, UNSEEN_SEED, other=True)  # views that do not look like a primitive (OTHER_MAX_IOU)
    assert torch.isfinite(held_out.plain).all() and len(held_out.shape_label) == 96
    # guards the shipped weights' measured level (evaluator.json, 1024 fresh renders: OTHER_PLAIN / OTHER_TINTED);
    # issue 13's bar is 0.90; a closed-set evaluator scores 0 here
    plain = accuracy(evaluator, held_out.plain, held_out.colour_label, held_out.shape_label)
    assert plain.shape >= OTHER_PLAIN - 0.08 and plain.colour >= 0.95, plain  # `shape` here is the share called `other`
    tinted = accuracy(evaluator, held_out.tinted, held_out.colour_label, held_out.shape_label)
    assert tinted.shape >= OTHER_TINTED - 0.1, tinted
    # `other` is a wrong shape for whichever primitive the prompt names
    for shape in SHAPES:
        result = evaluator.score(held_out.plain, f"a red {shape}")
        assert result.other_fraction == plain.shape and result.shape_fraction <= 1 - result.other_fraction


def test_primitive_like_views_are_not_other_examples():
    """The filter that keeps `other` honest: true primitives fit a primitive's silhouette, stretched and paired objects do not."""
    config = WorldConfig()
    generator = torch.Generator().manual_seed(UNSEEN_SEED)
    scenes = sample_other_scenes(48, config, generator)
    cameras = sample_cameras(48, config.cameras, generator)
    # the same scenes with every modification taken away are the world's primitives
    plain = dataclasses.replace(
        scenes, centre=torch.zeros(48, 3), stretch=torch.ones(48, 3), taper=torch.zeros(48), twist=torch.zeros(48),
        second_mode=torch.zeros(48, dtype=torch.long), horn_on=torch.zeros_like(scenes.horn_on),
        blob_on=torch.zeros_like(scenes.blob_on), blobs_only=torch.zeros(48, dtype=torch.bool),
        wave_amplitude=torch.zeros_like(scenes.wave_amplitude), lipschitz=torch.ones(48),
    )
    primitive = primitive_silhouette_iou(plain, cameras, config)
    assert primitive.quantile(0.1) >= 0.9 and (primitive > OTHER_MAX_IOU).float().mean() >= 0.9, primitive
    other = primitive_silhouette_iou(scenes, cameras, config)
    pair = scenes.kind == OTHER_KINDS.index("pair")
    assert other[pair].median() < 0.7 and other.median() < primitive.median() - 0.1, other


def test_non_primitive_scenes_are_deterministic_visible_and_of_every_kind():
    config = WorldConfig()
    scenes = sample_other_scenes(40, config, torch.Generator().manual_seed(5))
    again = sample_other_scenes(40, config, torch.Generator().manual_seed(5))
    assert torch.equal(scenes.kind, again.kind) and torch.equal(scenes.stretch, again.stretch)
    assert set(scenes.kind.tolist()) == set(range(len(OTHER_KINDS)))
    # colour labels are the palette's: the albedo is the label's colour plus the world's jitter
    palette = torch.tensor(list(COLOURS.values()))[scenes.colour]
    assert (scenes.albedo - palette).abs().max() < 0.25
    cameras = sample_cameras(40, config.cameras, torch.Generator().manual_seed(6))
    colour, alpha = render_layers(scenes, cameras, config)
    assert torch.isfinite(colour).all() and torch.isfinite(alpha).all()
    coverage = alpha.mean((1, 2, 3))
    assert (coverage > 0.02).all() and (coverage < 0.8).all()
    # everything inside the bounding sphere, where the tracer starts marching
    on_bound = torch.nn.functional.normalize(torch.randn(40, 2000, 3, generator=torch.Generator().manual_seed(7)), dim=-1)
    assert (scenes.sdf(BOUND * on_bound) > 0).all()


def test_vase_like_cube_with_a_horn_is_not_a_cube(evaluator):
    scenes, config = vase_with_horn(8)
    views = render(scenes, orbit_cameras(8), config)
    result = evaluator.score(views, "a red cube")
    assert result.colour_fraction >= 0.9
    assert result.other_fraction >= 0.75 and result.shape_fraction <= 0.25, result.predicted_shapes


def test_stages_judged_by_the_evaluator_are_identified_by_its_weights(tmp_path, monkeypatch):
    import shutil

    from stages import identity
    from stages.export import ExportConfig
    from stages.texture import TextureConfig

    found = identity.weights_fingerprints(ExportConfig(scorer="toy"))
    assert found["scorer"] == f"toy-evaluator:{identity.evaluator_fingerprint()}" and found["scorer"].startswith("toy-evaluator:sha256:")
    assert "scorer" not in identity.weights_fingerprints(ExportConfig(scorer="none"))
    assert identity.weights_fingerprints(TextureConfig(prompt="a red cube", evaluator="toy"))["evaluator"] == found["scorer"]
    assert "evaluator" not in identity.weights_fingerprints(TextureConfig(prompt="a red cube", evaluator="none"))
    # retrained weights (one byte of the file) are another identity
    (tmp_path / "csd" / "toy").mkdir(parents=True)
    for name in ("evaluator.safetensors", "evaluator.json"):
        shutil.copy(identity.PROJECT_ROOT / "csd" / "toy" / name, tmp_path / "csd" / "toy" / name)
    monkeypatch.setattr(identity, "PROJECT_ROOT", tmp_path)
    assert identity.evaluator_fingerprint() == identity.weights_fingerprints(ExportConfig())["scorer"].split(":", 1)[1]
    weights = tmp_path / "csd" / "toy" / "evaluator.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert f"toy-evaluator:{identity.evaluator_fingerprint()}" != found["scorer"]
