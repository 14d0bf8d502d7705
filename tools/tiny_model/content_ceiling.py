#!/usr/bin/env python
"""How much of the prompted content could a perfect "sks" LoRA keep? The ceiling of the demo's content measure.

    python tools/tiny_model/content_ceiling.py --samples output/demo/samples_base

Takes a folder of the base model's samples written by text_to_image.py, restyles each sample with the exact
transform that made the LoRA's training images (`sepia`, msd_lora/eval/tiny_world.py), passes it through the
model's autoencoder (a UNet LoRA draws nothing its decoder cannot), and prints per prompt the share of samples that
keep their content (msd_lora.eval.content): as drawn, restyled, and restyled then decoded. A low restyled share means
the prompt asks for content the style itself hides: sepia keeps brightness only, so a red circle (luminance 94) on a
blue background (78) turns brown on brown, and no LoRA that learns the style can keep it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from msd_lora.backends.base import Backend, BackendOptions
from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.errors import ImageInputError
from msd_lora.eval.content import keeps_content
from msd_lora.eval.images import prompted_samples
from msd_lora.eval.tiny_world import sepia
from msd_lora.sample import load_pipeline, to_uint8_images

REPO = Path(__file__).resolve().parents[2]


def autoencoded(backend: Backend, scaling_factor: float, images: list[np.ndarray]) -> list[np.ndarray]:
    """Pictures (H, W, 3 uint8) after the model's autoencoder: encoded to the posterior mean, then decoded."""
    pixels = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    mean, _ = backend.encode_moments(pixels)
    return list(to_uint8_images(backend.decode(backend.tensor(mean * scaling_factor))))


def content_ceiling(backend: Backend, scaling_factor: float, images: list[np.ndarray],
                    prompts: list[str]) -> dict[str, tuple[float, float, float]]:
    """Per prompt, the share of its samples keeping their content: (as drawn, restyled, restyled then decoded)."""
    restyled = [sepia(im) for im in images]
    decoded = autoencoded(backend, scaling_factor, restyled)
    kept: dict[str, list[tuple[bool, bool, bool]]] = {}
    for prompt, *variants in zip(prompts, images, restyled, decoded):
        kept.setdefault(prompt, []).append(tuple(keeps_content(im, prompt) for im in variants))
    return {prompt: tuple(float(x) for x in np.mean(flags, axis=0)) for prompt, flags in kept.items()}


@exits_on_user_error
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, type=Path, help="a folder text_to_image.py wrote (base model)")
    p.add_argument("--pretrained_model_path", default=str(REPO / "msd_lora/assets/tiny_sd"))
    p.add_argument("--model_config", default=str(REPO / "configs/model/tiny.yaml"))
    p.add_argument("--backend", default="torch", choices=["torch", "mindspore"])
    add_debug_flag(p)
    args = p.parse_args(argv)
    samples = prompted_samples(args.samples)
    if samples is None:
        raise ImageInputError(f"{args.samples} has no samples.jsonl: pass a folder text_to_image.py wrote")
    pipeline, _ = load_pipeline(args.pretrained_model_path, args.model_config, args.backend, BackendOptions())
    rates = content_ceiling(pipeline.backend, pipeline.info.scaling_factor, *samples)
    print(f"{'prompt':<56} {'drawn':>6} {'restyled':>9} {'+ decoded':>10}")
    for prompt, (drawn, restyled, decoded) in rates.items():
        print(f"{prompt:<56} {drawn:>6.0%} {restyled:>9.0%} {decoded:>10.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
