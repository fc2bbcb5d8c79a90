"""Loading a text-to-image diffusion prior from a diffusers model id or a local directory.

One code path for Stable Diffusion (latent: has a VAE), DeepFloyd IF stage I (pixel: no VAE, T5
text encoder) and the shipped toy prior (pixel, tiny CLIP): the components named in
`model_index.json` are loaded one by one with their own `from_pretrained`, frozen and put in
`eval()` mode.
"""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from csd.checks import Check, optional, validate, whole

log = logging.getLogger(__name__)

TOY_PRIOR = Path(__file__).parent / "toy" / "prior"
SHORT_NAMES = {"toy": TOY_PRIOR}
"""Names that resolve to models shipped inside the package."""

REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES = get_args(PredictionType)
"""What the UNet predicts (scheduler config); score distillation needs ε, v is converted."""


class ModelNotFoundError(RuntimeError):
    """A model id/path could not be resolved to a local diffusers-layout directory."""


@dataclass(frozen=True)
class ModelConfig:
    """Which prior to load and how."""

    model: str = "toy"
    """A diffusers model id (e.g. `stabilityai/stable-diffusion-2-1-base`), a local directory in the
    diffusers layout, or a short name of a shipped model (`toy`)."""
    revision: str | None = None
    """Hub revision or variant folder, for ids."""
    variant: str | None = None
    """Weights variant on disk (`fp16` for SD/IF checkpoints that ship one)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """`auto` (fp16 on CUDA, fp32 on CPU), `float32`, `float16` or `bfloat16`."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, …"""
    channels_last: bool = False
    """Put the UNet in channels-last memory format (faster convolutions on recent GPUs)."""
    attention_slicing: bool = False
    """Trade speed for memory in the UNet's attention (for small GPUs)."""
    max_length: int | None = None
    """Text sequence length; default: the tokenizer's `model_max_length` (77 for SD's CLIP)."""

    def __post_init__(self):
        validate(self, {
            "model": lambda value: None if isinstance(value, str) and value.strip() else f"{value!r} names no model",
            "device": device_check(), "max_length": optional(whole(1)),
        })


def device_check(auto: bool = True) -> Check:
    """A field check: the value is a torch device name (`cpu`, `cuda`, `cuda:1`, …) or, when `auto`,
    `auto`. Whether the device exists is known only where the stage runs."""
    valid = f"{'auto, ' if auto else ''}cpu, cuda, cuda:<index>, mps, …"

    def check(name):
        if auto and name == "auto":
            return None
        try:
            torch.device(name)
        except (RuntimeError, TypeError):
            return f"{name!r} is not a torch device; valid: {valid}"
        return None

    return check


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    valid = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in valid:
        raise ValueError(f"unknown dtype {name!r}; valid: auto, {', '.join(valid)}")
    return valid[name]


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory in the diffusers layout for `model`, without downloading unless allowed.

    Order: shipped short names, an existing local path, the Hugging Face cache (offline), and
    finally a download unless `HF_HUB_OFFLINE` is set.
    """
    if model in SHORT_NAMES:
        path = SHORT_NAMES[model]
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"the shipped model {model!r} is missing at {path}; reinstall csd-asset or train it with "
                "`python -m tools.toy.train`"
            )
        return path
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").exists():
            raise ModelNotFoundError(f"{local} exists but is not a diffusers model folder (no model_index.json)")
        return local
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"model {model!r} is neither a local folder nor a Hugging Face id of the form 'owner/name'; "
            f"shipped short names: {', '.join(SHORT_NAMES)}"
        )
    from huggingface_hub import constants, snapshot_download

    patterns = ["model_index.json", *(f"{c}/*" for c in (*REQUIRED_COMPONENTS, "vae"))]
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        where = f"the Hugging Face cache at {constants.HF_HUB_CACHE}"
        advice = (
            f"Provide it as a local folder in the diffusers layout (model: /path/to/{model.split('/')[-1]}), "
            f"or download it once on a machine with access (`huggingface-cli download {model}`) into {where} "
            "and point HF_HOME there."
        )
        if offline:
            raise ModelNotFoundError(f"model {model!r} is not in {where} and HF_HUB_OFFLINE is set. {advice}") from cached_error
        try:
            return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
        except Exception as download_error:
            raise ModelNotFoundError(
                f"model {model!r} is not in {where} and could not be downloaded ({type(download_error).__name__}: "
                f"{download_error}). {advice}"
            ) from download_error


def _component_class(library: str, class_name: str):
    if library not in ("diffusers", "transformers"):
        raise ModelNotFoundError(f"component library {library!r} is not supported (diffusers, transformers)")
    return getattr(importlib.import_module(library), class_name)


@dataclass
class DiffusionPrior:
    """A frozen text-to-image diffusion model, ready for score distillation.

    `kind` is `latent` (a VAE maps renders to latents, SD) or `pixel` (renders are the model's
    input, IF stage I and the toy prior). `resolution` is the render side the model expects.

    The text encoder is needed only to embed a stage's few prompts (T5-XXL: 8.9 GiB in fp16, more
    than the UNet of IF-I-XL): `load_prior` leaves it on disk until the first `encode_text` (or
    `text_encoder` access), `release_text_encoder` drops it before optimisation, and it is loaded
    again through `text_encoder_loader` when a later prompt needs it.
    """

    identity: str
    unet: torch.nn.Module
    _text_encoder: torch.nn.Module | None
    """The text encoder while resident; use `text_encoder` (loads it again when released)."""
    tokenizer: object
    alphas_cumprod: Tensor  # (T,) on device, float32
    vae: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype
    max_length: int
    prediction_type: PredictionType = "epsilon"
    """The scheduler's `prediction_type`: `epsilon` or `v_prediction` (converted to ε)."""
    text_encoder_loader: Callable[[], torch.nn.Module] | None = None
    """Loads the text encoder again (frozen, on `device`) after `release_text_encoder`; without
    one the prior keeps its text encoder."""
    _text_lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self):
        validate(self)

    @property
    def kind(self) -> str:
        return "latent" if self.vae is not None else "pixel"

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def resolution(self) -> int:
        """Pixel models: the UNet's `sample_size`. Latent models: the UNet's latent size times the
        VAE's downsampling (2 per VAE block after the first), as diffusers' pipelines compute it; the
        VAE's own `sample_size` is not the model's resolution (SD 2.1-base's VAE says 768, the model
        works at 64 × 8 = 512)."""
        if self.vae is not None:
            return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size)

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The text encoder, loaded again through `text_encoder_loader` if it was released."""
        with self._text_lock:
            if self._text_encoder is None:
                if self.text_encoder_loader is None:
                    raise RuntimeError(f"{self.identity}: the text encoder was released and this prior has no loader to bring it back")
                log.info("loading the text encoder of %s", self.identity)
                self._text_encoder = self.text_encoder_loader()
            return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, module: torch.nn.Module | None) -> None:
        self._text_encoder = module

    @property
    def text_encoder_resident(self) -> bool:
        """Whether the text encoder is in memory now (False after `release_text_encoder`)."""
        return self._text_encoder is not None

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """`N` texts → `(N, L, D)` last hidden states (as SD and IF condition their UNets); loads the
        text encoder again when it was released."""
        with self._text_lock:
            tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
            encoder = self.text_encoder
            kwargs = {}
            if getattr(encoder.config, "model_type", "") == "t5":
                kwargs["attention_mask"] = tokens.attention_mask.to(self.device)
            return encoder(tokens.input_ids.to(self.device), **kwargs).last_hidden_state.to(self.dtype)

    def release_text_encoder(self) -> None:
        """Free the text encoder's memory (host and GPU) until `encode_text` needs it again.

        A no-op for a prior without `text_encoder_loader` (it could not bring the encoder back)."""
        with self._text_lock:
            if self._text_encoder is None or self.text_encoder_loader is None:
                return
            self._text_encoder = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.info("released the text encoder of %s", self.identity)

    def encode_images(self, images: Tensor) -> Tensor:
        """Renders `(B, 3, H, W)` in [0, 1] → the model's input space `z` (differentiable).

        Pixel models: resized to the UNet's size, scaled to [-1, 1]. Latent models: resized to
        the VAE's size, scaled to [-1, 1], encoded (posterior mean) and multiplied by the VAE's
        `scaling_factor`. `z` is float32 whatever the model dtype: only the UNet input is cast
        (official forward_unet, deep_floyd_simple_guidance.py:125-136; trainer precision 32,
        configs/csd-if.yaml:113).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        size = self.resolution
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, (size, size), mode="bilinear", align_corners=False, antialias=True)
        x = (images * 2.0 - 1.0).float()
        if self.vae is None:
            return x
        posterior = self.vae.encode(x.to(self.dtype)).latent_dist
        return (posterior.mean * self.vae.config.scaling_factor).float()

    def predict_noise(self, z_t: Tensor, t: Tensor, text_embeddings: Tensor) -> Tensor:
        """ε prediction `(B, C, h, w)` in float32; the learned-variance channels of IF are dropped.

        Only the UNet's inputs are cast to the model dtype. A v-prediction model's output is turned
        into ε = √ᾱ_t·v + √(1−ᾱ_t)·z_t (v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀, Salimans & Ho 2022)."""
        out = self.unet(z_t.to(self.dtype), t, encoder_hidden_states=text_embeddings.to(self.dtype)).sample.float()
        if out.shape[1] == 2 * z_t.shape[1]:
            out = out[:, : z_t.shape[1]]
        if self.prediction_type == "v_prediction":
            alpha = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].view(-1, 1, 1, 1).to(out.device)
            out = alpha.sqrt() * out + (1 - alpha).sqrt() * z_t.float()
        return out


@functools.lru_cache(maxsize=2)
def load_prior_cached(config: ModelConfig) -> DiffusionPrior:
    """`load_prior`, kept in memory so a batch of assets in one process loads the weights once."""
    return load_prior(config)


def load_prior(config: ModelConfig = ModelConfig()) -> DiffusionPrior:
    """Load a prior from a model id, local path or shipped short name (see `ModelConfig`)."""
    path = resolve_model_path(config.model, config.revision)
    index = json.loads((path / "model_index.json").read_text())
    missing = [c for c in REQUIRED_COMPONENTS if c not in index or (index[c] and index[c][0] is None)]
    if missing:
        raise ModelNotFoundError(f"{path}/model_index.json lacks components {missing}; need {list(REQUIRED_COMPONENTS)}")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    def load(name: str, **kwargs):
        library, class_name = index[name]
        cls = _component_class(library, class_name)
        if name == "tokenizer" and class_name == "PreTrainedTokenizerFast":
            cls = _component_class("transformers", "AutoTokenizer")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return cls.from_pretrained(path, subfolder=name, **kwargs)

    weights = {"torch_dtype": dtype, "variant": config.variant}
    # without accelerate diffusers warns and falls back to this anyway; say it so the log stays clean
    diffusers_weights = {**weights, "low_cpu_mem_usage": False} if importlib.util.find_spec("accelerate") is None else weights
    scheduler = load("scheduler")
    # before the weights load: a v-prediction or x0 model used as ε would distil garbage silently
    prediction_type = str(getattr(scheduler.config, "prediction_type", "epsilon"))
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{path}/scheduler: prediction_type {prediction_type!r} is not supported; valid: {', '.join(PREDICTION_TYPES)}")

    def frozen(module: torch.nn.Module) -> torch.nn.Module:
        return module.requires_grad_(False).eval().to(device)

    def load_text_encoder() -> torch.nn.Module:
        return frozen(load("text_encoder", **weights))

    unet = frozen(load("unet", **diffusers_weights))
    tokenizer = load("tokenizer")
    vae = frozen(load("vae", **diffusers_weights)) if index.get("vae") and index["vae"][0] is not None else None
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    if config.attention_slicing:
        unet.set_attention_slice("auto")
    max_length = config.max_length or min(int(getattr(tokenizer, "model_max_length", 77)), 512)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    identity = f"{config.model}@{config.revision or ''}:{_fingerprint(path)}"
    if path.resolve() == TOY_PRIOR.resolve():  # prompts as people write them (issue 18; toy prior only)
        from csd.toy.model import PROMPT_NORMALISATION, CanonicalPromptTokenizer

        tokenizer, identity = CanonicalPromptTokenizer(tokenizer), f"{identity}:{PROMPT_NORMALISATION}"
    log.info("loaded %s prior %s (%s, %s) from %s", "latent" if vae is not None else "pixel", config.model, device, dtype, path)
    return DiffusionPrior(
        # the text encoder loads on first use: a stage whose prompts are all in the embedding cache
        # never loads it (T5-XXL: 8.9 GiB, tens of seconds)
        identity, unet, None, tokenizer, alphas_cumprod, vae, device, dtype, max_length, prediction_type, load_text_encoder
    )


def _fingerprint(path: Path) -> str:
    """Changes when the text encoder or tokenizer changes (keys the embedding cache).

    Hashes configs, file sizes and the first MiB of each weight file: cheap even for T5-XXL.
    """
    import hashlib

    digest = hashlib.sha256()
    for file in sorted([*(path / "text_encoder").glob("*"), *(path / "tokenizer").glob("*")]):
        if file.is_file():
            with file.open("rb") as handle:
                digest.update(f"{file.parent.name}/{file.name}:{file.stat().st_size}:".encode() + handle.read(1 << 20))
    return digest.hexdigest()[:16]
