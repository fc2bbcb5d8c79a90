"""Train the toy prior: `python -m tools.toy.train --steps 8000 --out csd/toy/prior`.

ε-prediction DDPM (squared-cosine schedule) with min-SNR-5 loss weighting, AdamW with warm-up
and cosine decay, EMA weights, 10 % caption dropout. The training images come from a pool of
pre-rendered scenes (rendering on the fly would cost a third of each step on 2 cores). Every
`--checkpoint-every` steps the full state goes to `--checkpoint-dir` (atomically) and a run
started again with the same arguments resumes from it; every `--export-every` steps the EMA
weights are written to `--out` in the diffusers layout (atomically), with a sample grid.
`--init-from DIR` continues training from an exported prior (live and EMA weights both start from
its EMA weights; the learning-rate schedule starts afresh); TRAINING.txt counts all steps.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from csd.toy.model import MAX_LENGTH, build_scheduler, build_text_encoder, build_tokenizer, build_unet, save_pipeline
from csd.toy.world import COLOUR_NAMES, SHAPES, WorldConfig, sample_batch
from stages.common import atomic_save

log = logging.getLogger("tools.toy.train")


def build_pool(path: Path, size: int, seed: int, chunk: int = 1024) -> tuple[torch.Tensor, list[str]]:
    """Render (or load) `size` captioned images; uint8 `(N, 3, 32, 32)`."""
    if path.exists():
        data = torch.load(path)
        return data["images"], data["captions"]
    config = WorldConfig(empty_caption_prob=0.0)
    images, captions = [], []
    for start in tqdm(range(0, size, chunk), desc="rendering pool"):
        batch = sample_batch(min(chunk, size - start), config, seed=seed * 1_000_003 + start)
        images.append((batch.images * 255).round().to(torch.uint8))
        captions += batch.captions
    images = torch.cat(images)
    atomic_save(lambda tmp: torch.save({"images": images, "captions": captions}, tmp), path)
    return images, captions


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def sample_grid(unet, text_encoder, tokenizer, scheduler, prompts: list[str], guidance_scale: float, seed: int, steps: int = 50):
    """DDIM samples `(N, 3, 32, 32)` in [0, 1] with classifier-free guidance."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    tokens = tokenizer(prompts + [""], padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    embeddings = text_encoder(tokens.input_ids).last_hidden_state
    cond, null = embeddings[:-1], embeddings[-1:].expand(len(prompts), -1, -1)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), 3, 32, 32, generator=generator)
    for t in ddim.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, null])).sample
        eps_cond, eps_null = eps.chunk(2)
        x = ddim.step(eps_null + guidance_scale * (eps_cond - eps_null), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def write_grid(images: torch.Tensor, columns: int, path: Path, scale: int = 2) -> None:
    import imageio.v3 as iio

    n = images.shape[0]
    rows = math.ceil(n / columns)
    canvas = torch.ones(3, rows * 32, columns * 32)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = images[i]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    iio.imwrite(path, np.kron(array, np.ones((scale, scale, 1), dtype=np.uint8)))


def trained_steps(directory: Path) -> int:
    """Steps recorded in an exported prior's TRAINING.txt (0 when it records none)."""
    record = directory / "TRAINING.txt"
    for line in record.read_text().splitlines() if record.exists() else []:
        if line.startswith("steps:"):
            return int(line.split(":", 1)[1])
    return 0


def export(out: Path, ema_unet, ema_text, tokenizer, scheduler, step: int, history: str = "") -> None:
    """Atomically replace `out` with the EMA pipeline and a sample grid."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(tmp, ema_unet, ema_text, tokenizer, scheduler)
    prompts = [f"a {c} {s}" for s in SHAPES for c in COLOUR_NAMES]
    images = sample_grid(ema_unet, ema_text, tokenizer, scheduler, prompts, guidance_scale=3.0, seed=0)
    write_grid(images, len(COLOUR_NAMES), tmp / "samples_cfg3.png")
    (tmp / "TRAINING.txt").write_text(f"steps: {step}\n{history}")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--pool", type=int, default=48_000, help="number of pre-rendered training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--null-prob", type=float, default=0.1, help="caption dropout (trains ε_∅)")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path(".checkpoints/toy-prior"))
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--export-every", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "prior")
    parser.add_argument("--init-from", type=Path, help="an exported prior to continue training from")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    unet, text_encoder, scheduler = build_unet(args.seed), build_text_encoder(len(tokenizer), args.seed), build_scheduler()
    earlier, history = 0, ""
    if args.init_from:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.init_from / "unet").state_dict())
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(args.init_from / "text_encoder").state_dict())
        earlier = trained_steps(args.init_from)
        history = f"warm start: {earlier} steps, then {args.steps} at lr {args.lr:g} (batch {args.batch}, pool {args.pool})\n"
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed + 1)
    step, losses = 0, []

    checkpoint = args.checkpoint_dir / "state.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        for module, key in ((unet, "unet"), (text_encoder, "text_encoder"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, losses = state["step"], state["losses"]
        log.info("resumed from %s at step %d", checkpoint, step)

    images, captions = build_pool(args.checkpoint_dir / "pool.pt", args.pool, args.seed)
    tokens = tokenizer(captions + [""], padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    null_tokens = tokens[-1]
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = snr.clamp(max=5.0) / snr  # min-SNR-5 for ε-prediction

    def save_state():
        state = {
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "ema_unet": ema_unet.state_dict(),
            "ema_text": ema_text.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "step": step,
            "losses": losses,
            "args": vars(args),
        }
        atomic_save(lambda tmp: torch.save(state, tmp), checkpoint)

    progress = tqdm(total=args.steps, initial=step, desc="toy prior", mininterval=5)
    started = time.time()
    while step < args.steps:
        index = torch.randint(len(images), (args.batch,), generator=generator)
        x0 = images[index].float() / 127.5 - 1.0
        flip = torch.rand(args.batch, generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        ids = tokens[index].clone()
        ids[torch.rand(args.batch, generator=generator) < args.null_prob] = null_tokens
        t = torch.randint(0, len(alphas_cumprod), (args.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
        prediction = unet(a * x0 + s * noise, t, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample
        loss = (F.mse_loss(prediction, noise, reduction="none").mean((1, 2, 3)) * loss_weight[t]).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for p_ema, p in zip(ema.parameters(), live.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        step += 1
        losses.append(float(loss))
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_state()
        if step % args.export_every == 0 or step == args.steps:
            export(args.out, ema_unet, ema_text, tokenizer, scheduler, earlier + step, history)
            log.info("step %d: loss %.4f, exported EMA weights to %s (%.0f s this run)", step, np.mean(losses[-200:]), args.out, time.time() - started)
    progress.close()


if __name__ == "__main__":
    main()
