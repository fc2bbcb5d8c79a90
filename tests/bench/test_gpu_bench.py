"""bench/gpu.py: the published architectures, and its `--tiny` run of the `if-gpu` nerf and texture stages on CPU."""

import json

import pytest

from benches import load_bench


@pytest.fixture(scope="module")
def gpu_bench():
    return load_bench("gpu")


def test_full_architectures_have_the_published_sizes(gpu_bench):
    counts = gpu_bench.parameter_counts()
    # IF-I-XL model card: 4.3B; SD 2 model card: 865M UNet; T5-v1.1-XXL encoder 4.76B; SD VAE 83.7M
    assert counts["if_unet"] == pytest.approx(gpu_bench.PUBLISHED_PARAMETERS["if_unet"], rel=0.01)
    assert counts["sd_unet"] == pytest.approx(865.9e6, rel=0.001)
    assert counts["if_text"] == pytest.approx(4.762e9, rel=0.001)
    assert counts["sd_vae"] == pytest.approx(83.65e6, rel=0.001)
    assert gpu_bench.IF_UNET["encoder_hid_dim"] == gpu_bench.IF_TEXT["d_model"] == 4096
    assert gpu_bench.SD_UNET["cross_attention_dim"] == gpu_bench.SD_TEXT["hidden_size"] == 1024


def test_tiny_run_goes_through_the_loader_and_both_stages(gpu_bench, tmp_path):
    report = gpu_bench.run(steps=2, tiny=True, work=tmp_path / "models", repeats=1)
    nerf, texture = report["stages"]
    assert (nerf["stage"], texture["stage"]) == ("nerf", "texture") and nerf["steps"] == texture["steps"] == 2
    # if-gpu nerf: Perp-Neg batches prompt, negative and two view negatives (+ null while its weight is
    # non-zero) in one UNet call on IF's 3-channel pixels; texture: SD latents (4 channels)
    assert nerf["unet_batch"][1:] == [3, 16, 16] and nerf["unet_batch"][0] >= 4
    assert texture["unet_batch"][1:] == [4, 16, 16]
    for stage in (nerf, texture):
        assert stage["unet_floor_s"] > 0 and stage["ratio"] == pytest.approx(stage["s_per_step"] / stage["unet_floor_s"])
        assert stage["peak_rss_mb"] > 50 and not stage["text_encoder_resident_after"]
    assert report["projected_minutes_per_asset"] == pytest.approx((nerf["s_per_step"] + texture["s_per_step"]) * 10_000 / 60)
    # the tiny models are the full ones' classes and block types, in the diffusers layout the loader reads
    if_dir = tmp_path / "models" / "tiny" / "IF-I-XL-v1.0"
    index = json.loads((if_dir / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and "vae" not in index
    # fp16 files under the hub's variant names, which the preset's `variant: fp16` loads
    assert (if_dir / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (if_dir / "text_encoder" / "model.fp16.safetensors").exists()
    unet = json.loads((if_dir / "unet" / "config.json").read_text())
    assert unet["mid_block_type"] == gpu_bench.IF_UNET["mid_block_type"] and unet["addition_embed_type"] == "text"
    assert set(unet["down_block_types"]) == set(gpu_bench.IF_UNET["down_block_types"])
    assert report["rasterizer"] == "CpuRasterizer"


def test_a_failing_stage_is_reported_and_the_next_one_still_runs(gpu_bench, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("derivative for aten::grid_sampler_3d_backward is not implemented")

    monkeypatch.setattr(gpu_bench.nerf, "run", broken)
    report = gpu_bench.run(steps=2, tiny=True, work=tmp_path / "models", repeats=1, keep_going=True)
    assert report["failed"] == {"nerf": "RuntimeError: derivative for aten::grid_sampler_3d_backward is not implemented"}
    assert [s["stage"] for s in report["stages"]] == ["texture"] and report["stages"][0]["steps"] == 2
    assert "projected_minutes_per_asset" not in report and report["projected_minutes_edit"] > 0
    with pytest.raises(RuntimeError, match="grid_sampler_3d"):
        gpu_bench.run(steps=2, tiny=True, work=tmp_path / "models", repeats=1, stages=("nerf",))
    with pytest.raises(ValueError, match="unknown stage.*mesh; valid: nerf, texture"):
        gpu_bench.run(steps=2, tiny=True, work=tmp_path / "models", repeats=1, stages=("mesh",))
