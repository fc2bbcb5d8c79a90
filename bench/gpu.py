"""GPU benchmark of the `if-gpu` preset with random-initialised models of the exact published architectures.

    python bench/gpu.py --steps 20            # CUDA: full-size IF-I-XL + T5-XXL and SD 2.1-base (~21 GB disk)
    python bench/gpu.py --tiny --steps 2      # CPU: the same path with the architectures scaled down (the test)
    python bench/gpu.py --architectures       # parameter counts of the full-size models (meta device, CPU, seconds)

Builds DeepFloyd/IF-I-XL-v1.0 (UNet + T5-v1.1-XXL encoder) and stabilityai/stable-diffusion-2-1-base
(UNet, VAE, OpenCLIP-H text encoder) from their published configs (`FULL` below, each value with its
source), random-initialised, saves them in the diffusers layout (fp16, under `--work`, reused by later
runs) and loads them through `csd.models.load_prior`, as a nightly worker loads the real weights. It then
runs `--steps` steps of the `if-gpu` `nerf` stage (IF at 64²) and of its `texture` stage (SD at 512²,
nvdiffrast on a 20 480-face sphere with a 1024² texture) with the stages' own `run`, and prints per stage:

- s/step (median over the steps after the first, which pays cuDNN autotuning and nvdiffrast's compile);
- the UNet-only floor: the stage's own guidance UNet call (captured from the run, same batch) timed
  alone, the part of a step no method can avoid; and the ratio s/step / floor;
- peak memory (`peak_cuda_allocated_mb` / `peak_rss_mb`, the `memory` of the stage's `result.json`);
- projected minutes per asset at the preset's step counts (nerf 10 000 + texture 10 000, optimisation
  only: model loading printed apart; mesh, uv and export not included).

The stages' peaks include what the pipeline keeps: the text encoder is loaded inside the stage (first
prompt) and released before its first step; the IF prior stays cached while `texture` runs, as in one
asset process of the pipeline; each stage's turntable previews at the preset's size are part of it.

Random weights give the same speed and memory as trained ones (same shapes and kernels); the losses
mean nothing. The projection takes the early steps as typical: later steps of the real run skip more
empty space once the occupancy grid has pruned it (cheaper) and switch shading after the ambient phase.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csd.models import ModelConfig, load_prior_cached  # noqa: E402
from csd.prompts import cache_root  # noqa: E402
from csd.raster import get_rasterizer  # noqa: E402
from stages import nerf, texture  # noqa: E402
from stages.assets import TexturedMesh, write_textured_mesh  # noqa: E402
from stages.config import build_config, load_preset  # noqa: E402

log = logging.getLogger("bench.gpu")

PRESET = "if-gpu"
PROMPT = "a ceramic teapot shaped like a fox"
WORDS = "a ceramic teapot shaped like fox , front side back overhead view oversaturated color ugly tiling low quality noisy"
"""The benchmark's prompts, negative prompt and view suffixes: the word-level tokenizers below know them."""

# --- the published architectures ------------------------------------------------------------------
# IF-I-XL UNet: unet/config.json of a copy saved from DeepFloyd/IF-I-XL-v1.0 ("_name_or_path"), the gated
# original being unreachable: https://huggingface.co/lucostiguy11/dreambooth_if/blob/main/unet/config.json
# (block_out_channels 704·(1, 2, 3, 4), layers_per_block 3, attention_head_dim 64, cross_attention_dim 2816,
# encoder_hid_dim 4096 text_proj, addition_embed_type text with 64 heads, scale_shift, gelu, sample_size 64,
# out_channels 6). Up blocks and the mid block: diffusers scripts/convert_if.py create_unet_diffusers_config
# (mirror of the down blocks; UNetMidBlock2DSimpleCrossAttn; upcast_attention False; no linear projection).
IF_UNET = {
    "sample_size": 64, "in_channels": 3, "out_channels": 6, "layers_per_block": 3,
    "block_out_channels": (704, 1408, 2112, 2816),
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "attention_head_dim": 64, "cross_attention_dim": 2816, "cross_attention_norm": "group_norm",
    "encoder_hid_dim": 4096, "encoder_hid_dim_type": "text_proj",
    "addition_embed_type": "text", "addition_embed_type_num_heads": 64,
    "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "upcast_attention": False, "use_linear_projection": False,
}
# T5-v1.1-XXL encoder (IF's text encoder, model card: "T5-v1_1-xxl"): https://huggingface.co/google/t5-v1_1-xxl/blob/main/config.json
IF_TEXT = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
}
# IF stage I scheduler: diffusers scripts/convert_if.py convert_stage_1_pipeline
IF_SCHEDULER = {
    "variance_type": "learned_range", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
    "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5,
}
# SD 2.1-base UNet: a copy with "_name_or_path": "stabilityai/stable-diffusion-2-1-base",
# https://huggingface.co/Apocalypse-19/Vishu-the-Cat/blob/main/unet/config.json
SD_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024, "use_linear_projection": True,
    "upcast_attention": False, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
}
# SD 2.1-base VAE: https://huggingface.co/Apocalypse-19/Vishu-the-Cat/blob/main/vae/config.json (its sample_size
# 768 is not the model's resolution: 64 latents × 8 = 512, see DiffusionPrior.resolution)
SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "act_fn": "silu", "norm_num_groups": 32, "sample_size": 768, "scaling_factor": 0.18215,
}
# SD 2.1-base text encoder (OpenCLIP ViT-H/14 text tower, penultimate layer: 23 of 24 layers):
# https://huggingface.co/puffy310/JastaDreambooth/blob/main/text_encoder/config.json
SD_TEXT = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 512, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# SD 2.1-base scheduler: https://huggingface.co/flax/stable-diffusion-2-1-base/blob/main/scheduler/scheduler_config.json
SD_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
}
FULL = {"if_unet": IF_UNET, "if_text": IF_TEXT, "sd_unet": SD_UNET, "sd_vae": SD_VAE, "sd_text": SD_TEXT}
PUBLISHED_PARAMETERS = {"if_unet": 4.3e9}
"""IF-I-XL model card: "Num Parameters: 4.3B" (https://huggingface.co/DeepFloyd/IF-I-XL-v1.0)."""

# The same classes and block types, scaled down for CPU (`--tiny`)
TINY = {
    "if_unet": {**IF_UNET, "sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 64),
                "down_block_types": IF_UNET["down_block_types"][:2], "up_block_types": IF_UNET["up_block_types"][2:],
                "attention_head_dim": 16, "cross_attention_dim": 64, "encoder_hid_dim": 32,
                "addition_embed_type_num_heads": 4, "norm_num_groups": 8},
    "if_text": {**IF_TEXT, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    "sd_unet": {**SD_UNET, "sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 64),
                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                "attention_head_dim": (2, 4), "cross_attention_dim": 32, "norm_num_groups": 8},
    "sd_vae": {**SD_VAE, "block_out_channels": (16, 32), "down_block_types": ("DownEncoderBlock2D",) * 2,
               "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 8, "layers_per_block": 1, "sample_size": 32},
    "sd_text": {**SD_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
}
TINY_OVERRIDES = {
    # CPU-sized stage settings for `--tiny`: same code path, small renders and grids
    "nerf": {"resolution": 16, "renderer.num_samples": 16, "field.log2_hashmap_size": 14, "field.n_levels": 4,
             "field.max_resolution": 64, "renderer.occupancy_resolution": 16, "preview_views": 4, "preview_resolution": 16},
    "texture": {"resolution": 32, "preview_views": 4, "preview_resolution": 32},
}


def build_module(name: str, config: dict, device: str | torch.device, dtype: torch.dtype = torch.float32):
    """The random-initialised module `name` (`if_unet`, `if_text`, `sd_unet`, `sd_vae`, `sd_text`) on `device`,
    initialised directly in `dtype` (fp16: T5-XXL needs 8.9 GiB, not 17.7 GiB in fp32 plus the cast copy,
    so the build fits a 24 GB GPU); `meta` builds the structure without memory, for counting parameters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    builders = {
        "if_unet": lambda: UNet2DConditionModel(**config), "sd_unet": lambda: UNet2DConditionModel(**config),
        "sd_vae": lambda: AutoencoderKL(**config), "if_text": lambda: T5EncoderModel(T5Config(**config)),
        "sd_text": lambda: CLIPTextModel(CLIPTextConfig(**config)),
    }
    if name not in builders:
        raise ValueError(f"unknown module {name!r}; valid: {', '.join(builders)}")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return builders[name]()
    finally:
        torch.set_default_dtype(default)


def parameter_counts(architectures: dict = FULL) -> dict[str, int]:
    """Parameters of each module, built on the meta device (no memory, seconds)."""
    return {name: sum(p.numel() for p in build_module(name, config, "meta").parameters()) for name, config in architectures.items()}


def _word_tokenizer(kind: str, max_length: int):
    """A word-level fast tokenizer over `WORDS` (the ids stay far below both models' vocabularies;
    the real SentencePiece / BPE vocabularies are not needed to time the models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special + sorted(set(WORDS.split())))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind == "t5":  # T5 appends </s>; CLIP wraps in start/end tokens
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=max_length, pad_token="<|endoftext|>", bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", unk_token="<unk>",
    )


def _save(module, directory: Path, variant: str | None) -> None:
    """One safetensors file per component (no shards), `variant` in its name as the hub's fp16 files."""
    module.save_pretrained(directory, variant=variant, max_shard_size="20GB", safe_serialization=True)


def build_priors(work: Path, tiny: bool, device: str) -> dict[str, Path]:
    """Build and save both priors in the diffusers layout under `work` once (a `complete` marker is
    written last); returns {"if": path, "sd": path}."""
    from diffusers import DDPMScheduler, PNDMScheduler

    architectures = TINY if tiny else FULL
    # fp16 files with the hub's `fp16` variant names, as the preset loads them (`--tiny` too, so the
    # CPU test reads the same files; it computes in float32)
    dtype, variant = torch.float16, "fp16"
    paths = {"if": work / "IF-I-XL-v1.0", "sd": work / "stable-diffusion-2-1-base"}
    layout = {
        "if": {"unet": ("diffusers", "UNet2DConditionModel", "if_unet"), "text_encoder": ("transformers", "T5EncoderModel", "if_text"),
               "tokenizer": ("transformers", "PreTrainedTokenizerFast", "t5"), "scheduler": ("diffusers", "DDPMScheduler", None)},
        "sd": {"unet": ("diffusers", "UNet2DConditionModel", "sd_unet"), "vae": ("diffusers", "AutoencoderKL", "sd_vae"),
               "text_encoder": ("transformers", "CLIPTextModel", "sd_text"), "tokenizer": ("transformers", "PreTrainedTokenizerFast", "clip"),
               "scheduler": ("diffusers", "PNDMScheduler", None)},
    }
    for key, path in paths.items():
        if (path / "complete").exists():
            continue
        started = time.perf_counter()
        torch.manual_seed(0)
        for folder, (_, _, name) in layout[key].items():
            if folder == "tokenizer":
                _word_tokenizer(name, 77).save_pretrained(path / folder)
            elif folder == "scheduler":
                (DDPMScheduler(**IF_SCHEDULER) if key == "if" else PNDMScheduler(**SD_SCHEDULER)).save_pretrained(path / folder)
            else:
                module = build_module(name, architectures[name], device, dtype)
                _save(module, path / folder, variant)
                del module
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        index = {"_class_name": "IFPipeline" if key == "if" else "StableDiffusionPipeline",
                 **{folder: [library, cls] for folder, (library, cls, _) in layout[key].items()}}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        (path / "complete").write_text("random-initialised, bench/gpu.py\n")
        log.info("built %s in %.0f s", path, time.perf_counter() - started)
    return paths


def sphere_uv_input(directory: Path, subdivisions: int, texture_size: int) -> Path:
    """A textured-mesh stage directory (as `uv` writes it): an icosphere of radius 0.6, xatlas UVs, grey texture."""
    import trimesh
    import xatlas

    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.6)
    mapping, faces, uvs = xatlas.parametrize(sphere.vertices, sphere.faces)
    texture_image = np.full((texture_size, texture_size, 3), 128, np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    write_textured_mesh(TexturedMesh(np.asarray(sphere.vertices)[mapping], faces, uvs, texture_image), directory)
    return directory


class UNetCall:
    """Captures the last UNet call of a stage (a forward pre-hook) and times it alone."""

    def __init__(self, unet):
        self.unet, self.args, self.kwargs = unet, None, None
        self.handle = unet.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self.args, self.kwargs = args, kwargs

    @torch.no_grad()
    def seconds(self, repeats: int, device: torch.device) -> float:
        """Median wall time of the captured call, `repeats` times after one warm-up."""
        self.handle.remove()
        if self.args is None:
            raise RuntimeError("the stage made no UNet call")
        times = []
        for i in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            self.unet(*self.args, **self.kwargs)
            _synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_config(cls, preset: dict, stage: str, model_path: Path, steps: int, tiny: bool):
    section = {**preset[stage], "model": {**preset["model"], **preset[stage].get("model", {}), "model": str(model_path)}}
    overrides = {"prompt": PROMPT, "steps": steps, "checkpoint_every": steps + 1}
    if tiny:
        overrides.update({"model.device": "cpu", "model.dtype": "float32", **TINY_OVERRIDES[stage]})
    return build_config(cls, section, overrides)


def bench_stage(name: str, module, config, out_dir: Path, inputs: dict | None, repeats: int) -> dict:
    """Run one stage through its own `run` and measure it."""
    started = time.perf_counter()
    prior = load_prior_cached(config.model)  # the stage finds it in the same cache
    load_seconds = time.perf_counter() - started
    call = UNetCall(prior.unet)
    result = module.run(config, out_dir, inputs=inputs)
    history = json.loads((out_dir / "history.json").read_text())
    steps = [h["step_time"] for h in history]
    per_step = statistics.median(steps[1:] if len(steps) > 1 else steps)
    floor = call.seconds(repeats, prior.device)
    batch = call.args[0].shape if call.args else call.kwargs["sample"].shape
    return {
        "stage": name, "steps": len(steps), "load_s": load_seconds, "first_step_s": steps[0], "s_per_step": per_step,
        "unet_floor_s": floor, "ratio": per_step / floor, "unet_batch": list(batch),
        "split_s": {k: v for k, v in result.timings.items() if k.endswith("_per_step")},
        **result.memory,
        "text_encoder_resident_after": prior.text_encoder_resident,
    }


STAGES = ("nerf", "texture")


def run(steps: int, tiny: bool, work: Path, repeats: int, verbose: bool = False, stages: tuple[str, ...] = STAGES,
        keep_going: bool = False) -> dict:
    """Build (or reuse) the priors and bench `stages` in one process (the IF prior stays cached while
    `texture` runs, as in an asset's process). `verbose`: each part is printed as it is measured.
    `keep_going`: a stage that fails is reported under "failed" (traceback printed) and the next one
    still runs, so on a rented GPU one stage's bug does not cost the other's numbers."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))}; valid: {', '.join(STAGES)}")
    cuda = torch.cuda.is_available()
    if not tiny and not cuda:
        raise SystemExit(
            "bench/gpu.py: the full-size models need CUDA (T5-XXL alone is ~19 GB in fp32 to initialise); on CPU use --tiny"
        )
    device = "cuda" if cuda and not tiny else "cpu"
    paths = build_priors(work / ("tiny" if tiny else "full"), tiny, device)
    preset = load_preset(PRESET)
    report = {"preset": PRESET, "tiny": tiny, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "parameters": parameter_counts(TINY if tiny else FULL), "stages": [], "failed": {}}
    if verbose:
        print_header(report)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        for name in stages:
            try:
                if name == "nerf":
                    config = stage_config(nerf.NerfConfig, preset, "nerf", paths["if"], steps, tiny)
                    measured = bench_stage("nerf", nerf, config, tmp / "nerf", None, repeats)
                else:
                    uv_dir = sphere_uv_input(tmp / "uv", 1 if tiny else 5, 128 if tiny else preset["uv"]["unwrap"]["resolution"])
                    config = stage_config(texture.TextureConfig, preset, "texture", paths["sd"], steps, tiny)
                    measured = bench_stage("texture", texture, config, tmp / "texture", {"uv": uv_dir}, repeats)
                    report["rasterizer"] = type(get_rasterizer(config.renderer.rasterizer, device)).__name__
            except Exception as error:
                if not keep_going:
                    raise
                traceback.print_exc()
                report["failed"][name] = f"{type(error).__name__}: {error}"
                print(f"{name:8s} FAILED: {report['failed'][name]}", flush=True)
                continue
            report["stages"].append(measured)
            if verbose:
                print_stage(measured)
    preset_steps = {name: int(preset[name]["steps"]) for name in (*STAGES, "edit")}
    report["preset_steps"] = preset_steps
    measured = {s["stage"]: s for s in report["stages"]}
    if set(measured) == set(STAGES):
        report["projected_minutes_per_asset"] = sum(measured[name]["s_per_step"] * preset_steps[name] for name in STAGES) / 60
    if "texture" in measured:
        report["projected_minutes_edit"] = measured["texture"]["s_per_step"] * preset_steps["edit"] / 60
    return report


def print_header(report: dict) -> None:
    print(f"bench/gpu.py — preset {report['preset']}{' (--tiny: scaled-down architectures)' if report['tiny'] else ''}, "
          f"device {report['device']}, torch {report['torch']}")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in report["parameters"].items()), flush=True)


def print_stage(s: dict) -> None:
    """One stage's lines, printed as soon as it is measured (a later stage's failure keeps them)."""
    memory = f"peak CUDA allocated {s['peak_cuda_allocated_mb'] / 1024:.2f} GiB, " if "peak_cuda_allocated_mb" in s else ""
    print(f"{s['stage']:8s} {s['s_per_step']:.4f} s/step (first step {s['first_step_s']:.2f} s, {s['steps']} steps), "
          f"UNet floor {s['unet_floor_s']:.4f} s (batch {tuple(s['unet_batch'])}), ratio {s['ratio']:.2f}, "
          f"{memory}peak RSS {s['peak_rss_mb'] / 1024:.2f} GiB, prior load (text encoder aside) {s['load_s']:.1f} s, "
          f"text encoder resident after: {s['text_encoder_resident_after']}")
    print("         split per step: " + ", ".join(f"{k.removesuffix('_per_step')} {v:.4f}" for k, v in s["split_s"].items()), flush=True)


def print_summary(report: dict) -> None:
    steps, parts = report["preset_steps"], []
    if "projected_minutes_per_asset" in report:
        parts.append(f"projected optimisation time per asset (nerf {steps['nerf']} + texture {steps['texture']} steps): "
                     f"{report['projected_minutes_per_asset']:.1f} min")
    if "projected_minutes_edit" in report:
        parts.append(f"an edit ({steps.get('edit', '?')} texture steps) adds {report['projected_minutes_edit']:.1f} min "
                     f"(rasterizer {report['rasterizer']})")
    print("; ".join(parts))
    for name, error in report["failed"].items():
        print(f"FAILED {name}: {error}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per stage (the first is not counted in s/step)")
    parser.add_argument("--tiny", action="store_true", help="scaled-down architectures on CPU (same code path)")
    parser.add_argument("--architectures", action="store_true", help="print full-size parameter counts (meta device) and exit")
    parser.add_argument("--work", type=Path, default=None, help="where the built models are kept (default: $CSD_ASSET_CACHE/bench-gpu)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of the UNet-only floor")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # the model builds' times
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if args.architectures:
        counts = parameter_counts()
        for name, count in counts.items():
            print(f"{name:8s} {count / 1e6:10,.1f} M parameters, {count * 2 / 2**30:6.2f} GiB in fp16")
        print(f"total {sum(counts.values()) * 2 / 2**30:.1f} GiB of fp16 weights on disk")
        return
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    work = args.work or cache_root() / "bench-gpu"
    report = run(args.steps, args.tiny, work, args.repeats, verbose=True, stages=tuple(args.stages.split(",")), keep_going=True)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if report["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
