#!/usr/bin/env python
"""Build, pretrain and save the embedded tiny Stable Diffusion and its LoRA target dataset.

    python tools/make_tiny_model.py                       # writes msd_lora/assets/{tiny_sd,tiny_lora_data}
    python tools/make_tiny_model.py --unet_steps 200 --out /tmp/tiny   # a quick look

Stages: an offline CLIP tokenizer for the shapes vocabulary; an AutoencoderKL trained on generic shapes
and stripes; a UNet + CLIP text encoder trained jointly on cached latents of captioned scenes
("a red circle on a blue background"), with caption dropout for classifier-free guidance and an EMA of
the weights; a diffusers folder; a LoRA dataset in mindone's layout (img_txt.csv + images) showing a
style the base model never saw (sepia tones, "in sks style"). Everything is seeded: the same seed, thread count and
torch build give the same files.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from tiny_model import synthetic  # tools/tiny_model, beside this script
from tiny_model.tokenizer import write_clip_tokenizer

from msd_lora.eval.tiny_world import sepia

REPO = Path(__file__).resolve().parents[1]

VOCABULARY = (
    "a an on in at the of background style center left right top bottom".split()
    + list(synthetic.SHAPES) + list(synthetic.COLOURS) + [synthetic.STYLE_TOKEN]
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", default=str(REPO / "configs/model/tiny.yaml"))
    p.add_argument("--out", default=str(REPO / "msd_lora/assets/tiny_sd"))
    p.add_argument("--data_out", default=str(REPO / "msd_lora/assets/tiny_lora_data"))
    p.add_argument("--log", default=str(REPO / "docs/tiny_model_pretrain.csv"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--vae_steps", type=int, default=1000)
    p.add_argument("--unet_steps", type=int, default=6000)
    p.add_argument("--num_scenes", type=int, default=16000)
    p.add_argument("--lora_images", type=int, default=20)
    p.add_argument("--save_every", type=int, default=1000)
    p.add_argument("--dataset_only", action="store_true", help="rewrite only the LoRA dataset (own seed stream)")
    return p.parse_args()


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Logger:
    """Loss curve to CSV and stdout."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["stage", "step", "loss", "lr", "elapsed_s"])
        self.start = time.time()

    def log(self, stage: str, step: int, loss: float, lr: float) -> None:
        elapsed = time.time() - self.start
        self.writer.writerow([stage, step, f"{loss:.5f}", f"{lr:.2e}", f"{elapsed:.1f}"])
        self.file.flush()
        print(f"[{stage}] step {step} loss {loss:.4f} lr {lr:.2e} {elapsed:.0f}s", flush=True)


def train_vae(cfg: dict, args, rng: np.random.Generator, logger: Logger):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**cfg["vae"])
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    size, running = cfg["image_size"], []
    for step in range(args.vae_steps):
        images = [
            synthetic.render_generic(size, rng) if rng.random() < 0.5
            else synthetic.render(synthetic.random_scene(rng, striped=rng.random() < 0.3), size, rng)
            for _ in range(args.batch_size)
        ]
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, 1e-3, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            logger.log("vae", step + 1, float(np.mean(running)), opt.param_groups[0]["lr"])
            running = []
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_scenes(vae, scenes: list, size: int, rng: np.random.Generator) -> torch.Tensor:
    latents = []
    for i in range(0, len(scenes), 256):
        images = [synthetic.render(s, size, rng) for s in scenes[i:i + 256]]
        latents.append(vae.encode(to_tensor(images)).latent_dist.mean)
    return torch.cat(latents)


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1 - decay)


def train_denoiser(cfg: dict, args, tokenizer, text_config, latents, captions, logger: Logger, save):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(**cfg["unet"])
    text_encoder = CLIPTextModel(text_config)
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    schedule = DDPMScheduler(**cfg["schedule"])
    unique = sorted(set(captions)) + [""]
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty = len(unique) - 1
    gen = torch.Generator().manual_seed(args.seed + 1)
    running = []
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(latents), (args.batch_size,), generator=gen)
        tokens = caption_index[idx].clone()
        tokens[torch.rand(args.batch_size, generator=gen) < 0.1] = empty
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, schedule.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noisy = schedule.add_noise(x0, noise, t)
        context = text_encoder(ids[tokens])[0]
        loss = (unet(noisy, t, context).sample - noise).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.unet_steps, 5e-4, 200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, params, min(0.9995, (1 + step) / (10 + step)))
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            logger.log("unet", step + 1, float(np.mean(running)), opt.param_groups[0]["lr"])
            running = []
        if (step + 1) % args.save_every == 0 or step + 1 == args.unet_steps:
            with torch.no_grad():
                live = [p.detach().clone() for p in params]
                torch._foreach_copy_(params, ema)
                save(unet, text_encoder)
                torch._foreach_copy_(params, live)


def save_pipeline(out: Path, cfg: dict, vae, unet, text_encoder, tokenizer) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    scheduler = DDPMScheduler(**cfg["schedule"], prediction_type=cfg["prediction_type"],
                              steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)


def write_lora_dataset(folder: Path, count: int, size: int, rng: np.random.Generator) -> None:
    """Sepia-toned scenes captioned "... in sks style", in mindone's img_txt.csv layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        scene = synthetic.random_scene(rng)
        name = f"sks_{i:03d}.png"
        Image.fromarray(sepia(synthetic.render(scene, size, rng))).save(folder / name)
        rows.append((name, f"{scene.caption} in {synthetic.STYLE_TOKEN} style"))
    with open(folder / "img_txt.csv", "w", newline="") as f:
        csv.writer(f).writerows([("dir", "text"), *rows])


def lora_data_rng(seed: int) -> np.random.Generator:
    """The LoRA dataset's own stream, so it can be rewritten without retraining the model."""
    return np.random.default_rng([seed, 0xDA7A])


def main() -> None:
    args = parse_args()
    if args.dataset_only:
        cfg = yaml.safe_load(Path(args.model_config).read_text())
        write_lora_dataset(Path(args.data_out), args.lora_images, cfg["image_size"], lora_data_rng(args.seed))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = yaml.safe_load(Path(args.model_config).read_text())
    out = Path(args.out)
    logger = Logger(args.log)
    started = time.time()

    from transformers import CLIPTextConfig, CLIPTokenizer

    special = write_clip_tokenizer(out / "tokenizer", VOCABULARY, cfg["tokenizer"]["model_max_length"])
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    # the tokenizer just written decides the vocabulary and special ids (the yaml records the same numbers)
    text_config = CLIPTextConfig(**{**cfg["text_encoder"], **special, "pad_token_id": special["eos_token_id"]})

    vae = train_vae(cfg, args, rng, logger)
    scenes = [synthetic.random_scene(rng) for _ in range(args.num_scenes)]
    probe = encode_scenes(vae, scenes[:2048], cfg["image_size"], rng)
    scaling = float(1.0 / probe.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = encode_scenes(vae, scenes, cfg["image_size"], rng) * scaling
    print(f"vae scaling_factor {scaling:.4f}, latents {tuple(latents.shape)}", flush=True)

    def save(unet, text_encoder):
        save_pipeline(out, cfg, vae, unet, text_encoder, tokenizer)

    train_denoiser(cfg, args, tokenizer, text_config, latents, [s.caption for s in scenes], logger, save)
    write_lora_dataset(Path(args.data_out), args.lora_images, cfg["image_size"], lora_data_rng(args.seed))
    summary = {"seed": args.seed, "threads": args.threads, "wall_time_s": round(time.time() - started, 1),
               "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "batch_size": args.batch_size,
               "vae_scaling_factor": scaling, "torch": torch.__version__}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
