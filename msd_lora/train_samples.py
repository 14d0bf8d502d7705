"""Samples drawn during training, exactly as `text_to_image.py` would draw them from the checkpoint of that step.

The LoRA file is read and merged into the base weights the way the sampling command merges it, the live LoRA layers
are switched off meanwhile (`Backend.set_lora_enabled`) and the base weights restored exactly afterwards, so the
grids equal `text_to_image.py --lora_ckpt_path <file>`'s `grid-PPP.png` pixel for pixel and the training goes on as
if nothing had been drawn.
"""
from __future__ import annotations

from pathlib import Path

from msd_lora.config import TrainConfig
from msd_lora.files.atomic import atomic_write_text
from msd_lora.lora.merge import base_name
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.sample import Pipeline, SamplingOptions, generate, image_grid, merge_loras, read_lora_files, save_png


def validation_options(cfg: TrainConfig) -> SamplingOptions:
    """The run's validation sampling settings (validation_*), at the training resolution."""
    return SamplingOptions(sampler=cfg.validation_sampler, steps=cfg.validation_steps,
                           guidance_scale=cfg.validation_guidance_scale, negative_prompt=cfg.validation_negative_prompt,
                           height=cfg.image_size, width=cfg.image_size,
                           seed=cfg.seed if cfg.validation_seed is None else cfg.validation_seed,
                           n_samples=cfg.validation_images, max_token_length=cfg.max_token_length)


def sample_from_file(pipeline: Pipeline, index: ModuleIndex, lora_path: Path, prompts: list[str],
                     options: SamplingOptions, folder: Path) -> list[Path]:
    """A grid per prompt (`promptPP.png`, one row of `n_samples`) and `prompts.txt` in `folder`, sampled with the
    LoRA file merged at scale 1 into the pipeline's base weights, which are restored after."""
    backend = pipeline.backend
    loras = read_lora_files([(str(lora_path), 1.0)], index)
    saved = backend.base_weights(sorted({base_name(key) for key in loras[0][0]}))
    merge_loras(backend, loras)
    backend.set_lora_enabled(False)
    paths = []
    try:
        for i, prompt in enumerate(prompts):
            images = generate(pipeline, prompt, options.n_samples, options, i)
            paths.append(folder / f"prompt{i:02d}.png")
            save_png(paths[-1], image_grid(images, columns=options.n_samples))
        atomic_write_text(folder / "prompts.txt", "\n".join(prompts) + "\n")
    finally:
        backend.set_base_weights(saved)
        backend.set_lora_enabled(True)
    return paths
