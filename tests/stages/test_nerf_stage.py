"""The nerf stage: outputs, atomic completion, resume after a crash, determinism."""

import json

import pytest
import torch

from csd.fields import load_field
from stages.common import completed
from stages.config import build_config, load_preset
from stages.nerf import NerfConfig, run


def _config(model_path, **overrides):
    preset = load_preset("toy-cpu")
    section = {**preset["nerf"], "model": {**preset["model"], "model": str(model_path)}}
    base = {"prompt": "a red cube", "steps": 8, "checkpoint_every": 4, "preview_views": 4, "preview_resolution": 16,
            "resolution": 16, "ambient_only_steps": 4, "renderer.num_samples": 24, "renderer.occupancy_update_every": 4}
    return build_config(NerfConfig, section, {**base, **overrides})


class Crash(RuntimeError):
    pass


# three nerf runs (interrupted, resumed, uninterrupted): ~1 min
@pytest.mark.slow
def test_crash_resume_continues_and_matches_uninterrupted_run(if_like_model, tmp_path):
    config = _config(if_like_model)
    reference = run(config, tmp_path / "reference" / "nerf")
    reference_history = json.loads((tmp_path / "reference" / "nerf" / "history.json").read_text())

    def crash_at_6(step, metrics):
        if step == 6:
            raise Crash("killed")

    target = tmp_path / "asset" / "nerf"
    with pytest.raises(Crash):
        run(config, target, callback=crash_at_6)
    assert not target.exists(), "a crashed stage must not look done"
    assert (tmp_path / "asset" / "nerf.partial" / "checkpoint.pt").exists()

    seen = []
    result = run(config, target, callback=lambda step, metrics: seen.append(step))
    assert seen == [5, 6, 7, 8], "resumed from the step-4 checkpoint, not from 0"
    assert result.metrics["resumed_at"] == 4 and result.metrics["steps"] == 8
    history = json.loads((target / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 9))
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference_history], rel=1e-5)
    assert not (tmp_path / "asset" / "nerf.partial").exists()
    assert not (target / "checkpoint.pt").exists(), "optimizer state is not part of the result"


def test_outputs_load_and_identity_is_recorded(if_like_model, tmp_path):
    result = run(_config(if_like_model, steps=4), tmp_path / "nerf", identity="abc123")
    assert completed(tmp_path / "nerf", "abc123") is not None
    assert completed(tmp_path / "nerf", "other") is None
    field = load_field(result.path("field").parent)
    density = field.density(torch.zeros(1, 3))
    assert float(density) > 5, "blob initialisation: dense at the origin"
    assert float(field.density(torch.tensor([[0.99, 0.0, 0.0]]))) < float(density)
    for name in result.previews:
        assert (tmp_path / "nerf" / name).stat().st_size > 100
    assert set(result.timings) >= {"render_per_step", "guidance_per_step", "optimizer_per_step", "total"}


def test_bad_config_is_rejected_before_work(if_like_model, tmp_path):
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match="valid: .*shading_probs"):
        _config(if_like_model, shading_prob={"albedo": 1.0})
    with pytest.raises(ValueError, match="NerfConfig.prompt: ' ' is empty"):
        run(_config(if_like_model, prompt=" "), tmp_path / "nerf")
    with pytest.raises(ValueError, match="unknown shading"):
        run(_config(if_like_model, shading_probs={"phong": 1.0}), tmp_path / "nerf")
    assert not (tmp_path / "nerf").exists()


def test_a_field_that_renders_nothing_fails_clearly_and_commits_nothing(if_like_model, tmp_path, monkeypatch):
    """An annealed negative prompt drove a toy field to zero density at step ~400 (bench/quality.py);
    the loss then has no gradient, and the stage must say so instead of an autograd error."""
    from csd.renderer import VolumeRenderer
    from stages.nerf import FieldCollapsed

    original, calls = VolumeRenderer.render, []

    def emptied_from_the_third_step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) < 3:
            return out
        # what a collapsed field renders: the background alone, no sample depends on the weights
        return type(out)(out.rgb.detach(), torch.zeros_like(out.opacity), None, None, out.orientation.detach())

    monkeypatch.setattr(VolumeRenderer, "render", emptied_from_the_third_step)
    steps = []
    with pytest.raises(FieldCollapsed, match=r"the field is empty at step (\d) of 8 \(mean opacity 0\b") as raised:
        run(_config(if_like_model), tmp_path / "nerf", callback=lambda step, metrics: steps.append(step))
    assert steps and f"at step {steps[-1] + 1} of 8" in str(raised.value), "raised at the first step that rendered nothing"
    assert issubclass(FieldCollapsed, ValueError), "a retry cannot fix it (flows.flow PERMANENT_ERRORS)"
    assert completed(tmp_path / "nerf") is None and not (tmp_path / "nerf").exists()
