"""Memory: a stage embeds its prompts, releases the text encoder before optimising, and reports peaks."""

import json

from csd.models import load_prior_cached
from stages.config import build_config, load_preset
from stages.nerf import NerfConfig, run


def test_nerf_trains_without_the_text_encoder_and_reports_peak_memory(if_like_model, tmp_path):
    preset = load_preset("toy-cpu")
    section = {**preset["nerf"], "model": {**preset["model"], "model": str(if_like_model)}}
    config = build_config(NerfConfig, section, {
        "prompt": "a red cube", "negative_prompt": "blue", "steps": 3, "preview_views": 4, "preview_resolution": 16,
        "resolution": 16, "renderer.num_samples": 16,
    })
    prior = load_prior_cached(config.model)
    prior.encode_text(["a red cube"])  # resident when the stage starts (as after an earlier stage embedded a prompt)
    resident_at_unet_calls = []
    hook = prior.unet.register_forward_pre_hook(lambda module, args: resident_at_unet_calls.append(prior.text_encoder_resident))
    try:
        result = run(config, tmp_path / "nerf")
    finally:
        hook.remove()
    assert len(resident_at_unet_calls) == 3, "one guidance UNet call per step"
    assert not any(resident_at_unet_calls), "the text encoder must be released before the first training step"
    saved = json.loads((tmp_path / "nerf" / "result.json").read_text())["memory"]
    # the process holds torch and the model: tens of MiB at least, far below the machine's RAM
    assert 50 < saved["peak_rss_mb"] < 64_000 and saved == result.memory
