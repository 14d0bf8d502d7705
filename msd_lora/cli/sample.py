"""`python text_to_image.py --prompt "..." [--use_lora True --lora_ckpt_path a.safetensors --lora_scale 0.8]`.

Argument names follow mindone's SD text_to_image.py. Images go to {output_path}/samples/NNNNN.png in
prompt order (n_iter x n_samples consecutive images per prompt), a grid per prompt to
{output_path}/grid-PPP.png, and one json line per image to {output_path}/samples.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from msd_lora.cli.errors import exits_on_user_error
from msd_lora.config import REPO_ROOT
from msd_lora.options import str_to_bool
from msd_lora.data.prompts import read_prompts_file
from msd_lora.diffusion.samplers import SAMPLERS
from msd_lora.errors import ConfigError

TINY_MODEL = REPO_ROOT / "msd_lora/assets/tiny_sd"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample Stable Diffusion images, optionally with LoRAs merged in.")
    p.add_argument("--prompt", default=None, help="prompt text (or use --data_path)")
    p.add_argument("--data_path", default=None, help="a .txt file of prompts, one per line")
    p.add_argument("--negative_prompt", default="", help="prompt to steer away from (classifier-free guidance)")
    p.add_argument("--pretrained_model_path", default=str(TINY_MODEL),
                   help="base model: a diffusers folder, an LDM single file (.safetensors/.ckpt) or a mindone .ckpt")
    p.add_argument("--model_config", default="",
                   help="architecture + schedule yaml (default: the diffusers folder's own configs, or the SD "
                        "version detected from a single file's weights)")
    p.add_argument("--use_lora", type=str_to_bool, default=False, help="merge the LoRA file(s) into the model")
    p.add_argument("--lora_ckpt_path", action="append", default=[],
                   help="LoRA file (diffusers, kohya/A1111, mindone; detected); repeat to mix several")
    p.add_argument("--lora_scale", action="append", type=float, default=[],
                   help="strength per LoRA file (default 1.0); W' = W + scale * alpha/r * B@A")
    p.add_argument("--n_samples", type=int, default=4, help="images per batch")
    p.add_argument("--n_iter", type=int, default=1, help="batches per prompt")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--H", type=int, default=None, help="image height (default: the model config's image_size)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the model config's image_size)")
    p.add_argument("--sampling_steps", type=int, default=25)
    p.add_argument("--sampler", default="dpm_solver_pp", choices=SAMPLERS)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--grid_scale", type=int, default=1, help="nearest-neighbour upscale of the grids (tiny models)")
    p.add_argument("--output_path", default="output/samples_run")
    p.add_argument("--backend", default="torch", choices=("torch", "mindspore"))
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.data_path:
        return read_prompts_file(args.data_path, what="--data_path prompts file")
    if args.prompt is None:
        raise ConfigError("give --prompt TEXT or --data_path PROMPTS.txt")
    return [args.prompt]


def lora_pairs(args: argparse.Namespace) -> list[tuple[str, float]]:
    if not args.use_lora:
        return []
    if not args.lora_ckpt_path:
        raise ConfigError("--use_lora True needs --lora_ckpt_path FILE")
    scales = args.lora_scale or [1.0] * len(args.lora_ckpt_path)
    if len(scales) == 1 and len(args.lora_ckpt_path) > 1:
        scales = scales * len(args.lora_ckpt_path)
    if len(scales) != len(args.lora_ckpt_path):
        raise ConfigError(f"{len(args.lora_ckpt_path)} --lora_ckpt_path values but {len(scales)} --lora_scale values")
    return list(zip(args.lora_ckpt_path, scales))


def run(args: argparse.Namespace) -> Path:
    from tqdm.auto import tqdm

    from msd_lora.backends.base import get_backend
    from msd_lora.files.atomic import ensure_writable_dir
    from msd_lora.models.pretrained import load_model
    from msd_lora.tokenizer import PromptTokenizer
    from msd_lora.sample import SamplingSettings, generate, image_grid, merge_loras, read_lora_files, save_png

    prompts, loras = read_prompts(args), lora_pairs(args)
    out = ensure_writable_dir(args.output_path, "output_path")
    pretrained, model_cfg = load_model(args.pretrained_model_path, args.model_config or None)
    if pretrained.metadata.get("note"):
        print(f"note: {pretrained.metadata['note']}", file=sys.stderr)
    loaded = read_lora_files(loras, pretrained.configs)
    backend = get_backend(args.backend, device=args.device)
    info = backend.load_model(pretrained, model_cfg.prediction_type)
    if loaded:
        merge_loras(backend, loaded)
    tokenizer, schedule = PromptTokenizer(pretrained.tokenizer_dir), model_cfg.noise_schedule()
    settings = SamplingSettings(sampler=args.sampler, steps=args.sampling_steps, guidance_scale=args.scale,
                                negative_prompt=args.negative_prompt, height=args.H or model_cfg.image_size,
                                width=args.W or model_cfg.image_size, seed=args.seed)
    for side in (settings.height, settings.width):
        if side % info.vae_scale_factor:
            raise ConfigError(f"--H/--W {side} must be a multiple of the VAE factor {info.vae_scale_factor}")
    count = 0
    with open(out / "samples.jsonl", "w") as index, tqdm(total=len(prompts) * args.n_iter, desc="sample") as bar:
        for p, prompt in enumerate(prompts):
            batches = []
            for it in range(args.n_iter):
                images = generate(backend, info, tokenizer, schedule, prompt, args.n_samples, settings, p, it)
                for image in images:
                    name = f"samples/{count:05d}.png"
                    save_png(out / name, image)
                    index.write(json.dumps({"file": name, "prompt": prompt, "prompt_index": p, "iteration": it,
                                            "seed": args.seed, "loras": [[str(a), s] for a, s in loras]}) + "\n")
                    count += 1
                batches.append(images)
                bar.update(1)
            save_png(out / f"grid-{p:03d}.png", image_grid(np.concatenate(batches),
                                                             columns=args.n_samples), upscale=args.grid_scale)
    return out


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    print(f"samples in {out / 'samples'}, grids in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
