"""Backend-neutral text-to-image: prompts -> latents -> sampler -> images, with classifier-free guidance.

Initial latents are drawn in numpy from (seed, prompt index, iteration), so both backends start from
the same noise and a prompt's images don't depend on which other prompts are in the batch file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msd_lora.backends.base import Backend, ModelInfo
from msd_lora.diffusion import samplers
from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.lora.core import LoraWeights, base_weight_name, split_module_key
from msd_lora.lora.merge import check_fits, merged_weights


@dataclass(frozen=True)
class SamplingSettings:
    sampler: str = "dpm_solver_pp"
    steps: int = 25
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    height: int = 512
    width: int = 512
    seed: int = 42


def initial_latents(info: ModelInfo, settings: SamplingSettings, n: int, prompt_index: int,
                    iteration: int) -> np.ndarray:
    side_h, side_w = settings.height // info.vae_scale_factor, settings.width // info.vae_scale_factor
    rng = np.random.default_rng([settings.seed, 0x1A7E, prompt_index, iteration])
    return rng.standard_normal((n, info.latent_channels, side_h, side_w)).astype(np.float32)


def generate(backend: Backend, info: ModelInfo, tokenizer, schedule: NoiseSchedule, prompt: str, n: int,
             settings: SamplingSettings, prompt_index: int = 0, iteration: int = 0, progress=None) -> np.ndarray:
    """`n` images (N, H, W, 3) uint8 for one prompt."""
    cond = backend.encode_prompts(tokenizer([prompt] * n))
    guided = settings.guidance_scale != 1.0
    contexts = [backend.encode_prompts(tokenizer([settings.negative_prompt] * n)), cond] if guided else [cond]
    sigma = samplers.init_noise_sigma(settings.sampler, schedule, settings.steps)
    latents = backend.tensor(initial_latents(info, settings, n, prompt_index, iteration)) * sigma

    def model_fn(x, t):
        preds = backend.denoise(x, t, contexts)
        if not guided:
            return preds[0]
        uncond, text = preds
        return uncond + settings.guidance_scale * (text - uncond)

    latents = samplers.sample(settings.sampler, schedule, model_fn, latents, settings.steps, progress)
    return to_uint8_images(backend.decode(latents))


def to_uint8_images(images: np.ndarray) -> np.ndarray:
    """Decoder output (N, 3, H, W) in [-1, 1] -> uint8 pictures (N, H, W, 3), rounded to nearest."""
    pixels = np.round((np.clip(images.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return pixels.transpose(0, 2, 3, 1)


def read_lora_files(pairs: list[tuple[str, float]], configs: dict[str, dict]) -> list[tuple[LoraWeights, float, str]]:
    """(weights, scale, path) of each LoRA file, any format (diffusers, kohya/A1111, old diffusers, mindone).

    Names are resolved against the model's own module layout (`configs`), so LDM-named and kohya files map
    onto exactly this model's layers.
    """
    from msd_lora.lora.formats import read_lora
    from msd_lora.lora.module_index import ModuleIndex

    index = ModuleIndex.for_model(configs)
    return [(read_lora(path, index).weights, float(scale), str(path)) for path, scale in pairs]


def merge_loras(backend: Backend, loras: list[tuple[LoraWeights, float, str]]) -> None:
    """Merge (weights, scale, source) LoRAs into the backend's frozen weights: W += scale*alpha/r*B@A."""
    shapes = backend.base_shapes()
    for weights, _, source in loras:
        check_fits(weights, shapes, source=f"LoRA file {source}")
    names = sorted({f"{split_module_key(k)[0]}.{base_weight_name(split_module_key(k)[1])}"
                    for weights, _, _ in loras for k in weights})
    base = backend.base_weights(names)
    backend.set_base_weights(merged_weights(base, [(w, s) for w, s, _ in loras]))


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile (N, H, W, 3) images into one picture, `columns` wide (default: as square as possible)."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def save_png(path: Path, image: np.ndarray, upscale: int = 1) -> None:
    from PIL import Image

    picture = Image.fromarray(image)
    if upscale > 1:
        picture = picture.resize((image.shape[1] * upscale, image.shape[0] * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
